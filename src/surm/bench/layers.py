"""Per-layer forward+backward: the frozen base layer alone, and with each method's update."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import peft
import torch
from torch import nn

from surm.harness import methods as surm_methods
from surm.harness.methods import Method
from surm.harness.models.profiles import Profile

from .memory import saved_tensor_bytes
from .timing import interleaved_medians

#: (label, tokens, in_features, out_features)
DEFAULT_SHAPES = [
    ("minilm q/v", 32 * 64, 384, 384),
    ("minilm ffn up", 32 * 64, 384, 1536),
    ("minilm ffn down", 32 * 64, 1536, 384),
    ("bert-base q/v", 32 * 64, 768, 768),
    ("bert-base ffn up", 32 * 64, 768, 3072),
]
#: The linear maps of two causal LMs at 2048 tokens: SmolLM2-135M (hidden 576, 3 key-value heads
#: of 64, FFN 1536) and Llama-2-7B (hidden 4096, FFN 11008).
LLM_SHAPES = [
    ("smollm2 q/o", 2048, 576, 576),
    ("smollm2 k/v", 2048, 576, 192),
    ("smollm2 ffn up", 2048, 576, 1536),
    ("smollm2 ffn down", 2048, 1536, 576),
    ("llama2-7b attn", 2048, 4096, 4096),
    ("llama2-7b ffn up", 2048, 4096, 11008),
    ("llama2-7b ffn down", 2048, 11008, 4096),
]

#: Every method on the one layer of ``nn.Sequential(base)``, named "0"; no head to save.
LAYER = Profile(head=None, parallel=["0"], serial=["0"], ffn_out=["0"], lora=["0"])


def _layer(method: Method, base: nn.Linear) -> nn.Module:
    """``base`` (copied) with ``method`` applied: the module that runs (a PEFT model's inner one)."""
    model = surm_methods.apply(nn.Sequential(copy.deepcopy(base)), method, LAYER)
    return model.base_model.model if isinstance(model, peft.PeftModel) else model


def _build_layers(methods: Sequence[Method], base: nn.Linear, where: str) -> dict[str, nn.Module]:
    """Each method applied to a copy of ``base``, its trainable tensors drawn at random (real
    products, not zeros); a method that does not fit (a C3A block size that does not divide the
    widths) is skipped with a note naming ``where``."""
    layers: dict[str, nn.Module] = {}
    for method in methods:
        try:
            layers[method.name] = _layer(method, base)
        except ValueError as exc:
            print(f"skip {method.name} at {where}: {exc}")
    for layer in layers.values():
        with torch.no_grad():
            for p in layer.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.02)
    return layers


def _step(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> Callable[[], None]:
    """One forward + backward of ``layer`` on x with output gradient g, gradients reset after;
    waits for the device (CUDA runs asynchronously)."""
    params = list(layer.parameters())
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)

    def run() -> None:
        layer(x).backward(g)
        x.grad = None
        for p in params:
            p.grad = None
        sync()

    return run


def bench_layers(
    methods: Sequence[Method],
    shapes=DEFAULT_SHAPES,
    repeats: int = 15,
    dtype: torch.dtype = torch.float32,
    clock: str = "wall",
    device: str | torch.device = "cpu",
    reference: str = "lora:8",
) -> list[dict[str, Any]]:
    """One record per (shape, method): median seconds of forward+backward (input gradient
    and the trainable parameters' gradients) on ``device`` with the base layer, x and the
    output gradient in ``dtype``; ratios to ``head`` (the frozen base) and to ``reference``
    (a LoRA), the overhead over the frozen layer as a fraction of the reference's overhead,
    saved-tensor bytes and their ratio to the reference's. A method that does not fit a shape
    (a C3A block size that does not divide it) is skipped there, with a note."""
    records = []
    for label, tokens, d_in, d_out in shapes:
        torch.manual_seed(0)
        base = nn.Linear(d_in, d_out).to(device=device, dtype=dtype)
        x = torch.randn(tokens, d_in, dtype=dtype, device=device, requires_grad=True)
        g = torch.randn(tokens, d_out, dtype=dtype, device=device)
        layers = _build_layers(methods, base, f"{label} ({d_in} -> {d_out})")
        times = interleaved_medians({m: _step(layer, x, g) for m, layer in layers.items()}, repeats=repeats,
                                    clock=clock)
        rows = []
        for m, layer in layers.items():
            params = list(layer.parameters())
            saved = saved_tensor_bytes(lambda: (layer(x) * g).sum(), exclude=params)
            rows.append({
                "shape": label, "tokens": tokens, "in": d_in, "out": d_out, "method": m,
                "device": str(device), "dtype": str(dtype).removeprefix("torch."),
                "median_s": times[m],
                "median_s_ms": 1e3 * times[m],
                "trainable": sum(p.numel() for p in params if p.requires_grad),
                "saved_bytes": saved,
                "saved_mb": saved / 2**20,
            })
        records += with_ratios(rows, reference)
    return records


def with_ratios(rows: list[dict[str, Any]], reference: str) -> list[dict[str, Any]]:
    """The records of one shape with ``vs_base`` (time / frozen layer's), ``vs_lora`` (time /
    reference's), ``overhead_vs_lora`` ((time - frozen) / (reference - frozen): the cost a
    method adds to the frozen layer, as a fraction of what the reference adds) and
    ``saved_vs_lora`` (saved bytes / reference's); nan where a reference is missing."""
    by_method = {r["method"]: r for r in rows}
    nan = float("nan")
    base = by_method["head"]["median_s"] if "head" in by_method else nan
    ref = by_method.get(reference, {})
    lora, lora_saved = ref.get("median_s", nan), ref.get("saved_bytes") or nan
    for r in rows:
        r["reference"] = reference
        r["vs_base"] = r["median_s"] / base
        r["vs_lora"] = r["median_s"] / lora
        r["overhead_vs_lora"] = (r["median_s"] - base) / (lora - base)
        r["saved_vs_lora"] = r["saved_bytes"] / lora_saved
    return rows
