"""``SurmConfig``: the PEFT configuration of a SURM adapter."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from peft.config import PeftConfig

from surm import structured

PLACEMENTS = ("parallel", "serial")
#: activations allowed in serial adapters: all satisfy act(0) = 0, so a zero-initialised
#: adapter starts exactly at the pretrained model.
ACTIVATIONS = ("gelu", "relu", "silu", "tanh", "identity")
BIAS_MODES = ("none", "all", "surm_only")


class SurmPeftType(str):
    """The PEFT type tag of SURM configs: compares, hashes and serialises as ``"SURM"``, and has
    ``.value`` like the members of ``peft.PeftType`` (which has no SURM member to extend)."""

    @property
    def value(self) -> str:
        return str(self)


SURM = SurmPeftType("SURM")


@dataclass
class SurmConfig(PeftConfig):
    """Configuration of a SURM adapter (structured unrestricted-rank matrices).

    Placement ``"parallel"`` (LoRA-style) adds ``alpha * S(dropout(x))`` to each target layer's
    output ``W0 x + b0``; ``"serial"`` (adapter-style) maps the target layer's output ``h`` to
    ``h + act(alpha * S(dropout(h))) + beta`` with a square ``S`` and a bias ``beta``. S is
    the structured matrix named by ``structure``; its knobs are ``block_size``
    (circulant, skew_circulant), ``rank`` (ldr, low_rank), ``factors`` and ``terms``
    (kronecker). ``knob_pattern`` overrides knobs per module, e.g.
    ``{"intermediate.dense": {"block_size": 128}}`` (keys match module-name suffixes, as
    LoRA's ``rank_pattern``).

    A serial ``low_rank`` adapter with a nonlinearity is the Houlsby/Pfeiffer bottleneck
    adapter (``rank`` = bottleneck width): ``SurmConfig(structure="low_rank", rank=64,
    placement="serial")``.
    """

    structure: str = field(default="circulant", metadata={"help": f"One of {structured.names()}"})
    block_size: Optional[int] = field(default=None, metadata={"help": "circulant/skew_circulant block size"})
    rank: Optional[int] = field(default=None, metadata={"help": "ldr displacement rank / low_rank rank"})
    factors: Optional[Any] = field(default=None, metadata={"help": "kronecker ((a1, a2), (b1, b2))"})
    terms: Optional[int] = field(default=None, metadata={"help": "kronecker number of terms"})
    placement: Literal["parallel", "serial"] = field(default="parallel")
    alpha: float = field(default=1.0, metadata={"help": "scale of the structured update"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the structured branch's input"})
    activation: str = field(default="gelu", metadata={"help": f"serial only: one of {ACTIVATIONS}"})
    init: Literal["zero", "random"] = field(default="zero")
    fused: Optional[bool] = field(
        default=None,
        metadata={"help": "parallel only: None picks per layer and batch the faster of the fused "
                  "(W0 + alpha*S, one matmul) and plain (FFT) paths; True/False forces one"},
    )
    knob_pattern: dict = field(default_factory=dict, metadata={"help": "per-module knob overrides"})
    target_modules: Optional[Union[list[str], str]] = field(default=None)
    exclude_modules: Optional[Union[list[str], str]] = field(default=None)
    modules_to_save: Optional[list[str]] = field(default=None)
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None)
    layers_pattern: Optional[Union[list[str], str]] = field(default=None)
    bias: str = field(default="none", metadata={"help": f"one of {BIAS_MODES}"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = SURM
        structured.get(self.structure)  # unknown structure: ValueError listing the known ones
        if self.placement not in PLACEMENTS:
            raise ValueError(f"SurmConfig: placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"SurmConfig: activation must be one of {ACTIVATIONS} (each maps 0 to 0), got {self.activation!r}"
            )
        if self.init not in structured.INIT_MODES:
            raise ValueError(f"SurmConfig: init must be one of {structured.INIT_MODES}, got {self.init!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"SurmConfig: dropout must be in [0, 1), got {self.dropout}")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"SurmConfig: bias must be one of {BIAS_MODES}, got {self.bias!r}")
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if self.layers_pattern and not self.layers_to_transform:
            raise ValueError("SurmConfig: layers_pattern is only used together with layers_to_transform")
        self._check_knobs(self.knobs(), "")
        for pattern, overrides in self.knob_pattern.items():
            if not isinstance(overrides, dict):
                raise ValueError(f"SurmConfig: knob_pattern[{pattern!r}] must be a dict of knobs, got {overrides!r}")
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"SurmConfig: knob_pattern key {pattern!r} is not a valid regex: {err}") from None
            self._check_knobs(overrides, f" in knob_pattern[{pattern!r}]")

    def _check_knobs(self, knobs: dict[str, Any], where: str) -> None:
        accepted = structured.knob_names(self.structure)
        for knob in knobs:
            if knob not in accepted:
                raise ValueError(
                    f"SurmConfig: {knob!r}{where} is not a knob of structure {self.structure!r}; "
                    f"its knobs: {', '.join(accepted) or 'none'}"
                )

    def knobs(self) -> dict[str, Any]:
        """The structure's knobs that are set (the family's own defaults fill the rest)."""
        values = {"block_size": self.block_size, "rank": self.rank, "factors": self.factors, "terms": self.terms}
        return {k: v for k, v in values.items() if v is not None}

    def knobs_for(self, module_name: str) -> dict[str, Any]:
        """Knobs for the module called ``module_name``: the defaults, overridden by the first
        ``knob_pattern`` key that matches the end of the name."""
        knobs = self.knobs()
        for pattern, overrides in self.knob_pattern.items():
            if re.match(rf"(.*\.)?({pattern})$", module_name):
                knobs.update(overrides)
                break
        return knobs
