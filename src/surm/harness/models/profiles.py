"""Where a model's head is and where each method family puts its adapters.

A :class:`Profile` is part of every model of the catalog (:mod:`.catalog`). For transformers
models it is made from the model type by :func:`transformer_profile`, with the target lists of
:mod:`surm.peft.targets` (SURM's own per-type defaults, PEFT LoRA's, the Houlsby and Pfeiffer
positions), so a list is written once; EfficientNet-Lite0's convolutions have a profile of their
own (:data:`EFFICIENTNET`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from surm.peft.targets import FFN_OUTPUT_TARGETS, PARALLEL_TARGETS, lora_default_targets

__all__ = ["EFFICIENTNET", "Profile", "profile_of", "transformer_profile"]


@dataclass(frozen=True)
class Profile:
    """Where a model's head is and where adapters go.

    ``parallel`` (parallel SURM), ``serial`` (Houlsby positions), ``ffn_out`` (Pfeiffer position)
    and ``lora`` (LoRA, C3A, LoKr, FourierFT, VeRA) are PEFT ``target_modules`` (a list of
    suffixes or a regex); ``None`` means SURM's per-model-type defaults
    (:mod:`surm.peft.targets`). ``block`` is every linear map of each block, the ``targets=all``
    of the LoRA-family methods. ``norms`` are the normalisation layers LN tuning trains.
    ``blocks`` is the name of the module list that holds the model's blocks (BERT's ``layer``),
    whose lowest ones AdapterDrop leaves without adapters; None: the model has none.
    ``convolutional``: the adapter targets are convolutions, which C3A, FourierFT and VeRA
    cannot adapt. ``head`` is the classification head's module name (None: a model without one,
    such as a causal LM whose LM head stays frozen; adapters then save no module). ``lr``
    overrides the method kinds' default learning rates (keys as :attr:`Method.lr_keys`).
    """

    head: str | None
    parallel: Any = None
    serial: Any = None
    ffn_out: Any = None
    lora: Any = ("query", "value")
    lr: dict[str, float] = field(default_factory=dict)
    block: Any = ("query", "key", "value", "output.dense", "intermediate.dense")
    norms: Any = ("LayerNorm",)
    blocks: str | None = "layer"
    convolutional: bool = False


#: The normalisation layers LN tuning trains, and the module list holding the blocks, per model
#: type (PEFT's LN-tuning defaults include Llama's final norm; the blocks' norms are the paper's).
_NORMS = {"bert": ("LayerNorm",), "llama": ("input_layernorm", "post_attention_layernorm")}
_BLOCKS = {"bert": "layer", "llama": "layers"}
#: Model types whose blocks are laid out as another's.
_SAME_AS = {t: "bert" for t in ("roberta", "xlm-roberta", "electra", "camembert")}
_SAME_AS.update({t: "llama" for t in ("mistral", "qwen2", "qwen3", "gemma", "gemma2")})


def transformer_profile(model_type: str, head: str | None) -> Profile:
    """The profile of a transformers model of ``model_type`` with classification head ``head``
    (None: no head). Parallel and serial SURM take SURM's own defaults for the type; the LoRA
    family PEFT LoRA's (``targets=all``: SURM's parallel targets). Raises ValueError for a
    model type with no targets in :mod:`surm.peft.targets` or PEFT."""
    lora = lora_default_targets(model_type)
    block = PARALLEL_TARGETS.get(model_type)
    if lora is None or block is None:
        raise ValueError(f"no adapter targets are known for model type {model_type!r}; known: "
                         f"{', '.join(sorted(set(PARALLEL_TARGETS)))}")
    like = _SAME_AS.get(model_type, model_type)
    return Profile(head=head, lora=tuple(lora), block=tuple(block), ffn_out=FFN_OUTPUT_TARGETS.get(model_type),
                   norms=_NORMS.get(like, ("LayerNorm",)), blocks=_BLOCKS.get(like))


_CONV1X1 = r".*(_expand_conv|_project_conv|_conv_head)"
#: EfficientNet-Lite0: every 1x1 convolution. Learning rates chosen on validation (MNIST-5k and
#: digits; docs/results.md): the width scale does not absorb the gain of the BatchNorm behind
#: each 1x1 convolution, so parallel SURM trains at a third of ``surm.recommended_lr``.
EFFICIENTNET = Profile(head="_fc", parallel=_CONV1X1, serial=_CONV1X1, ffn_out=r".*_project_conv", lora=_CONV1X1,
                       lr={"full": 3.3e-4, "head": 1e-2, "lora": 3e-3, "surm:parallel": 1e-2}, block=_CONV1X1,
                       norms=r"(.*\.)?_bn\d+", blocks="_blocks", convolutional=True)


def profile_of(model) -> Profile:
    """The profile of a transformers model (a PEFT model's base included), read from its
    config's model type; its classification head is the child module ``classifier`` or
    ``score``, if it has one. Raises ValueError for a model without a known transformers type
    (pass a profile: :data:`EFFICIENTNET` for EfficientNet-Lite0)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    if model_type is None:
        raise ValueError(f"{type(base).__name__} has no transformers config to read where adapters go from; pass "
                         f"a profile (surm.harness.models.profiles.EFFICIENTNET for EfficientNet-Lite0)")
    children = dict(base.named_children())
    head = next((name for name in ("classifier", "score") if name in children), None)
    return transformer_profile(model_type, head)
