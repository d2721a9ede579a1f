"""Default target modules per transformers ``model_type`` for the two placements.

Parallel SURM adapts every linear map of each block by default: its parameters are cheap
(a circulant costs max(out, in) per map), so all the maps of a block cost less than LoRA r=8
on the attention query and value alone, and adapting them all is what lifts SURM to and past
LoRA at its usual setting (docs/results.md). Model types without an entry here fall back to
PEFT's LoRA defaults (attention query and value).
"""

from __future__ import annotations

from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

_BERT_BLOCK = ["query", "key", "value", "output.dense", "intermediate.dense"]  # output.dense: attention's and FFN's
_LLAMA_BLOCK = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_OPT_BLOCK = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
# transformers >= 5 names ViT projections q_proj/k_proj/v_proj/o_proj and its MLP fc1/fc2
_VIT_BLOCK = [*_BERT_BLOCK, "q_proj", "k_proj", "v_proj", "attention.o_proj", "mlp.fc1", "mlp.fc2"]

#: LoRA-style (parallel): every linear map of each block (attention and FFN).
PARALLEL_TARGETS: dict[str, list[str]] = {
    **TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
    **{t: _BERT_BLOCK for t in ("bert", "roberta", "xlm-roberta", "electra", "camembert", "deberta", "deberta-v2")},
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],  # c_proj: the attention's and the MLP's output projections
    **{t: _LLAMA_BLOCK for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3")},
    **{t: _OPT_BLOCK for t in ("opt", "clip", "clip_vision_model")},
    "vit": _VIT_BLOCK,
    "deit": _VIT_BLOCK,
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


#: The FFN output projection alone (the Pfeiffer adapter position). BERT's name needs a regex:
#: "output.dense" also ends the attention output projection's name.
FFN_OUTPUT_TARGETS: dict[str, str] = {
    **{t: r".*layer\.\d+\.output\.dense" for t in ("bert", "roberta", "xlm-roberta", "electra", "camembert")},
    **{t: "down_proj" for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")},
    "gpt2": "mlp.c_proj",
    "opt": "fc2",
}


def default_targets(model_type: str | None, placement: str) -> list[str] | None:
    """The default target module names, or None when the model type is not known."""
    table = SERIAL_TARGETS if placement == "serial" else PARALLEL_TARGETS
    return table.get(model_type or "")


def lora_default_targets(model_type: str | None) -> list[str] | None:
    """PEFT LoRA's default targets for the model type (attention query and value for BERT), or
    None when PEFT has none: the reference of budgets written as a LoRA rank."""
    return TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type or "")
