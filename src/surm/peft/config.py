"""``SurmConfig``: the PEFT configuration of a SURM adapter."""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from peft.config import PeftConfig
from peft.utils import CONFIG_NAME

from surm import structured

from .atomic_files import remove_orphans, replaced_atomically
from .model_card import public_model_id, write_model_card
from .scaling import SCALINGS

PLACEMENTS = ("parallel", "serial")
#: activations allowed in serial adapters: all satisfy act(0) = 0, so a zero-initialised
#: adapter starts exactly at the pretrained model.
ACTIVATIONS = ("gelu", "relu", "silu", "tanh", "identity")
BIAS_MODES = ("none", "all", "surm_only")
#: |alpha| above this draws a warning: with scaling="width" alpha=1 fits every width, so a
#: larger multiplier is most likely a typo, and it pushes half-precision activations to overflow
ALPHA_WARN_ABOVE = 1e4


#: LoRA keywords people carry over, and SURM's knob for the same thing
_LORA_KEYWORDS = {
    "r": "the size of a SURM update is set by structure= and its knobs: block_size= (circulant, "
    "skew_circulant), rank= (ldr, low_rank), factors=/terms= (kronecker)",
    "lora_alpha": "SURM's multiplier is alpha= (with scaling='width' by default, so alpha=1 fits every width)",
    "lora_dropout": "SURM's input dropout is dropout=",
}


class SurmPeftType(str):
    """The PEFT type tag of SURM configs: compares, hashes and serialises as ``"SURM"``, and has
    ``.value`` like the members of ``peft.PeftType`` (which has no SURM member to extend)."""

    @property
    def value(self) -> str:
        return str.__str__(self)

    def __str__(self) -> str:
        # as str() of a PeftType member, "PeftType.LORA": PEFT reads the name after the dot
        # (get_model_status); JSON, formatting and dict lookups still see "SURM"
        return f"PeftType.{self.value}"

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


SURM = SurmPeftType("SURM")


@dataclass
class SurmConfig(PeftConfig):
    """Configuration of a SURM adapter (structured unrestricted-rank matrices).

    Placement ``"parallel"`` (LoRA-style) adds ``alpha * S(dropout(x))`` to each target layer's
    output ``W0 x + b0``; ``"serial"`` (adapter-style) maps the target layer's output ``h`` to
    ``h + act(alpha * S(dropout(h))) + beta`` with a square ``S`` and a bias ``beta``. S is the
    structured matrix named by ``structure``, zero at initialisation, so training starts at
    the pretrained model. A serial ``low_rank`` adapter with a nonlinearity is the
    Houlsby/Pfeiffer bottleneck adapter (``rank`` = bottleneck width):
    ``SurmConfig(structure="low_rank", rank=64, placement="serial")``.

    Args:
        structure (`str`): the family of S: ``"circulant"``, ``"skew_circulant"``,
            ``"toeplitz"``, ``"symmetric_toeplitz"``, ``"kronecker"``, ``"ldr"`` or
            ``"low_rank"`` (see ``surm.structured.names()``). Default ``"circulant"``.
        block_size (`int`, *optional*): circulant and skew_circulant only. ``None`` (default):
            one zero-padded circulant of size max(out, in), max(out, in) parameters; ``b``: a
            grid of b x b circulant blocks, out*in/b parameters (b must divide both widths).
        rank (`int`, *optional*): ldr: the displacement rank r (2 r max(out, in) parameters,
            default 1); low_rank: the rank (r (out + in) parameters, default 8).
        factors (`((a1, a2), (b1, b2))`, *optional*): kronecker only: S = A (a1 x a2) ⊗
            B (b1 x b2) with a1 b1 = out and a2 b2 = in. ``None`` chooses them per layer
            (highest reachable rank first, then fewest parameters).
        terms (`int`, *optional*): kronecker only: the number K of Kronecker products summed
            (default 1).
        placement (`str`): ``"parallel"`` (default, LoRA-style, merges exactly) or
            ``"serial"`` (adapter-style, after the layer, S square over its output).
        alpha (`float`): the user's multiplier on the structured update (default 1.0); the
            update is ``alpha * s * S`` with ``s`` set by ``scaling``. It must be finite
            (nan and inf are refused); |alpha| above 1e4 (``ALPHA_WARN_ABOVE``) draws a warning.
        scaling (`str`): ``"width"`` (default): ``s = 1 / sqrt(max(m, n) E)`` per layer, with
            ``E`` the family's update energy (``surm.peft.scaling``), so that one learning
            rate (``surm.recommended_lr``) serves every family, knob, placement and layer
            width; ``"none"``: ``s = 1``, ``alpha`` alone (how adapters saved before the
            scale existed load).
        dropout (`float`): dropout on the input of the structured branch, in [0, 1) (default
            0). With dropout > 0 in training the layer takes the plain (unfused) path.
        activation (`str`): serial only: ``"gelu"`` (default), ``"relu"``, ``"silu"``,
            ``"tanh"`` or ``"identity"`` (each maps 0 to 0). Only ``"identity"`` merges.
        init (`str`): ``"zero"`` (default: S = 0, bilinear families zero one factor) or
            ``"random"`` (every parameter drawn, for experiments).
        fused (`bool`, *optional*): parallel only: ``None`` (default) picks per layer and batch
            the faster of the fused (``W0 + alpha S``, one matmul) and plain (FFT) paths;
            ``True``/``False`` forces one. Both compute the same function.
        knob_pattern (`dict`): per-module knob overrides, e.g.
            ``{"intermediate.dense": {"block_size": 128}}``; keys are regexes matched against
            the end of module names, as LoRA's ``rank_pattern`` (the first match wins).
        structure_pattern (`dict`): per-module structures, e.g. ``{"intermediate.dense":
            "low_rank"}``; keys are regexes matched against the end of module names (the first
            match wins), modules no key matches take ``structure``. The top-level knobs
            (``block_size``, ``rank``, ``factors``, ``terms``) belong to ``structure``: a module
            given another structure takes its knobs from ``knob_pattern`` only (the family's
            defaults fill the rest), and those must be knobs of that structure. ``surm.plan``
            writes one entry per module (``re.escape`` of its full name).
        target_modules (`list[str]` or `str`, *optional*): the layers to adapt: names (matched
            by suffix), a regex, or ``"all-linear"`` (every Linear/Conv1D but the output
            head). ``None``: the default targets of the model type (attention query and
            value for parallel adapters; the attention-output and FFN-output projections, the
            Houlsby positions, for serial ones). Linear, transformers Conv1D and 1x1 Conv2d
            layers are supported.
        exclude_modules (`list[str]` or `str`, *optional*): names or a regex to leave out.
        modules_to_save (`list[str]`, *optional*): modules trained in full and saved with the
            adapter, such as a new classification head (``["classifier"]``).
        layers_to_transform (`int` or `list[int]`, *optional*): only adapt layers with these
            indices in the layer list (see ``layers_pattern``).
        layers_pattern (`str` or `list[str]`, *optional*): the name of the layer list
            (``"layer"``, ``"layers"``, ``"h"``) when ``layers_to_transform`` is set.
        bias (`str`): which biases train: ``"none"`` (default), ``"all"`` or ``"surm_only"``
            (the biases of adapted layers).
    """

    structure: str = field(
        default="circulant", metadata={"help": f"The structured family of the update, one of {structured.names()}."}
    )
    block_size: int | None = field(
        default=None,
        metadata={"help": "circulant/skew_circulant: None for one zero-padded max(out, in) circulant, or b for a "
                  "grid of b x b blocks (b divides both widths; out*in/b parameters)."},
    )
    rank: int | None = field(
        default=None, metadata={"help": "ldr: displacement rank (default 1); low_rank: rank (default 8)."}
    )
    factors: Any | None = field(
        default=None,
        metadata={"help": "kronecker: ((a1, a2), (b1, b2)) with a1*b1 = out and a2*b2 = in; None chooses them."},
    )
    terms: int | None = field(default=None, metadata={"help": "kronecker: number of Kronecker terms (default 1)."})
    placement: Literal["parallel", "serial"] = field(
        default="parallel",
        metadata={"help": "'parallel' (LoRA-style, y = W0 x + b0 + alpha S x) or 'serial' (adapter-style, "
                  "h + act(alpha S h) + beta after the layer)."},
    )
    alpha: float = field(default=1.0, metadata={"help": "The user's multiplier on the structured update."})
    scaling: str = field(
        default="width",
        metadata={"help": f"One of {SCALINGS}: 'width' multiplies alpha by 1/sqrt(max(out, in) * E) per layer (E: "
                  "the family's update energy) so one learning rate fits every family and width; 'none': alpha alone."},
    )
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the structured branch's input, in [0, 1)."})
    activation: str = field(
        default="gelu", metadata={"help": f"Serial only: one of {ACTIVATIONS}; only 'identity' merges."}
    )
    init: Literal["zero", "random"] = field(
        default="zero", metadata={"help": "'zero' (S = 0: training starts at the pretrained model) or 'random'."}
    )
    fused: bool | None = field(
        default=None,
        metadata={"help": "Parallel only: None picks per layer and batch the faster of the fused "
                  "(W0 + alpha*S, one matmul) and plain (FFT) paths; True/False forces one."},
    )
    knob_pattern: dict = field(
        default_factory=dict,
        metadata={"help": "Per-module knob overrides: {module-name regex: {knob: value}}, matched against the "
                  "end of module names."},
    )
    structure_pattern: dict = field(
        default_factory=dict,
        metadata={"help": "Per-module structures: {module-name regex: structure}, matched against the end of "
                  "module names (the first match wins; other modules take 'structure'). The top-level knobs "
                  "belong to 'structure'; a module given another structure takes its knobs from knob_pattern."},
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Layers to adapt: names (suffix match), a regex, or 'all-linear'; None: the model "
                  "type's defaults for the placement."},
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names or a regex to leave out."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained in full and saved with the adapter, e.g. ['classifier']."}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Only adapt the layers with these indices."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Name of the layer list ('layer', 'layers', 'h') for layers_to_transform."}
    )
    bias: str = field(default="none", metadata={"help": f"Which biases train: one of {BIAS_MODES}."})

    def __new__(cls, *args: Any, **kwargs: Any):
        # LoRA's keywords would otherwise end in a bare "unexpected keyword argument"
        for key in kwargs:
            if key in _LORA_KEYWORDS:
                raise TypeError(f"SurmConfig has no {key!r} (a LoRA keyword): {_LORA_KEYWORDS[key]}")
        return super().__new__(cls)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = SURM
        self._check_types()
        structured.get(self.structure)  # unknown structure: ValueError listing the known ones
        if self.scaling not in SCALINGS:
            raise ValueError(
                f"SurmConfig: scaling must be one of {SCALINGS}, got {self.scaling!r} ('width' is the default; "
                f"'none' is alpha alone)"
            )
        if self.placement not in PLACEMENTS:
            raise ValueError(f"SurmConfig: placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"SurmConfig: activation must be one of {ACTIVATIONS} (each maps 0 to 0), got {self.activation!r}"
            )
        # "gelu" is the field's default and "identity" is what a parallel update does anyway
        if self.placement == "parallel" and self.activation not in ("gelu", "identity"):
            raise ValueError(
                f"SurmConfig: activation={self.activation!r} only applies to placement='serial' (the parallel "
                f"update alpha*S x has no activation); drop activation or set placement='serial'"
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
        self._check_knobs(self.knobs(), self.structure, "")
        for pattern, name in self.structure_pattern.items():
            _check_regex(pattern, "structure_pattern")
            try:
                structured.get(name)
            except ValueError as err:
                raise ValueError(f"SurmConfig: structure_pattern[{pattern!r}]: {err}") from None
        for pattern, overrides in self.knob_pattern.items():
            if not isinstance(overrides, dict):
                raise ValueError(
                    f"SurmConfig: knob_pattern[{pattern!r}] must be a dict of knobs, got {overrides!r}; "
                    f"for example knob_pattern={{{pattern!r}: {{'block_size': 64}}}}"
                )
            _check_regex(pattern, "knob_pattern")
            self._check_pattern_knobs(pattern, overrides)

    @classmethod
    def check_kwargs(cls, **kwargs: Any) -> dict[str, Any]:
        """PEFT's hook on a config read from a saved adapter: one saved before ``scaling``
        existed had ``alpha`` alone, so it loads with ``scaling="none"`` and computes what it
        computed then."""
        kwargs = super().check_kwargs(**kwargs)
        kwargs.setdefault("scaling", "none")
        return kwargs

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs: Any):
        """PEFT's read of ``adapter_config.json``, after checks that name the file: it must be JSON
        and a SURM config (not LoRA fields under an edited ``peft_type``). The folder is
        remembered (``_source``, not saved), so that a load from it checks the weights file
        against the model before any module is replaced (:mod:`.file_checks`). Temporaries an
        interrupted save left in the folder are removed (:mod:`.atomic_files`)."""
        folder = Path(pretrained_model_name_or_path) / (subfolder or "")
        local = (folder / CONFIG_NAME).is_file()
        if local:
            remove_orphans(folder)
            _check_saved_config(folder / CONFIG_NAME)
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        if isinstance(config, SurmConfig):
            config._source = folder if local else None
        return config

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """PEFT's save, with a base model loaded from a package folder recorded by its public
        Hub id, and the model card PEFT wrote beside it made a SURM adapter card. Both files are
        written under a temporary name and renamed into place, and temporaries an interrupted
        save left in the folder are removed first (:mod:`.atomic_files`)."""
        remove_orphans(save_directory)
        local = self.base_model_name_or_path
        self.base_model_name_or_path = public_model_id(local)
        try:
            with replaced_atomically(Path(save_directory) / CONFIG_NAME) as temporary:
                super().save_pretrained(str(temporary), **kwargs)
            write_model_card(save_directory, self)
        finally:
            # the live config keeps the local path: PEFT reads it again on the next save, and a
            # Hub id there would make it look the model up online
            self.base_model_name_or_path = local

    def _check_types(self) -> None:
        """Wrong types fail here, naming the field, the value and what is expected; nothing is
        coerced (``fused="false"`` is a truthy string, ``factors`` with 4.5 is no shape)."""
        _expect(self.structure, "structure", _is_str, f"a string, one of {structured.names()}")
        _expect(self.placement, "placement", _is_str, f"a string, one of {PLACEMENTS}")
        _expect(self.scaling, "scaling", _is_str, f"a string, one of {SCALINGS}")
        _expect(self.activation, "activation", _is_str, f"a string, one of {ACTIVATIONS}")
        _expect(self.init, "init", _is_str, f"a string, one of {structured.INIT_MODES}")
        _expect(self.bias, "bias", _is_str, f"a string, one of {BIAS_MODES}")
        _expect(self.inference_mode, "inference_mode", lambda v: isinstance(v, bool), "True or False")
        _expect(self.alpha, "alpha", _is_real, "a finite number, e.g. alpha=1.0")
        if not math.isfinite(self.alpha):
            raise ValueError(
                f"SurmConfig: alpha must be a finite number, got {self.alpha!r}: it would make every entry "
                f"of the update alpha * S infinite or NaN. Use a finite multiplier such as alpha=1.0."
            )
        if abs(self.alpha) > ALPHA_WARN_ABOVE:
            warnings.warn(
                f"SurmConfig: alpha={self.alpha!r} is above {ALPHA_WARN_ABOVE:g} in magnitude. With "
                f"scaling='width' alpha=1 fits every layer width; a multiplier this large overflows half-precision "
                f"activations and makes training diverge. Is it a typo (alpha=1e-30, or a learning rate)?",
                UserWarning,
                stacklevel=4,
            )
        _expect(self.dropout, "dropout", _is_real, "a number in [0, 1), e.g. dropout=0.1")
        _expect(self.fused, "fused", lambda v: v is None or isinstance(v, bool), "True, False or None (the default)")
        for knob in ("block_size", "rank", "terms"):
            _expect(getattr(self, knob), knob, lambda v: v is None or _is_positive_int(v), "a positive integer or None")
        _expect(self.factors, "factors", lambda v: v is None or _is_factors(v),
                "((a1, a2), (b1, b2)) of positive integers, or None")
        _expect(self.knob_pattern, "knob_pattern", lambda v: isinstance(v, dict),
                "a dict of module-name pattern -> dict of knobs, e.g. {'intermediate.dense': {'block_size': 64}}")
        _expect(self.structure_pattern, "structure_pattern",
                lambda v: isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, str) for k, x in v.items()),
                f"a dict of module-name pattern -> structure name, e.g. {{'intermediate.dense': 'low_rank'}}; "
                f"structures: {structured.names()}")
        for pattern, overrides in self.knob_pattern.items():
            if not isinstance(overrides, dict):
                continue  # reported with an example in __post_init__
            for knob, value in overrides.items():
                check = _is_factors if knob == "factors" else _is_positive_int
                _expect(value, f"knob_pattern[{pattern!r}][{knob!r}]", check, "a positive integer" if knob != "factors"
                        else "((a1, a2), (b1, b2)) of positive integers")
        _expect(self.target_modules, "target_modules", _is_names,
                "a list of module names, a regex string or 'all-linear'")
        _expect(self.exclude_modules, "exclude_modules", _is_names, "a list of module names or a regex string")
        _expect(self.modules_to_save, "modules_to_save", lambda v: v is None or _is_str_collection(v),
                "a list of module names, e.g. ['classifier']")
        _expect(self.layers_to_transform, "layers_to_transform",
                lambda v: v is None or _is_index(v) or (isinstance(v, (list, tuple)) and all(map(_is_index, v))),
                "a layer index or a list of layer indices")
        _expect(self.layers_pattern, "layers_pattern", _is_names, "a string or a list of strings, e.g. 'layer'")

    def _check_knobs(self, knobs: dict[str, Any], structure: str, where: str) -> None:
        accepted = structured.knob_names(structure)
        for knob in knobs:
            if knob not in accepted:
                raise ValueError(
                    f"SurmConfig: {knob!r}{where} is not a knob of structure {structure!r}; "
                    f"its knobs: {', '.join(accepted) or 'none'}"
                )

    def _check_pattern_knobs(self, pattern: str, overrides: dict[str, Any]) -> None:
        """The knobs of ``knob_pattern[pattern]`` against the structure of the modules it can
        reach: that of the same key in ``structure_pattern``, else any structure in use. Each
        module is checked exactly, by its name, when the adapter is built."""
        where = f" in knob_pattern[{pattern!r}]"
        if pattern in self.structure_pattern:
            self._check_knobs(overrides, self.structure_pattern[pattern], where)
            return
        in_use = list(dict.fromkeys([self.structure, *self.structure_pattern.values()]))
        if len(in_use) == 1:
            self._check_knobs(overrides, self.structure, where)
            return
        for knob in overrides:
            if not any(knob in structured.knob_names(name) for name in in_use):
                raise ValueError(
                    f"SurmConfig: {knob!r}{where} is not a knob of any structure this config uses "
                    f"({', '.join(in_use)}); "
                    + "; ".join(f"{name}: {', '.join(structured.knob_names(name)) or 'none'}" for name in in_use)
                )

    def knobs(self) -> dict[str, Any]:
        """The structure's knobs that are set (the family's own defaults fill the rest)."""
        values = {"block_size": self.block_size, "rank": self.rank, "factors": self.factors, "terms": self.terms}
        return {k: v for k, v in values.items() if v is not None}

    def structure_for(self, module_name: str) -> str:
        """The structure of the module called ``module_name``: that of the first
        ``structure_pattern`` key that matches the end of the name, else ``structure``."""
        for pattern, name in self.structure_pattern.items():
            if _matches_end(pattern, module_name):
                return name
        return self.structure

    def knobs_for(self, module_name: str) -> dict[str, Any]:
        """Knobs for the module called ``module_name``: the top-level knobs if the module has
        the config's ``structure`` (none otherwise), overridden by the first ``knob_pattern``
        key that matches the end of the name."""
        knobs = self.knobs() if self.structure_for(module_name) == self.structure else {}
        for pattern, overrides in self.knob_pattern.items():
            if _matches_end(pattern, module_name):
                knobs.update(overrides)
                break
        return knobs


def _check_saved_config(path: Path) -> None:
    """A saved SURM config must be a JSON object without LoRA's fields."""
    try:
        saved = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"SurmConfig: {path} is not JSON ({err}): the file is damaged or was overwritten. Save the adapter again."
        ) from None
    if not isinstance(saved, dict):
        raise ValueError(f"SurmConfig: {path} holds a JSON {type(saved).__name__}, not an adapter config (an object)")
    lora = sorted(set(saved) & {"r", "lora_alpha", "lora_dropout"})
    if lora:
        raise ValueError(
            f"SurmConfig: {path} says peft_type {saved.get('peft_type')!r} but holds LoRA's fields "
            f"({', '.join(lora)}): it is not a SURM adapter config. If these are LoRA weights, its peft_type "
            f"should be 'LORA'."
        )


def _matches_end(pattern: str, module_name: str) -> bool:
    """Whether regex ``pattern`` matches the end of ``module_name`` at a name boundary."""
    return re.match(rf"(.*\.)?({pattern})$", module_name) is not None


def _check_regex(pattern: str, field_name: str) -> None:
    try:
        re.compile(pattern)
    except re.error as err:
        raise ValueError(f"SurmConfig: {field_name} key {pattern!r} is not a valid regex: {err}") from None


def _expect(value: Any, name: str, ok, expected: str) -> None:
    if not ok(value):
        raise ValueError(f"SurmConfig: {name} must be {expected}; got {value!r} ({type(value).__name__})")


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_str_collection(value: Any) -> bool:
    return isinstance(value, (list, tuple, set)) and all(isinstance(v, str) for v in value)


def _is_names(value: Any) -> bool:
    """None, one string (a regex, or 'all-linear') or a collection of strings."""
    return value is None or isinstance(value, str) or _is_str_collection(value)


def _is_factors(value: Any) -> bool:
    """((a1, a2), (b1, b2)) of positive integers (lists, as JSON gives them, too)."""
    return (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(
            isinstance(pair, (list, tuple)) and len(pair) == 2 and all(map(_is_positive_int, pair)) for pair in value
        )
    )
