"""Export parallel SURM adapters as LoRA adapters.

A parallel SURM adapter is additive: the adapted layer computes ``(W0 + dW) x + b0`` with
``dW = alpha * S.dense()``. PEFT's ``peft.tuners.lora.conversion.convert_to_lora(model, rank)``
and ``save_as_lora(path, model, rank)`` turn any additive adapter into LoRA factors by a
truncated SVD of ``dW`` (:meth:`SurmLayer.get_delta_weight`), so they work on a SURM
``PeftModel`` as they are. ``S`` is full rank for every structured family (low_rank aside),
so the export is exact only at full rank ``min(out, in)`` (or ``rank=1.0``, the whole energy);
at a lower rank it keeps the best rank-r part of ``dW`` (Eckart-Young) and loses the rest: see
``docs/lora_export.md`` for how much. PEFT computes the SVD in float32, so even a float64
model converts to about 1e-7 relative precision.

What does not convert, and why (:func:`lora_conversion_problem`):

- serial adapters, ``h -> h + act(alpha S h) + beta`` on the layer's output: not of the form
  ``W0 + dW`` (with a nonlinearity not even linear; with ``activation="identity"`` the change
  ``alpha S W0`` depends on the base weight and the bias changes by ``alpha S b0 + beta``, which
  LoRA cannot hold);
- adapters on 1x1 ``nn.Conv2d`` layers: PEFT's converter factorises 2-D weights only (Linear,
  Conv1D).

PEFT's own functions answer these with a generic ``TypeError`` (``SurmLayer.supports_lora_conversion``
also warns with the reason); :func:`convert_to_lora` and :func:`save_as_lora` here check first and
raise a ``ValueError`` that names every layer and reason, then call PEFT's.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from peft.tuners.lora import conversion
from torch import nn

from .layer import SurmLayer


def lora_conversion_problem(layer: SurmLayer, adapter_name: str) -> str | None:
    """Why ``adapter_name`` of ``layer`` cannot be exported to LoRA, or None if it can."""
    if adapter_name not in layer.surm_matrix:
        return (
            f"surm: this layer has no adapter {adapter_name!r} (it has {sorted(layer.surm_matrix)}); "
            f"LoRA conversion needs the adapter on every adapted layer"
        )
    if layer.surm_placement[adapter_name] != "parallel":
        return (
            f"surm: adapter {adapter_name!r} is serial (h -> h + act(alpha S h) + beta on the layer's output), "
            f"not an additive delta weight W0 + dW, so it cannot be converted to LoRA (even with "
            f"activation='identity' the bias changes, which LoRA cannot hold). Only parallel adapters convert."
        )
    if layer.kind == "conv2d":
        return (
            f"surm: adapter {adapter_name!r} sits on a 1x1 Conv2d layer; PEFT's LoRA conversion factorises "
            f"the 2-D weights of Linear and Conv1D layers only"
        )
    return None


def _problems(model: nn.Module, adapter_name: str) -> list[str]:
    found = []
    for name, module in model.named_modules():
        if isinstance(module, SurmLayer):
            problem = lora_conversion_problem(module, adapter_name)
            if problem:
                found.append(f"{name}: {problem}")
    return found


def check_lora_conversion(model: nn.Module, adapter_name: str = "default") -> None:
    """Raise a ValueError naming every layer whose adapter ``adapter_name`` cannot be exported."""
    problems = _problems(model, adapter_name)
    if not any(isinstance(m, SurmLayer) for m in model.modules()):
        raise ValueError("surm: the model has no SURM layers to convert to LoRA")
    config = getattr(model, "peft_config", {}).get(adapter_name)
    if config is not None and getattr(config, "bias", "none") != "none":
        problems.insert(0, (
            f"the config sets bias={config.bias!r}: the trained biases are part of the adapter and a LoRA "
            f"adapter cannot hold them (PEFT's conversion refuses it); train with bias='none' to export"
        ))
    if problems:
        shown = "\n  ".join(problems[:8]) + (f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise ValueError(f"surm: cannot convert adapter {adapter_name!r} to LoRA:\n  {shown}")


def convert_to_lora(model: nn.Module, rank: float, adapter_name: str = "default", **kwargs: Any):
    """:func:`check_lora_conversion`, then PEFT's ``convert_to_lora``: returns
    ``(LoraConfig, state_dict)``. ``rank`` is an int (the LoRA rank, at most ``min(out, in)`` of
    every layer) or a float in (0, 1] (the share of squared singular values to keep, per layer;
    1.0 gives the exact, full-rank export)."""
    check_lora_conversion(model, adapter_name)
    return conversion.convert_to_lora(model, rank, adapter_name=adapter_name, **kwargs)


def save_as_lora(path: str | os.PathLike, model: nn.Module, rank: float, adapter_name: str = "default", **kwargs: Any):
    """:func:`check_lora_conversion`, then PEFT's ``save_as_lora``: a LoRA checkpoint at ``path``
    that ``peft.PeftModel.from_pretrained(base_model, path)`` loads."""
    check_lora_conversion(model, adapter_name)
    return conversion.save_as_lora(path, model, rank, adapter_name=adapter_name, **kwargs)


def lora_delta(state_dict: dict[str, torch.Tensor], name: str, layer: SurmLayer) -> torch.Tensor:
    """The delta weight ``B A`` that the exported LoRA factors of module ``name`` hold, in the
    layout of :meth:`SurmLayer.get_delta_weight` (float64)."""
    A = state_dict[f"{name}.lora_A.weight"].double()
    B = state_dict[f"{name}.lora_B.weight"].double()
    delta = B @ A
    return delta.T if layer.kind == "conv1d" else delta


@torch.no_grad()
def export_errors(model: nn.Module, rank: float, adapter_name: str = "default") -> dict[str, float]:
    """Relative Frobenius error ``||dW - B A|| / ||dW||`` of the LoRA export at ``rank``, per
    adapted module (0 for a zero update exported exactly)."""
    _, state_dict = convert_to_lora(model, rank, adapter_name=adapter_name)
    errors = {}
    for name, module in model.named_modules():
        if not isinstance(module, SurmLayer) or f"{name}.lora_A.weight" not in state_dict:
            continue
        delta = module.get_delta_weight(adapter_name).double()
        norm = delta.norm()
        diff = (delta - lora_delta(state_dict, name, module)).norm()
        errors[name] = float(diff / norm) if norm > 0 else float(diff)
    return errors
