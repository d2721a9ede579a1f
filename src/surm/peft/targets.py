"""Default target modules per transformers ``model_type`` for the two placements."""

from __future__ import annotations

from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

#: LoRA-style (parallel): PEFT's LoRA defaults (attention query/value), plus vision models.
PARALLEL_TARGETS: dict[str, list[str]] = {
    **TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
    # transformers >= 5 names ViT projections q_proj/k_proj/v_proj/o_proj; older versions query/value
    "vit": ["query", "value", "q_proj", "v_proj"],
    "deit": ["query", "value", "q_proj", "v_proj"],
    "clip": ["q_proj", "v_proj"],
    "clip_vision_model": ["q_proj", "v_proj"],
}

#: Adapter-style (serial), Houlsby positions: the attention output projection and the FFN
#: output projection of every block. Target names match by suffix, so "output.dense" covers
#: both BERT's ``attention.output.dense`` and ``output.dense``.
SERIAL_TARGETS: dict[str, list[str]] = {
    "bert": ["output.dense"],
    "roberta": ["output.dense"],
    "xlm-roberta": ["output.dense"],
    "electra": ["output.dense"],
    "vit": ["output.dense", "attention.o_proj", "mlp.fc2"],
    "deit": ["output.dense", "attention.o_proj", "mlp.fc2"],
    "distilbert": ["attention.out_lin", "ffn.lin2"],
    "gpt2": ["attn.c_proj", "mlp.c_proj"],
    "llama": ["o_proj", "down_proj"],
    "mistral": ["o_proj", "down_proj"],
    "qwen2": ["o_proj", "down_proj"],
    "gemma": ["o_proj", "down_proj"],
    "opt": ["out_proj", "fc2"],
    "clip": ["out_proj", "fc2"],
}


def default_targets(model_type: str | None, placement: str) -> list[str] | None:
    """The default target module names, or None when the model type is not known."""
    table = SERIAL_TARGETS if placement == "serial" else PARALLEL_TARGETS
    return table.get(model_type or "")
