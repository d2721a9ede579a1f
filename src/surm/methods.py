"""Fine-tuning methods by name: parse a compact method string and apply it to a model.

Method strings (``kind[:positional][:key=value]...``)::

    full                         full fine-tuning: every parameter trains
    head                         the classification head only (linear probe on the frozen model)
    bitfit                       every bias (and the head)                         (Ben Zaken et al.)
    lora:R                       PEFT LoRA rank R on the adapted layers, lora_alpha=8, no dropout
    houlsby:R                    bottleneck adapters of width R after the attention output and the
                                 FFN output of every block: SURM serial low_rank + relu
    pfeiffer:R                   the same, after the FFN output only
    c3a:B                        PEFT C3A (block-circulant, block size B) on the LoRA positions
    surm:STRUCTURE[:PLACEMENT]   SURM with a structured matrix; PLACEMENT parallel (default, every
                                 linear map of each block) or serial (adapter positions, no
                                 bottleneck, gelu)
    lokr:R                       PEFT LoKr on the LoRA positions: dW = w1 kron (w2_a w2_b), w2 of
                                 rank R (a full w2 once R reaches half its larger side), scale
                                 alpha / R with alpha = R (so 1) unless the alpha knob is given
    kadaptation:R                KAdaptation (He et al.) as PEFT builds it: exactly lokr:R, one
                                 Kronecker term w1 kron (u v^T) with rank-R u v^T per layer.  It is
                                 not the paper's adapter: that one sums n terms A_i kron (u_i v_i^T)
                                 and shares the small A_i across layers; here w1 is one per layer
                                 and its size comes from LoKr's near-square split of the widths
    fourierft:N                  PEFT FourierFT on the LoRA positions: N trainable spectral
                                 coefficients per layer at fixed random frequencies, scaling 150
                                 (PEFT's default; the alpha knob replaces it).  Linear layers only
    vera:R                       PEFT VeRA rank R on the LoRA positions: frozen random A (R x in)
                                 and B (out x R) shared by all layers (sized for the largest,
                                 sliced for smaller ones); each layer trains d (R) and b (out)
    lorafix:R                    LoRA-FIX: lora:R with every lora_A frozen at its random init, so
                                 only the B factors train (half of LoRA's adapter parameters when
                                 in = out)
    adapterdrop:R                AdapterDrop: houlsby:R without the adapters of the lowest
                                 ``drop`` blocks (default: half the blocks, rounded down, e.g. 3 of
                                 MiniLM's 6, 8 of EfficientNet-Lite0's 16); adapters outside the
                                 blocks (EfficientNet's head convolution) stay
    lntuning                     PEFT LN tuning: a trainable copy of every normalisation layer
                                 (weight and bias; BERT's LayerNorms, EfficientNet's BatchNorms)

Knobs follow as ``key=value``: ``block_size``, ``rank``, ``terms``, ``factors``, ``scaling``
(SURM: ``width`` by default, ``none`` for alpha alone), ``targets`` (``qv``: attention query and
value, the default of the LoRA-family methods; ``all``: every linear map of each block, the
default of parallel SURM), ``alpha`` (SURM's multiplier, LoRA's lora_alpha, LoKr's alpha,
FourierFT's scaling), ``dropout``, ``activation``
(serial), ``drop`` (AdapterDrop).  Examples: ``lora:8``, ``surm:circulant``,
``surm:circulant:block_size=128``, ``surm:ldr:rank=2``, ``surm:toeplitz:serial``, ``houlsby:32``,
``pfeiffer:24``, ``c3a:64``, ``fourierft:1000``, ``adapterdrop:32:drop=2``.

A method string is parsed once, where it enters (the command line, a preset), into a
:class:`Method`; everything downstream takes the :class:`Method`.

Every method also trains the classification head (``modules_to_save``).  Where adapters go is
given by a :class:`Profile`: :data:`TEXT` (BERT-like transformers: every linear map of each
block for parallel SURM, query/value for the LoRA family unless ``targets=all``,
attention-output and FFN-output projections for serial adapters) or :data:`IMAGE`
(EfficientNet-Lite0: every 1x1 convolution); :data:`PROFILES` gives the profile of a data
set's modality (:func:`surm.data.modality`).  PEFT's C3A, FourierFT and VeRA adapt Linear
layers only, so they refuse :data:`IMAGE`, whose targets are convolutions.
"""

from __future__ import annotations

import ast
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import peft
import torch
from torch import nn

import surm
from surm import structured

__all__ = [
    "DEFAULT_LR",
    "IMAGE",
    "KINDS",
    "PROFILES",
    "TEXT",
    "Method",
    "Profile",
    "apply",
    "count_blocks",
    "count_trainable",
    "default_head_lr",
    "default_lr",
    "parse",
    "peft_config",
    "plain_pointwise_convs",
]

KINDS = ("full", "head", "bitfit", "lora", "houlsby", "pfeiffer", "c3a", "surm",
         "lokr", "kadaptation", "fourierft", "vera", "lorafix", "adapterdrop", "lntuning")
_NEEDS_RANK = ("lora", "houlsby", "pfeiffer", "lokr", "kadaptation", "vera", "lorafix", "adapterdrop")
_NO_KNOBS = ("full", "head", "bitfit", "lntuning")
_KNOBS = ("block_size", "rank", "terms", "factors", "alpha", "dropout", "activation", "drop", "targets", "scaling")
#: The knobs a kind takes, where it takes only some (the others, LoRA and SURM, take any of
#: ``_KNOBS`` but ``drop``).
_KIND_KNOBS = {
    "lokr": ("alpha", "targets"), "kadaptation": ("alpha", "targets"), "fourierft": ("alpha", "targets"),
    "vera": ("dropout", "targets"), "lorafix": ("alpha", "dropout", "targets"), "c3a": ("targets",),
    "houlsby": ("alpha", "dropout", "activation"), "pfeiffer": ("alpha", "dropout", "activation"),
    "adapterdrop": ("drop", "alpha", "dropout", "activation"),
}
#: Values of the ``targets`` knob: ``qv`` the attention query and value (LoRA's usual
#: setup, ``Profile.lora``), ``all`` every linear map of each block (``Profile.block``).
TARGETS = ("qv", "all")
#: Kinds whose size is written positionally but kept as a knob.
_POSITIONAL_KNOB = {"c3a": "block_size", "fourierft": "n_frequency"}

#: Default learning rates (AdamW, linear schedule, 6 % warm-up, batch 16), from the sweep in
#: docs/lr_sweep.md.  Keys: a method kind, "surm:<placement>", or "surm:<structure>" (parallel)
#: and "surm:<structure>:serial" for a family that wants its own.
DEFAULT_LR: dict[str, float] = {
    "full": 1e-4,
    "head": 1e-1,
    "bitfit": 3e-3,  # the biases; the head trains at "head" (default_head_lr)
    "lora": 3e-3,
    "houlsby": 3e-3,
    "pfeiffer": 3e-3,
    # not swept before the fair re-runs, which choose each on validation from x1/3, x1, x3 of
    # these: PEFT's docs for C3A suggest rates near 1e-1, FourierFT and VeRA want large ones
    "c3a": 1e-1,
    "lokr": 3e-3,
    "fourierft": 3e-2,
    "vera": 1e-2,
    "lorafix": 3e-3,
    "lntuning": 3e-3,  # the norm layers; the head trains at "head" (default_head_lr), as for BitFit
    # SURM: surm.recommended_lr of the method's config (default_lr), unless a profile overrides it
}


@dataclass(frozen=True)
class Method:
    """A parsed method string (see the module docstring)."""

    kind: str
    structure: str | None = None
    placement: str = "parallel"
    rank: int | None = None
    knobs: tuple[tuple[str, Any], ...] = ()

    @property
    def name(self) -> str:
        """The canonical method string; ``parse(m.name) == m``."""
        parts = [self.kind]
        knobs = self.knobs
        if self.kind == "surm":
            parts.append(self.structure)
            if self.placement != "parallel":
                parts.append(self.placement)
        elif self.kind in _POSITIONAL_KNOB:  # the block size / frequency count is written positionally
            key = _POSITIONAL_KNOB[self.kind]
            parts.append(str(self.knob(key)))
            knobs = tuple((k, v) for k, v in knobs if k != key)
        elif self.rank is not None:
            parts.append(str(self.rank))
        parts += [f"{k}={_show(v)}" for k, v in knobs]
        return ":".join(parts)

    def __str__(self) -> str:
        return self.name

    @property
    def family(self) -> str:
        """The SURM structure (``circulant``) or the kind (``lora``): what plots colour by."""
        return self.structure if self.kind == "surm" else self.kind

    @property
    def label(self) -> str:
        """A short human label, e.g. ``SURM circulant (serial)`` or ``LoRA r=8``."""
        knobs = "".join(f" {k}={_show(v)}" for k, v in self.knobs)
        if self.kind == "surm":
            return f"SURM {self.structure}" + (" (serial)" if self.placement == "serial" else "") + knobs
        names = {"full": "full fine-tuning", "head": "head only", "bitfit": "BitFit", "lora": "LoRA",
                 "houlsby": "Houlsby adapter", "pfeiffer": "Pfeiffer adapter", "c3a": "C3A", "lokr": "LoKr",
                 "kadaptation": "KAdaptation", "fourierft": "FourierFT", "vera": "VeRA", "lorafix": "LoRA-FIX",
                 "adapterdrop": "AdapterDrop", "lntuning": "LN tuning"}
        rank = f" r={self.rank}" if self.rank is not None else ""
        if self.kind == "fourierft":
            rest = "".join(f" {k}={_show(v)}" for k, v in self.knobs if k != "n_frequency")
            return f"FourierFT n={self.knob('n_frequency')}" + rest
        return names[self.kind] + rank + knobs

    @property
    def lr_keys(self) -> tuple[str, ...]:
        """Keys of :data:`DEFAULT_LR` that apply, most specific first: ``lora``, or
        ``surm:kronecker`` / ``surm:kronecker:serial`` then ``surm:parallel`` / ``surm:serial``.
        ``adapterdrop`` falls back on ``houlsby`` (the same adapters, fewer of them) and
        ``kadaptation`` on ``lokr`` (the same adapter)."""
        if self.kind in _LR_FALLBACK:
            return (self.kind, _LR_FALLBACK[self.kind])
        if self.kind != "surm":
            return (self.kind,)
        own = f"surm:{self.structure}" + (":serial" if self.placement == "serial" else "")
        return (own, f"surm:{self.placement}")

    def knob(self, key: str, default: Any = None) -> Any:
        return dict(self.knobs).get(key, default)


_LR_FALLBACK = {"adapterdrop": "houlsby", "kadaptation": "lokr"}


@dataclass(frozen=True)
class Profile:
    """Where a model's head is and where adapters go.

    ``parallel`` (LoRA and parallel SURM), ``serial`` (Houlsby positions), ``ffn_out``
    (Pfeiffer position) and ``lora`` (LoRA, C3A, LoKr, FourierFT, VeRA) are PEFT
    ``target_modules`` (a list of suffixes or a regex); ``None`` means SURM's per-model-type
    defaults. ``norms`` are the normalisation layers LN tuning trains. ``blocks`` is the name of
    the module list that holds the model's blocks (BERT's ``layer``), whose lowest ones
    AdapterDrop leaves without adapters; None: the model has none. ``convolutional``: the
    adapter targets are convolutions, which C3A, FourierFT and VeRA cannot adapt. ``head`` is the
    classification head's module name (None: a model without one; adapters then save no
    module). ``lr`` overrides :data:`DEFAULT_LR` entries. ``block`` is every linear map of each
    block (BERT: query, key, value, attention output, FFN in and out), the ``targets=all`` of
    the LoRA-family methods.
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


TEXT = Profile(head="classifier", ffn_out=r".*layer\.\d+\.output\.dense", lora=("query", "value"),
               norms=("LayerNorm",), blocks="layer")

_CONV1X1 = r".*(_expand_conv|_project_conv|_conv_head)"
#: Learning rates for EfficientNet-Lite0, chosen on validation (MNIST-5k and digits, the vision
#: experiment's grid default x 1/3, 1, 3; docs/results.md): LoRA 3e-3 (the digits sweep, again
#: chosen on digits), full fine-tuning 3.3e-4 and parallel SURM 1e-2, a third of
#: surm.recommended_lr: every family did best there on both data sets, since the width scale does
#: not absorb the gain of the BatchNorm behind each 1x1 convolution.
IMAGE = Profile(head="_fc", parallel=_CONV1X1, serial=_CONV1X1, ffn_out=r".*_project_conv", lora=_CONV1X1,
                lr={"full": 3.3e-4, "head": 1e-2, "lora": 3e-3, "surm:parallel": 1e-2}, block=_CONV1X1,
                norms=r"(.*\.)?_bn\d+", blocks="_blocks", convolutional=True)

#: The profile of each data modality (:func:`surm.data.modality`).
PROFILES: dict[str, Profile] = {"text": TEXT, "image": IMAGE}
#: PEFT methods that adapt nn.Linear only (refused on a convolutional profile)
LINEAR_ONLY = ("c3a", "fourierft", "vera")


def parse(text: str | Method) -> Method:
    """Parse a method string such as ``"surm:circulant:block_size=128"`` (module docstring);
    a :class:`Method` is returned as it is.

    Raises ValueError with the grammar on anything it does not understand.
    """
    if isinstance(text, Method):
        return text
    parts = [p.strip() for p in str(text).strip().split(":")]
    kind = parts[0].lower()
    if kind not in KINDS:
        raise ValueError(f"unknown method {text!r}: it must start with one of {', '.join(KINDS)}. {_GRAMMAR}")
    positional = [p for p in parts[1:] if "=" not in p]
    knobs: dict[str, Any] = {}
    for part in parts[1:]:
        if "=" in part:
            key, value = (s.strip() for s in part.split("=", 1))
            if key not in _KNOBS:
                raise ValueError(f"method {text!r}: unknown knob {key!r}; knobs: {', '.join(_KNOBS)}")
            knobs[key] = _value(value)
    structure, placement, rank = None, "parallel", None
    if kind == "surm":
        if not positional:
            raise ValueError(f"method {text!r}: name a structure, e.g. surm:circulant; one of {structured.names()}")
        structure = positional.pop(0)
        structured.get(structure)  # ValueError listing the known structures
        if positional:
            placement = positional.pop(0)
            if placement not in surm.peft.PLACEMENTS:
                raise ValueError(f"method {text!r}: placement must be one of {surm.peft.PLACEMENTS}")
    elif kind in _NEEDS_RANK:
        if not positional or not positional[0].isdigit() or int(positional[0]) < 1:
            raise ValueError(f"method {text!r}: give a positive rank, e.g. {kind}:8")
        rank = int(positional.pop(0))
    if kind in _NO_KNOBS and knobs:
        raise ValueError(f"method {text!r}: {kind} takes no knobs")
    allowed = _KIND_KNOBS.get(kind, tuple(k for k in _KNOBS if k != "drop"))
    for key in knobs:
        if key not in allowed:
            raise ValueError(f"method {text!r}: {kind} takes no knob {key!r}; its knobs: {', '.join(allowed)}")
    if "targets" in knobs and knobs["targets"] not in TARGETS:
        raise ValueError(f"method {text!r}: targets must be one of {TARGETS} (qv: attention query and value; "
                         f"all: every linear map of each block)")
    if "targets" in knobs and placement == "serial":
        raise ValueError(f"method {text!r}: targets is for parallel placements; serial adapters sit at the "
                         f"Houlsby positions")
    if "scaling" in knobs and kind != "surm":
        raise ValueError(f"method {text!r}: scaling is a SURM knob")
    if "drop" in knobs and not (isinstance(knobs["drop"], int) and knobs["drop"] >= 0):
        raise ValueError(f"method {text!r}: drop is a number of blocks, 0 or more")
    if kind in _POSITIONAL_KNOB:
        what, example = {"c3a": ("block size", "c3a:64"), "fourierft": ("number of frequencies", "fourierft:1000")}[kind]
        if not positional or not positional[0].isdigit() or int(positional[0]) < 1:
            raise ValueError(f"method {text!r}: give a positive {what}, e.g. {example}")
        knobs[_POSITIONAL_KNOB[kind]] = int(positional.pop(0))
    if positional:
        raise ValueError(f"method {text!r}: unexpected part(s) {positional}. {_GRAMMAR}")
    return Method(kind, structure, placement, rank, tuple(sorted(knobs.items())))


_GRAMMAR = (
    "Method strings: full | head | bitfit | lora:R | houlsby:R | pfeiffer:R | c3a:B | "
    "surm:STRUCTURE[:parallel|serial] | lokr:R | kadaptation:R | fourierft:N | vera:R | lorafix:R | "
    "adapterdrop:R[:drop=K] | lntuning, with optional :key=value knobs (e.g. surm:ldr:rank=2)."
)


def _value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _show(value: Any) -> str:
    return str(value).replace(" ", "")


def default_lr(method: Method | str, profile: Profile | None = None) -> float:
    """The default learning rate of a method: ``profile.lr``, else :data:`DEFAULT_LR`, else,
    for SURM, :func:`surm.recommended_lr` of its config."""
    method = parse(method)
    for table in (profile.lr if profile is not None else {}, DEFAULT_LR):
        for key in method.lr_keys:
            if key in table:
                return table[key]
    if method.kind == "surm":
        from surm.peft.recommend import recommended_lr

        return recommended_lr(surm.SurmConfig(structure=method.structure, placement=method.placement,
                                              scaling=method.knob("scaling", "width")))
    raise ValueError(f"no default learning rate for {method.name} (none was swept for {method.kind}); "
                     f"give one: --lr, or lr in the preset")


def default_head_lr(method: Method | str, profile: Profile | None = None) -> float | None:
    """The default learning rate of the classification head when it differs from the method's
    (None: the head trains at the method's rate).

    The head trains at the method's rate, the same rule for every method (a head at head-only's
    1e-1 cost LoRA r=8 0.9 and SURM circulant 1.0 validation points on Rotten Tomatoes), except
    where the method itself trains only biases or norm layers: BitFit and LN tuning train their
    head at head-only's rate, since at any single rate from 1e-3 to 1e-1, either the new head
    learns too slowly or the biases move too far, and every BitFit run stayed on the
    majority-class plateau (docs/lr_sweep.md).
    """
    method = parse(method)
    return default_lr("head", profile) if method.kind in ("bitfit", "lntuning") else None


def apply(model: nn.Module, method: Method | str | peft.PeftConfig, profile: Profile = TEXT) -> nn.Module:
    """Make ``model`` ready to fine-tune with ``method``; returns the model to train.

    ``full``, ``head`` and ``bitfit`` set ``requires_grad`` on ``model`` itself and return it;
    the adapter methods return a ``peft.PeftModel`` wrapping it (whose head is a trainable copy,
    ``modules_to_save``). ``lorafix`` then freezes every ``lora_A``; ``adapterdrop`` counts the
    model's blocks (``profile.blocks``) to drop the lowest. A PEFT config in place of a method
    is applied as it is.
    """
    if isinstance(method, peft.PeftConfig):
        return _wrap(model, method)
    method = parse(method)
    if method.kind in ("full", "head", "bitfit"):
        head = _find(model, profile.head) if profile.head is not None else None
        for name, param in model.named_parameters():
            trainable = (
                method.kind == "full"
                or (head is not None and name.startswith(head + "."))
                or (method.kind == "bitfit" and name.rsplit(".", 1)[-1] == "bias")
            )
            param.requires_grad_(trainable)
        return model
    wrapped = _wrap(model, peft_config(method, profile, model=model))
    if method.kind == "lorafix":  # LoRA-FIX: A stays at its random initialisation, B alone trains
        for name, param in wrapped.named_parameters():
            if ".lora_A." in name:
                param.requires_grad_(False)
    return wrapped


def _wrap(model: nn.Module, config: peft.PeftConfig) -> nn.Module:
    with warnings.catch_warnings():  # peft asks transformers >= 5 a deprecated question
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        if isinstance(config, peft.LNTuningConfig):  # PEFT asks every norm layer for in/out widths, and warns
            warnings.filterwarnings("ignore", message="Unsupported layer type", category=UserWarning)
        return peft.get_peft_model(model, config)


def peft_config(method: Method | str, profile: Profile = TEXT, model: nn.Module | None = None) -> peft.PeftConfig | None:
    """The PEFT config of an adapter method on ``profile``'s targets; None for ``full``,
    ``head`` and ``bitfit``, which add no adapter.

    ``model`` is read by ``adapterdrop`` only, for its number of blocks: needed for the default
    ``drop`` (half of them) and to check a given one; without it, ``drop`` must be given.
    ``lorafix`` gives plain LoRA's config: freezing ``lora_A`` is :func:`apply`'s work.
    Raises ValueError for C3A, FourierFT and VeRA on a convolutional profile (PEFT adapts Linear
    layers only) and for AdapterDrop on a profile without blocks.
    """
    method = parse(method)
    if method.kind in ("full", "head", "bitfit"):
        return None
    knobs = dict(method.knobs)
    save = [profile.head] if profile.head is not None else None
    where = knobs.pop("targets", None)
    lora_targets = _targets(profile.block if where == "all" else profile.lora)
    if method.kind in LINEAR_ONLY and profile.convolutional:
        raise ValueError(f"{method.name}: PEFT's {method.label.split()[0]} adapts Linear layers only, and this "
                         f"profile's targets are convolutions (EfficientNet's 1x1 convolutions); use lora, lorafix, "
                         f"lokr or surm there")
    if method.kind in ("lora", "lorafix"):
        return peft.LoraConfig(
            r=method.rank, lora_alpha=knobs.get("alpha", 8), lora_dropout=knobs.get("dropout", 0.0),
            target_modules=lora_targets, modules_to_save=save,
        )
    if method.kind == "c3a":
        return peft.C3AConfig(block_size=knobs["block_size"], target_modules=lora_targets, modules_to_save=save)
    if method.kind in ("lokr", "kadaptation"):
        return peft.LoKrConfig(
            r=method.rank, alpha=knobs.get("alpha", method.rank), decompose_both=False,
            target_modules=lora_targets, modules_to_save=save,
        )
    if method.kind == "fourierft":
        return peft.FourierFTConfig(
            n_frequency=knobs["n_frequency"], scaling=float(knobs.get("alpha", 150.0)),
            target_modules=lora_targets, modules_to_save=save,
        )
    if method.kind == "vera":
        return peft.VeraConfig(
            r=method.rank, vera_dropout=knobs.get("dropout", 0.0), target_modules=lora_targets, modules_to_save=save,
        )
    if method.kind == "lntuning":
        norms = profile.norms if isinstance(profile.norms, str) else list(profile.norms)
        return peft.LNTuningConfig(target_modules=norms, modules_to_save=save)
    if method.kind in ("houlsby", "pfeiffer", "adapterdrop"):
        targets = profile.ffn_out if method.kind == "pfeiffer" else profile.serial
        exclude = _lowest_blocks(method, profile, model, knobs.pop("drop", None)) if method.kind == "adapterdrop" else None
        return surm.SurmConfig(  # the classic bottleneck adapter: alpha alone, no width scale
            structure="low_rank", rank=method.rank, placement="serial", scaling="none",
            activation=knobs.pop("activation", "relu"), target_modules=targets, modules_to_save=save,
            exclude_modules=exclude, **knobs,
        )
    if method.placement == "serial":
        targets = profile.serial
    else:
        targets = {None: profile.parallel, "all": _targets(profile.block), "qv": lora_targets}[where]
    return surm.SurmConfig(
        structure=method.structure, placement=method.placement, target_modules=targets,
        modules_to_save=save, **knobs,
    )


def _targets(targets: Any) -> Any:
    """A profile's targets as PEFT takes them: a regex string, or a list of names."""
    return targets if isinstance(targets, str) or targets is None else list(targets)


def _lowest_blocks(method: Method, profile: Profile, model: nn.Module | None, drop: int | None) -> str | None:
    """AdapterDrop's ``exclude_modules``: a regex for every module inside the lowest ``drop``
    blocks (default: half of the model's blocks, rounded down); None when it drops none."""
    if profile.blocks is None:
        raise ValueError(f"{method.name}: this profile names no blocks (Profile.blocks) to drop adapters from")
    n_blocks = count_blocks(model, profile) if model is not None else None
    if drop is None:
        if n_blocks is None:
            raise ValueError(f"{method.name}: the default drop is half the model's blocks; pass the model, or "
                             f"give drop=K")
        drop = n_blocks // 2
    if n_blocks is not None and drop >= n_blocks:
        raise ValueError(f"{method.name}: drop={drop} leaves no block of {n_blocks} with adapters; "
                         f"drop at most {n_blocks - 1}")
    if drop == 0:
        return None
    lowest = "|".join(str(i) for i in range(drop))
    return rf"(.*\.)?{re.escape(profile.blocks)}\.({lowest})\..*"


def count_blocks(model: nn.Module, profile: Profile = TEXT) -> int:
    """Number of blocks of ``model``: the length of its module list called ``profile.blocks``
    (BERT's ``bert.encoder.layer``, EfficientNet's ``_blocks``)."""
    lengths = {len(module) for name, module in model.named_modules()
               if profile.blocks is not None and (name == profile.blocks or name.endswith("." + profile.blocks))
               and isinstance(module, (nn.ModuleList, nn.Sequential))}
    if len(lengths) != 1:
        found = "none" if not lengths else f"lists of {sorted(lengths)} blocks"
        raise ValueError(f"{type(model).__name__}: expected one module list called {profile.blocks!r} holding the "
                         f"blocks, found {found}")
    return lengths.pop()


def plain_pointwise_convs(model: nn.Module) -> nn.Module:
    """Replace every 1x1, stride-1, ungrouped convolution whose class is a *subclass* of
    ``nn.Conv2d`` by a plain ``nn.Conv2d`` with the same weights, in place; returns ``model``.

    EfficientNet-Lite's ``Conv2dDynamicSamePadding`` pads nothing at 1x1 / stride 1, so the
    swap changes no output, but PEFT's LoRA builds its factors with the base layer's own class
    and positional arguments, which that subclass reads differently (padding as dilation).
    """
    for name, module in list(model.named_modules()):
        if (
            type(module) is not nn.Conv2d
            and isinstance(module, nn.Conv2d)
            and module.kernel_size == (1, 1)
            and tuple(module.stride) == (1, 1)
            and module.groups == 1
        ):
            plain = nn.Conv2d(module.in_channels, module.out_channels, 1, bias=module.bias is not None)
            plain.to(module.weight.dtype).to(module.weight.device)
            plain.load_state_dict(module.state_dict())
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, plain)
    return model


def _find(model: nn.Module, name: str) -> str:
    """Full name of the module called ``name`` (or ending in ``.name``)."""
    for full, _ in model.named_modules():
        if full == name or full.endswith("." + name):
            return full
    raise ValueError(f"no module called {name!r} in {type(model).__name__} (the classification head)")


def count_trainable(model: nn.Module, exclude_head: str | None = None) -> int:
    """Number of trainable parameters; with ``exclude_head``, those of modules whose name
    contains that component are left out (for PEFT, both the original head and its copy)."""
    total = 0
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if exclude_head and re.search(rf"(^|\.){re.escape(exclude_head)}(\.|$)", name):
            continue
        total += param.numel()
    return total


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors of ``model`` (detached, contiguous), by parameter name."""
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
