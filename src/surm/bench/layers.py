"""Per-layer forward+backward: the frozen base layer alone, and with each method's update."""

from __future__ import annotations

import copy
from typing import Any, Sequence

import peft
import torch
from torch import nn

from surm import methods as surm_methods
from surm.methods import Method

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

#: Every method on the one layer of ``nn.Sequential(base)``, named "0"; no head to save.
LAYER = surm_methods.Profile(head=None, parallel=["0"], serial=["0"], ffn_out=["0"], lora=["0"])


def _layer(method: Method, base: nn.Linear) -> nn.Module:
    """``base`` (copied) with ``method`` applied: the module that runs (a PEFT model's inner one)."""
    model = surm_methods.apply(nn.Sequential(copy.deepcopy(base)), method, LAYER)
    return model.base_model.model if isinstance(model, peft.PeftModel) else model


def bench_layers(
    methods: Sequence[Method], shapes=DEFAULT_SHAPES, repeats: int = 15, dtype=torch.float32, clock: str = "wall"
) -> list[dict[str, Any]]:
    """One record per (shape, method): median seconds of forward+backward (input gradient
    and the trainable parameters' gradients), ratios to ``head`` (the frozen base) and to
    ``lora:8``, saved-tensor bytes. A method that does not fit a shape (a C3A block size that
    does not divide it) is skipped there, with a note."""
    records = []
    for label, tokens, d_in, d_out in shapes:
        torch.manual_seed(0)
        base = nn.Linear(d_in, d_out).to(dtype)
        x = torch.randn(tokens, d_in, dtype=dtype, requires_grad=True)
        g = torch.randn(tokens, d_out, dtype=dtype)
        layers: dict[str, nn.Module] = {}
        for method in methods:
            try:
                layers[method.name] = _layer(method, base)
            except ValueError as exc:
                print(f"skip {method.name} at {label} ({d_in} -> {d_out}): {exc}")
        for layer in layers.values():  # random adapter weights: real products, not zeros
            with torch.no_grad():
                for p in layer.parameters():
                    if p.requires_grad:
                        p.normal_(0, 0.02)

        def step(layer: nn.Module):
            def run():
                y = layer(x)
                y.backward(g)
                x.grad = None
                for p in layer.parameters():
                    p.grad = None

            return run

        times = interleaved_medians({m: step(layer) for m, layer in layers.items()}, repeats=repeats, clock=clock)
        for m, layer in layers.items():
            params = list(layer.parameters())
            saved = saved_tensor_bytes(lambda: (layer(x) * g).sum(), exclude=params)
            records.append({
                "shape": label, "tokens": tokens, "in": d_in, "out": d_out, "method": m,
                "median_s": times[m],
                "median_s_ms": 1e3 * times[m],
                "vs_base": times[m] / times.get("head", float("nan")),
                "vs_lora": times[m] / times.get("lora:8", float("nan")),
                "trainable": sum(p.numel() for p in params if p.requires_grad),
                "saved_bytes": saved,
                "saved_mb": saved / 2**20,
            })
    return records
