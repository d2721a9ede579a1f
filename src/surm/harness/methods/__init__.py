"""The method vocabulary: method strings (``lora:8``, ``surm:circulant:block_size=128``, ...)
parsed into a :class:`Method` (:mod:`.grammar`), one record per kind (:mod:`.kinds`), applied to
a model (:mod:`.apply`)."""

from .apply import apply, count_trainable, default_head_lr, default_lr, peft_config, trainable_state
from .blocks import count_blocks
from .grammar import GRAMMAR, Method, parse
from .kinds import KINDS, KNOBS, TARGETS, Kind

__all__ = [
    "GRAMMAR",
    "KINDS",
    "KNOBS",
    "TARGETS",
    "Kind",
    "Method",
    "apply",
    "count_blocks",
    "count_trainable",
    "default_head_lr",
    "default_lr",
    "parse",
    "peft_config",
    "trainable_state",
]
