"""Quantized base weights: what format a base layer's weight is in, and how a merge reads and
writes it as a dense (out, in) matrix.

==============  ===========================================  ===========================================
format          base weight                                  merge
==============  ===========================================  ===========================================
``dense``       a plain ``torch.Tensor`` / ``nn.Parameter``  exact, in place (:mod:`.layer`)
                (or a sharded ``DTensor``)
``bnb-int8``    bitsandbytes ``Int8Params`` (Linear8bitLt)   dequantize, add, requantize (int8 per row)
``bnb-4bit``    bitsandbytes ``Params4bit`` (Linear4bit;     dequantize, add, requantize (same quant_type,
                repacked for the CPU kernel or not)          blocksize, double quantization, storage)
``hqq``         HQQ ``HQQLinear`` (packed ``W_q`` and        dequantize, add, requantize (the layer's own
                its ``meta``; the layer has no ``weight``)   ``quant_config``: bits, group size, axis)
``torchao``     a torchao tensor subclass                    refused: no general way back to the format
``subclass``    any other tensor subclass                    refused
==============  ===========================================  ===========================================

The adapter never touches a quantized weight in training: it runs in its own dtype beside the
base layer's own (quantized) matmul. A requantized merge is not exact: :func:`rounding` measures
how far the stored merged weight is from ``W + update``, and the layer reports it.
"""

from __future__ import annotations

import copy
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn

_PLAIN = (torch.Tensor, nn.Parameter)


def is_plain_dense(weight: torch.Tensor) -> bool:
    """A plain float tensor (not a subclass): the only weight the fused path and in-place merges take."""
    return type(weight) in _PLAIN and weight.is_floating_point()


def is_hqq(module: nn.Module) -> bool:
    """An HQQ ``HQQLinear`` layer (told by its class name: hqq is never imported here)."""
    return type(module).__name__ == "HQQLinear"


def has_plain_dense_weight(module: nn.Module) -> bool:
    """Whether ``module`` holds a plain float ``weight`` (:func:`is_plain_dense`)."""
    return not is_hqq(module) and is_plain_dense(module.weight)


def stored_weight(module: nn.Module) -> torch.Tensor:
    """The tensor ``module``'s weight is stored in: ``weight``, or an HQQ layer's packed ``W_q``."""
    return module.W_q if is_hqq(module) else module.weight


def weight_format(module: nn.Module) -> str:
    """The format of ``module``'s weight: one of the table's rows (see the module docstring)."""
    if is_hqq(module):
        return "hqq"
    w = module.weight
    name = type(w).__name__
    if name == "Params4bit":
        return "bnb-4bit"
    if name == "Int8Params":
        return "bnb-int8"
    if type(w) in _PLAIN or type(w).__name__ == "DTensor":  # a sharded dense weight merges as before
        return "dense"
    if type(w).__module__.startswith("torchao"):
        return "torchao"
    return "subclass"


def merge_problem(module: nn.Module) -> str | None:
    """Why nothing can be merged into ``module``'s weight, or None if it can."""
    fmt = weight_format(module)
    w = stored_weight(module)
    if fmt in ("torchao", "subclass"):
        what = "a torchao-quantized" if fmt == "torchao" else "a tensor subclass"
        return (
            f"its weight is {what} {type(w).__name__}, which surm cannot requantize after adding the update "
            f"(dequantizing is possible, writing the same format back is not). Keep the adapter unmerged, or "
            f"merge into a dense copy of the base: load the base model without quantization, load the adapter "
            f"on it (PeftModel.from_pretrained) and call merge_and_unload() there"
        )
    if fmt == "bnb-4bit" and _repacked_for_cpu(w) and _unpacker() is None:
        return (
            "its 4-bit weight has been repacked for bitsandbytes' CPU inference kernel, and this bitsandbytes "
            "has no way back to its storage layout; merge before running the model in inference mode, or merge "
            "into a dense copy of the base"
        )
    if fmt == "bnb-int8" and w.dtype == torch.int8 and _int8_scales(module) is None:
        return "its int8 weight has no row scales (SCB) to dequantize with"
    return None


def _int8_scales(module: nn.Module) -> torch.Tensor | None:
    """Row scales of an int8 weight: on the weight until the first forward, then on the layer's state."""
    scales = getattr(module.weight, "SCB", None)
    state = getattr(module, "state", None)
    if scales is None and state is not None:
        scales = state.SCB
    return scales


def _repacked_for_cpu(w: torch.Tensor) -> bool:
    """A 4-bit weight that bitsandbytes repacked for its CPU inference kernel (an eval-mode forward
    without gradients on a CPU with AVX512-BF16 does it, in place): another data layout, its
    ``absmax`` in bfloat16 and ``quant_state.dtype`` bfloat16."""
    return getattr(w.quant_state, "packing_format_for_cpu", False)


def _unpacker():
    """bitsandbytes' inverse of that repacking (which it uses to save such a weight), or None."""
    import bitsandbytes as bnb

    return getattr(bnb.functional, "_convert_weight_packed_for_cpu_inverse", None)


def _storage_4bit(w: torch.Tensor) -> tuple[torch.Tensor, object]:
    """A 4-bit weight's data and quant state in bitsandbytes' storage layout; a weight repacked for
    the CPU kernel is unpacked from copies (the layer keeps its packed weight)."""
    if not _repacked_for_cpu(w):
        return w.data, w.quant_state
    return _unpacker()(w.data.clone(), copy.deepcopy(w.quant_state))


def _source_dtype(w: torch.Tensor) -> torch.dtype:
    """The dtype a 4-bit weight was quantized from (repacking overwrites ``quant_state.dtype``)."""
    state = w.quant_state
    if state is None:
        return torch.float32
    return state.original_dtype if _repacked_for_cpu(w) else state.dtype


def float_dtype(module: nn.Module) -> torch.dtype:
    """The floating dtype ``module``'s weight stands for: its own dtype when it is floating, the dtype
    a 4-bit weight was quantized from, float32 otherwise."""
    if is_hqq(module):
        return module.compute_dtype
    w = module.weight
    if weight_format(module) == "bnb-4bit":
        return _source_dtype(w)
    return w.dtype if w.is_floating_point() else torch.float32


def dequantized(module: nn.Module, dtype: torch.dtype = torch.float32, saved: Saved | None = None) -> torch.Tensor:
    """``module.weight`` (or the weight ``saved`` from it) as a dense (out, in) tensor of ``dtype``
    (a new tensor for quantized formats)."""
    fmt = weight_format(module)
    if fmt == "hqq":
        return _hqq_dequantized(module, saved).to(dtype)
    w = module.weight if saved is None else saved.weight
    if fmt == "bnb-4bit":
        import bitsandbytes as bnb

        return bnb.functional.dequantize_4bit(*_storage_4bit(w)).to(dtype)
    if fmt == "bnb-int8":
        if w.dtype != torch.int8:  # not quantized yet (still on the way to its device) or fp16 weights kept
            return w.data.to(dtype)
        import bitsandbytes as bnb

        scales = _int8_scales(module) if saved is None else _saved_scales(saved)
        return bnb.functional.int8_vectorwise_dequant(w.data, scales.to(w.device)).to(dtype)
    if fmt == "torchao":
        return w.dequantize().to(dtype)
    return w.data.to(dtype)


def _hqq_dequantized(module: nn.Module, saved: Saved | None) -> torch.Tensor:
    """An HQQ layer's (out, in) weight in its compute dtype, or that of the ``W_q`` and ``meta`` ``saved``
    from it (dequantized by the layer class's own code, which reads only ``ready``, ``W_q`` and ``meta``)."""
    if saved is None:
        return module.dequantize()
    return type(module).dequantize(SimpleNamespace(ready=True, W_q=saved.weight, meta=saved.state))


@dataclass
class Saved:
    """What a requantizing merge replaces, to put back bit for bit on unmerge: the weight object
    and a bitsandbytes int8 layer's state (``CB``, ``SCB``), or an HQQ layer's ``W_q`` and ``meta``."""

    weight: nn.Parameter
    state: tuple | dict | None


def save(module: nn.Module) -> Saved:
    """Keep the quantized weight object (merges replace it, never write into it) and an int8 layer's
    state, or an HQQ layer's packed weight and its ``meta`` (requantizing makes new ones)."""
    if is_hqq(module):
        return Saved(module.W_q, module.meta)
    state = getattr(module, "state", None)
    kept = None if state is None or weight_format(module) != "bnb-int8" else (state.CB, state.SCB)
    return Saved(module.weight, kept)


def _saved_scales(saved: Saved) -> torch.Tensor | None:
    scales = getattr(saved.weight, "SCB", None)
    return scales if scales is not None or saved.state is None else saved.state[1]


def restore(module: nn.Module, saved: Saved) -> None:
    if is_hqq(module):
        module.W_q, module.meta = saved.weight, saved.state
        return
    module.weight = saved.weight
    if saved.state is not None:
        module.state.CB, module.state.SCB = saved.state


def requantize(module: nn.Module, matrix: torch.Tensor) -> None:
    """Replace ``module.weight`` by ``matrix`` (out, in) quantized in the weight's own format and settings."""
    fmt = weight_format(module)
    if fmt == "hqq":  # quantized by a fresh layer of the same settings: new W_q and meta, the saved ones untouched
        settings = {**module.quant_config, "offload_meta": module.offload_meta}
        fresh = type(module)(None, settings, compute_dtype=module.compute_dtype, device=module.device,
                             initialize=False)
        fresh.quantize(matrix.to(module.compute_dtype).contiguous(), **module.quant_config)
        module.W_q, module.meta = fresh.W_q, fresh.meta
        return
    import bitsandbytes as bnb

    w = module.weight
    if fmt == "bnb-4bit":
        source_dtype = _source_dtype(w)
        new = bnb.nn.Params4bit(
            matrix.to(source_dtype).contiguous().cpu(),
            requires_grad=False,
            blocksize=w.blocksize,
            compress_statistics=w.compress_statistics,
            quant_type=w.quant_type,
            quant_storage=w.quant_storage,
            module=w.module,
        )
        module.weight = new.to(w.device)
        if hasattr(module, "quant_state"):
            module.quant_state = module.weight.quant_state
    elif fmt == "bnb-int8":
        new = bnb.nn.Int8Params(
            matrix.to(torch.float16 if w.dtype == torch.int8 else w.dtype).contiguous().cpu(),
            requires_grad=False,
            has_fp16_weights=w.has_fp16_weights,
        )
        module.weight = new.to(w.device)
        module.state.reset_grads()
    else:
        raise TypeError(f"surm: cannot requantize a {fmt} weight")


@dataclass
class Rounding:
    """How far a requantized merge's stored weight is from the exact ``W + update``.

    ``max_error``: max |dequantized(stored) - (W + update)|; ``max_update``: max |update|; both over
    the (out, in) matrix (the bias, when a serial merge changes it, stays in float)."""

    format: str
    shape: tuple[int, int]
    max_error: float
    max_update: float

    def describe(self) -> str:
        return (
            f"{self.format} {self.shape[0]}x{self.shape[1]}: max |merged - (W + update)| = {self.max_error:.3g} "
            f"against a largest update entry of {self.max_update:.3g}"
        )


def rounding(module: nn.Module, exact: torch.Tensor, update: torch.Tensor) -> Rounding:
    """Compare the stored (requantized) weight of ``module`` with the ``exact`` merged matrix."""
    stored = dequantized(module, exact.dtype)
    return Rounding(
        weight_format(module),
        tuple(exact.shape),
        float((stored - exact).abs().max()),
        float(update.abs().max()),
    )


class QuantizedMergeWarning(UserWarning):
    """A merge into a quantized base weight rounded the result to the weight's format."""


_COLLECTING = threading.local()


@contextmanager
def collected(names: dict[int, str]) -> Iterator[list[tuple[str, Rounding]]]:
    """Collect the layers' rounding reports inside a model-wide merge (``names``: id(layer) -> its
    module name) and warn once for all of them at the end, instead of once per layer."""
    outer = getattr(_COLLECTING, "reports", None)
    reports: list[tuple[str, Rounding]] = []
    _COLLECTING.reports, _COLLECTING.names = reports, names
    try:
        yield reports
    finally:
        _COLLECTING.reports = outer
    if reports:
        worst_name, worst = max(reports, key=lambda r: r[1].max_error)
        formats = sorted({r.format for _, r in reports})
        warnings.warn(
            f"surm: merged into {len(reports)} quantized layer(s) ({', '.join(formats)}) by dequantizing, adding "
            f"the update and requantizing; the stored weights differ from the exact merge by rounding, at most "
            f"{worst.max_error:.3g} (in {worst_name}: {worst.describe()}). Each layer keeps its own in "
            f"`merge_rounding`. For an exact merge, merge into a dense copy of the base model.",
            QuantizedMergeWarning,
            stacklevel=4,
        )


def report(layer: nn.Module, result: Rounding) -> None:
    """Hand one layer's rounding to the model-wide merge in progress, or warn for this layer now."""
    reports = getattr(_COLLECTING, "reports", None)
    if reports is not None:
        reports.append((_COLLECTING.names.get(id(layer), type(layer).__name__), result))
        return
    warnings.warn(
        f"surm: merged into a quantized weight by dequantizing, adding the update and requantizing; the stored "
        f"weight differs from the exact merge by rounding: {result.describe()}. For an exact merge, merge into a "
        f"dense copy of the base model.",
        QuantizedMergeWarning,
        stacklevel=4,
    )
