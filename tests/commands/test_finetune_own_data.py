"""``surm finetune --data FILE``: a user's classification and chat files end to end on tiny
models, the output reloaded with PEFT's loaders; one default learning rate per adapter config."""

import json

import peft
import pytest
import torch

from surm.commands import finetune
from surm.commands.main import build_parser, main


def _args(*argv):
    return build_parser().parse_args(["finetune", *argv])


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_a_classification_jsonl_trains_saves_and_reloads(tmp_path, capsys):
    rows = [{"text": f"this film was {'great fun' if i % 2 else 'a dull mess'} {i}",
             "label": "good" if i % 2 else "bad"} for i in range(80)]
    name = _write_jsonl(tmp_path / "reviews.jsonl", rows)
    out = tmp_path / "run"
    assert main(["finetune", "--data", name, "--model", "tiny-bert", "--method", "surm:toeplitz", "--max-steps", "4",
                 "--per-device-train-batch-size", "8", "--output-dir", str(out), "--quiet"]) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["label_names"] == ["bad", "good"] and result["sizes"] == {"train": 64, "validation": 8, "test": 8}
    assert result["spec"]["dataset"] == name and result["key"].startswith("reviews-surm-toeplitz-s0-")
    assert "accuracy" in capsys.readouterr().out

    from transformers import AutoConfig, AutoTokenizer, BertForSequenceClassification

    folder = out / "adapter"
    config = AutoConfig.from_pretrained(folder)
    assert config.id2label == {0: "bad", 1: "good"}
    torch.manual_seed(0)
    loaded = peft.PeftModel.from_pretrained(BertForSequenceClassification(config), folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    logits = loaded(**tokenizer(["a dull mess"], return_tensors="pt")).logits
    assert logits.shape == (1, 2) and sum(".surm_" in n for n, _ in loaded.named_parameters()) > 0


def test_a_chat_jsonl_trains_a_causal_lm_and_reloads(tmp_path):
    from surm.harness.models import tiny

    rows = [{"messages": [{"role": "user", "content": "write a tale about the fox"},
                          {"role": "assistant", "content": f"once upon a time there was a {w} fox . the end"}]}
            for w in ["red", "kind"] * 10]
    name = _write_jsonl(tmp_path / "chats.jsonl", rows)
    out = tmp_path / "run"
    assert main(["finetune", "--data", name, "--model", "tiny-llama", "--method", "surm:circulant", "--max-steps", "3",
                 "--per-device-train-batch-size", "2", "--output-dir", str(out), "--quiet"]) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["num_labels"] == 0 and result["test"]["perplexity"] > 1 and result["curve"][0]["step"] == 0
    loaded = peft.PeftModel.from_pretrained(tiny.model(), out / "adapter")
    assert sum(".surm_" in n for n, _ in loaded.named_parameters()) > 0
    assert (out / "adapter" / "tokenizer_config.json").is_file()


def test_one_adapter_config_has_one_default_rate_on_text_image_and_causal_lm_data(tmp_path):
    """A SurmConfig's default rate is surm.recommended_lr of that config, whatever the data: the
    config's own fields (here scaling="none") are never lost on the way to the optimizer."""
    import surm

    path = tmp_path / "conv_and_linear.json"
    # one regex that names a layer of each model: BERT's query, EfficientNet's 1x1 project convolutions, Llama's q
    config = {"structure": "circulant", "scaling": "none", "target_modules": r".*(query|_project_conv|q_proj)"}
    path.write_text(json.dumps(config))
    expected = surm.recommended_lr(surm.SurmConfig(**config))
    for data, model in (("rotten_tomatoes", "tiny-bert"), ("digits", "efficientnet"), ("grimm_tales", "tiny-llama")):
        spec = finetune.spec_from_args(_args("--data", data, "--model", model, "--adapter-config", str(path)))
        assert spec.effective_lr == pytest.approx(expected), data
    assert expected != surm.recommended_lr(surm.SurmConfig(structure="circulant"))  # scaling matters
