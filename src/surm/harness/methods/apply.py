"""Applying a method to a model: its PEFT config, its default learning rates, the wrapped model.

Every method trains the classification head too (``modules_to_save``), where the model has
one. Where adapters go is the model's :class:`~surm.harness.models.profiles.Profile` (given, or
read from a transformers model's type by :func:`~surm.harness.models.profiles.profile_of`).
PEFT's C3A, FourierFT and VeRA adapt Linear layers only, so they refuse a convolutional profile.
"""

from __future__ import annotations

import re
import warnings

import torch
from torch import nn

from surm.harness.models.profiles import Profile, profile_of

from .grammar import Method, parse

__all__ = ["apply", "count_trainable", "default_head_lr", "default_lr", "peft_config", "trainable_state"]


def default_lr(method: Method | str, profile: Profile | None = None) -> float:
    """The default learning rate of a method: ``profile.lr``, else its kind's rate (or the rate
    of the kind it falls back on), else, for SURM, :func:`surm.recommended_lr` of its config."""
    from .kinds import KINDS

    method = parse(method)
    overrides = profile.lr if profile is not None else {}
    for key in method.lr_keys:
        if key in overrides:
            return overrides[key]
    for key in method.lr_keys:
        if key in KINDS and KINDS[key].lr is not None:
            return KINDS[key].lr
    if method.kind == "surm":
        from surm.peft import SurmConfig
        from surm.peft.recommend import recommended_lr

        return recommended_lr(SurmConfig(structure=method.structure, placement=method.placement,
                                         scaling=method.knob("scaling", "width")))
    raise ValueError(f"no default learning rate for {method.name} (none was swept for {method.kind}); "
                     f"give one: --lr, or lr in the preset")


def default_head_lr(method: Method | str, profile: Profile | None = None) -> float | None:
    """The default learning rate of the classification head when it differs from the method's
    (None: the head trains at the method's rate).

    The head trains at the method's rate, the same rule for every method (a head at head-only's
    1e-1 cost LoRA r=8 0.9 and SURM circulant 1.0 validation points on Rotten Tomatoes), except
    where the method itself trains only biases or norm layers (``Kind.head_lr_from``): BitFit
    and LN tuning train their head at head-only's rate, since at any single rate from 1e-3 to
    1e-1, either the new head learns too slowly or the biases move too far, and every BitFit run
    stayed on the majority-class plateau (docs/lr_sweep.md).
    """
    method = parse(method)
    source = method.record.head_lr_from
    return default_lr(source, profile) if source is not None else None


def apply(model: nn.Module, method: Method | str, profile: Profile | None = None,
          task_type: str | None = None) -> nn.Module:
    """Make ``model`` ready to fine-tune with ``method`` (a method string, a :class:`Method`,
    or a PEFT config applied as it is); returns the model to train.

    The kinds without an adapter (``full``, ``head``, ``bitfit``) set ``requires_grad`` on
    ``model`` itself and return it; the adapter methods return a ``peft.PeftModel`` wrapping it
    (whose head is a trainable copy, ``modules_to_save``), with the kind's frozen parts frozen
    (LoRA-FIX's ``lora_A``). ``profile``: where adapters go (default: read from the model's
    type, :func:`~surm.harness.models.profiles.profile_of`). ``task_type`` (``"CAUSAL_LM"``,
    ``"SEQ_CLS"``): recorded in the adapter's config, so that PEFT's loaders rebuild the model
    class of the task (``AutoPeftModelForCausalLM``); a PEFT config given as it is keeps its own.
    """
    import peft

    if isinstance(method, peft.PeftConfig):
        if task_type is not None and method.task_type is None:
            method.task_type = task_type
        return _wrap(model, method)
    method = parse(method)
    profile = profile if profile is not None else profile_of(model)
    record = method.record
    if not record.adds_adapter:
        head = _find(model, profile.head) if profile.head is not None else None
        for name, param in model.named_parameters():
            param.requires_grad_(record.trains(name, head is not None and name.startswith(head + ".")))
        return model
    config = peft_config(method, profile, model=model)
    config.task_type = task_type
    wrapped = _wrap(model, config)
    for name, param in wrapped.named_parameters():
        if any(part in name for part in record.freeze):
            param.requires_grad_(False)
    return wrapped


def _wrap(model: nn.Module, config) -> nn.Module:
    import peft

    with warnings.catch_warnings():  # peft asks transformers >= 5 a deprecated question
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        if isinstance(config, peft.LNTuningConfig):  # PEFT asks every norm layer for in/out widths, and warns
            warnings.filterwarnings("ignore", message="Unsupported layer type", category=UserWarning)
        return peft.get_peft_model(model, config)


def peft_config(method: Method | str, profile: Profile | None = None, model: nn.Module | None = None):
    """The PEFT config of an adapter method on ``profile``'s targets (default: ``model``'s
    profile); None for the kinds that add no adapter.

    ``model`` is read by ``adapterdrop`` only, for its number of blocks: needed for the default
    ``drop`` (half of them) and to check a given one; without it, ``drop`` must be given.
    Raises ValueError for C3A, FourierFT and VeRA on a convolutional profile (PEFT adapts Linear
    layers only) and for AdapterDrop on a profile without blocks.
    """
    method = parse(method)
    record = method.record
    if not record.adds_adapter:
        return None
    if profile is None:
        if model is None:
            raise ValueError(f"{method.name}: give the profile (where adapters go) or the model to read it from")
        profile = profile_of(model)
    if record.linear_only and profile.convolutional:
        raise ValueError(f"{method.name}: PEFT's {record.title} adapts Linear layers only, and this profile's targets "
                         f"are convolutions (EfficientNet's 1x1 convolutions); use lora, lorafix, lokr or surm there")
    knobs = {k: v for k, v in method.knobs if k != "targets"}
    return record.build(method, knobs, profile, model)


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
