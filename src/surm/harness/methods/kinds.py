"""One record per method kind: everything the harness knows of a fine-tuning method.

A :class:`Kind` holds the kind's name and label, its grammar (a positional size, the knobs it
takes), its default learning rate, which layers it can adapt, and how it builds its PEFT config
(or, for the kinds that add no adapter, which parameters train). Adding a baseline is adding one
record to :data:`KINDS`.

Learning rates (AdamW, linear schedule, 6 % warm-up, batch 16) come from the sweep in
docs/lr_sweep.md; the fair re-runs choose each on validation from x1/3, x1, x3 of these. SURM's
rate is :func:`surm.recommended_lr` of the method's config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import peft
    from torch import nn

    from surm.harness.models.profiles import Profile

#: A parsed method (:class:`~surm.harness.methods.grammar.Method`, which reads these records).
Method = Any

__all__ = ["KINDS", "KNOBS", "Kind"]

#: Every knob a method string can carry (``key=value``); each kind takes some of them.
KNOBS = ("block_size", "rank", "terms", "factors", "alpha", "dropout", "activation", "drop", "targets", "scaling")
#: Values of the ``targets`` knob: ``qv`` the attention query and value (LoRA's usual setup,
#: ``Profile.lora``), ``all`` every linear map of each block (``Profile.block``).
TARGETS = ("qv", "all")

Builder = Callable[[Any, dict, "Profile", "nn.Module | None"], "peft.PeftConfig"]


@dataclass(frozen=True)
class Kind:
    """A method kind (see the module docstring).

    Args:
        name: the first part of its method strings (``lora``).
        title: how labels start (``LoRA``).
        grammar: its method string in the grammar (``lora:R``).
        size: the positional size: ``"rank"`` (:attr:`Method.rank`), the name of the knob it is
            kept as (``block_size`` for C3A), or None (no size).
        size_words: ``(what, example)`` for the error when the size is missing.
        size_label: how the label names a size kept as a knob (FourierFT's ``n``); None: as
            the other knobs.
        knobs: the ``key=value`` knobs it takes.
        lr: its default learning rate; None: another kind's (``lr_from``) or SURM's rule.
        lr_from: the kind whose rate it falls back on (AdapterDrop on Houlsby's).
        head_lr_from: the kind whose rate its classification head trains at (None: its own).
        linear_only: adapts ``nn.Linear`` only (refused on a convolutional profile).
        build: ``build(method, knobs, profile, model)`` -> its PEFT config (``knobs``: the
            method's knobs without ``targets``, ``model`` for kinds that count blocks); None for
            the kinds that add no adapter.
        trains: for kinds without an adapter, ``trains(name, in_head)``: whether the parameter
            called ``name`` trains (``in_head``: it lies in the classification head).
        freeze: parameter-name parts frozen after wrapping (LoRA-FIX's ``.lora_A.``).
    """

    name: str
    title: str
    grammar: str
    size: str | None = None
    size_words: tuple[str, str] | None = None
    size_label: str | None = None
    knobs: tuple[str, ...] = ()
    lr: float | None = None
    lr_from: str | None = None
    head_lr_from: str | None = None
    linear_only: bool = False
    build: Builder | None = None
    trains: Callable[[str, bool], bool] | None = None
    freeze: tuple[str, ...] = ()

    @property
    def adds_adapter(self) -> bool:
        return self.build is not None

    @property
    def trains_nothing(self) -> bool:
        """The model as it is (``base``): a run only evaluates it."""
        return self.name == "base"


# --------------------------------------------------------------------------- PEFT configs


def _save(profile: Profile) -> list[str] | None:
    return [profile.head] if profile.head is not None else None


def _lora_targets(profile: Profile, where: str | None) -> Any:
    return _targets(profile.block if where == "all" else profile.lora)


def _targets(targets: Any) -> Any:
    """A profile's targets as PEFT takes them: a regex string, or a list of names."""
    return targets if isinstance(targets, str) or targets is None else list(targets)


def _lora(method: Method, knobs: dict, profile: Profile, model) -> peft.PeftConfig:
    import peft

    return peft.LoraConfig(r=method.rank, lora_alpha=knobs.get("alpha", 8), lora_dropout=knobs.get("dropout", 0.0),
                           target_modules=_lora_targets(profile, method.knob("targets")),
                           modules_to_save=_save(profile))


def _c3a(method: Method, knobs: dict, profile: Profile, model) -> peft.PeftConfig:
    import peft

    return peft.C3AConfig(block_size=knobs["block_size"], target_modules=_lora_targets(profile, method.knob("targets")),
                          modules_to_save=_save(profile))


def _lokr(method: Method, knobs: dict, profile: Profile, model) -> peft.PeftConfig:
    import peft

    return peft.LoKrConfig(r=method.rank, alpha=knobs.get("alpha", method.rank), decompose_both=False,
                           target_modules=_lora_targets(profile, method.knob("targets")),
                           modules_to_save=_save(profile))


def _fourierft(method: Method, knobs: dict, profile: Profile, model) -> peft.PeftConfig:
    import peft

    return peft.FourierFTConfig(n_frequency=knobs["n_frequency"], scaling=float(knobs.get("alpha", 150.0)),
                                target_modules=_lora_targets(profile, method.knob("targets")),
                                modules_to_save=_save(profile))


def _vera(method: Method, knobs: dict, profile: Profile, model) -> peft.PeftConfig:
    import peft

    return peft.VeraConfig(r=method.rank, vera_dropout=knobs.get("dropout", 0.0),
                           target_modules=_lora_targets(profile, method.knob("targets")),
                           modules_to_save=_save(profile))


def _lntuning(method: Method, knobs: dict, profile: Profile, model) -> peft.PeftConfig:
    import peft

    norms = profile.norms if isinstance(profile.norms, str) else list(profile.norms)
    return peft.LNTuningConfig(target_modules=norms, modules_to_save=_save(profile))


def _bottleneck(method: Method, knobs: dict, profile: Profile, model) -> peft.PeftConfig:
    """Houlsby, Pfeiffer and AdapterDrop: SURM serial low rank with a nonlinearity inside the
    bottleneck, alpha alone (no width scale): the classic bottleneck adapter."""
    from surm.peft import SurmConfig

    from .blocks import lowest_blocks

    knobs = dict(knobs)
    targets = profile.ffn_out if method.kind == "pfeiffer" else profile.serial
    exclude = None
    if method.kind == "adapterdrop":
        exclude = lowest_blocks(method.name, profile, model, knobs.pop("drop", None))
    return SurmConfig(structure="low_rank", rank=method.rank, placement="serial", scaling="none",
                      activation=knobs.pop("activation", "relu"), target_modules=targets,
                      modules_to_save=_save(profile), exclude_modules=exclude, **knobs)


def _surm(method: Method, knobs: dict, profile: Profile, model) -> peft.PeftConfig:
    from surm.peft import SurmConfig

    where = method.knob("targets")
    if method.placement == "serial":
        targets = profile.serial
    else:
        targets = {None: profile.parallel, "all": _targets(profile.block), "qv": _lora_targets(profile, "qv")}[where]
    return SurmConfig(structure=method.structure, placement=method.placement, target_modules=targets,
                      modules_to_save=_save(profile), **knobs)


# --------------------------------------------------------------------------- the kinds

_RANK = ("rank", None)
_LORA_KNOBS = ("alpha", "dropout", "targets")
_SURM_KNOBS = tuple(k for k in KNOBS if k != "drop")
_BOTTLENECK_KNOBS = ("alpha", "dropout", "activation")


def _kinds(*kinds: Kind) -> dict[str, Kind]:
    return {k.name: k for k in kinds}


#: Every method kind, in the order the grammar lists them.
KINDS: dict[str, Kind] = _kinds(
    Kind("full", "full fine-tuning", "full", lr=1e-4, trains=lambda name, in_head: True),
    Kind("head", "head only", "head", lr=1e-1, trains=lambda name, in_head: in_head),
    # the biases; the head trains at head-only's rate (default_head_lr)
    Kind("bitfit", "BitFit", "bitfit", lr=3e-3, head_lr_from="head",
         trains=lambda name, in_head: in_head or name.rsplit(".", 1)[-1] == "bias"),
    Kind("lora", "LoRA", "lora:R", size="rank", knobs=_LORA_KNOBS, lr=3e-3, build=_lora),
    Kind("houlsby", "Houlsby adapter", "houlsby:R", size="rank", knobs=_BOTTLENECK_KNOBS, lr=3e-3, build=_bottleneck),
    Kind("pfeiffer", "Pfeiffer adapter", "pfeiffer:R", size="rank", knobs=_BOTTLENECK_KNOBS, lr=3e-3,
         build=_bottleneck),
    # PEFT's docs for C3A suggest rates near 1e-1; FourierFT and VeRA want large ones
    Kind("c3a", "C3A", "c3a:B", size="block_size", size_words=("block size", "c3a:64"), knobs=("targets",), lr=1e-1,
         linear_only=True, build=_c3a),
    Kind("surm", "SURM", "surm:STRUCTURE[:parallel|serial]", knobs=_SURM_KNOBS, build=_surm),
    Kind("lokr", "LoKr", "lokr:R", size="rank", knobs=("alpha", "targets"), lr=3e-3, build=_lokr),
    Kind("kadaptation", "KAdaptation", "kadaptation:R", size="rank", knobs=("alpha", "targets"), lr_from="lokr",
         build=_lokr),
    Kind("fourierft", "FourierFT", "fourierft:N", size="n_frequency", size_label="n",
         size_words=("number of frequencies", "fourierft:1000"), knobs=("alpha", "targets"), lr=3e-2,
         linear_only=True, build=_fourierft),
    Kind("vera", "VeRA", "vera:R", size="rank", knobs=("dropout", "targets"), lr=1e-2, linear_only=True,
         build=_vera),
    Kind("lorafix", "LoRA-FIX", "lorafix:R", size="rank", knobs=_LORA_KNOBS, lr=3e-3, build=_lora,
         freeze=(".lora_A.",)),
    Kind("adapterdrop", "AdapterDrop", "adapterdrop:R[:drop=K]", size="rank", knobs=("drop", *_BOTTLENECK_KNOBS),
         lr_from="houlsby", build=_bottleneck),
    # the norm layers; the head trains at head-only's rate, as for BitFit
    Kind("lntuning", "LN tuning", "lntuning", lr=3e-3, head_lr_from="head", build=_lntuning),
    # the pretrained model as it is: a causal LM's zero-shot floor (a run evaluates it, nothing trains)
    Kind("base", "base model (no training)", "base", lr=0.0, trains=lambda name, in_head: False),
)
