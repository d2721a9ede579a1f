"""The model card's usage snippet fits the task type and says when weights are a dequantized GGUF."""

import pytest

from surm.peft import SurmConfig
from surm.peft.model_card import _body


@pytest.mark.parametrize(
    "task, auto_peft, auto",
    [("CAUSAL_LM", "AutoPeftModelForCausalLM", "AutoModelForCausalLM"),
     ("SEQ_CLS", "AutoPeftModelForSequenceClassification", "AutoModelForSequenceClassification"),
     (None, "AutoPeftModel.", "AutoModel.")],
)
def test_snippet_uses_the_task_classes(task, auto_peft, auto):
    text = _body(SurmConfig(task_type=task), "some/model")
    assert auto_peft in text and auto in text
    assert "dequantized" not in text


def test_dequantized_gguf_is_said():
    text = _body(SurmConfig(task_type="CAUSAL_LM"), "HuggingFaceTB/SmolLM2-135M-Instruct")
    assert "GGUF" in text and "not the original checkpoint" in text
