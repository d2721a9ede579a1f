"""Per-layer forward+backward: the frozen base layer alone, and with each method's update."""

from __future__ import annotations

import copy
from typing import Any

import peft
import torch
from torch import nn

from .methods import BENCH_METHODS, peft_config
from .timing import interleaved_medians, saved_tensor_bytes

#: (label, tokens, in_features, out_features)
DEFAULT_SHAPES = [
    ("minilm q/v", 32 * 64, 384, 384),
    ("minilm ffn up", 32 * 64, 384, 1536),
    ("minilm ffn down", 32 * 64, 1536, 384),
    ("bert-base q/v", 32 * 64, 768, 768),
    ("bert-base ffn up", 32 * 64, 768, 3072),
]


def _layer(name: str, base: nn.Linear) -> nn.Module:
    config = peft_config(name, ["0"])
    model = nn.Sequential(copy.deepcopy(base))
    if config is None:
        return model.requires_grad_(False)
    return peft.get_peft_model(model, config).base_model.model


def _fits(name: str, d_in: int, d_out: int) -> bool:
    kind, kwargs = BENCH_METHODS[name]
    return kind != "c3a" or (d_in % kwargs["block_size"] == 0 and d_out % kwargs["block_size"] == 0)


def bench_layers(methods: list[str], shapes=DEFAULT_SHAPES, repeats: int = 15, dtype=torch.float32) -> list[dict[str, Any]]:
    """One record per (shape, method): median seconds of forward+backward (input gradient
    and adapter gradients), ratios to the frozen base and to LoRA r=8, saved-tensor bytes."""
    records = []
    for label, tokens, d_in, d_out in shapes:
        torch.manual_seed(0)
        base = nn.Linear(d_in, d_out).to(dtype)
        x = torch.randn(tokens, d_in, dtype=dtype, requires_grad=True)
        g = torch.randn(tokens, d_out, dtype=dtype)
        names = [m for m in methods if _fits(m, d_in, d_out)]
        layers = {m: _layer(m, base) for m in names}
        for layer in layers.values():  # random adapter weights: real products, not zeros
            with torch.no_grad():
                for n, p in layer.named_parameters():
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

        times = interleaved_medians({m: step(layers[m]) for m in names}, repeats=repeats)
        for m in names:
            params = [p for p in layers[m].parameters()]
            saved = saved_tensor_bytes(lambda: (layers[m](x) * g).sum(), exclude=params)
            records.append({
                "shape": label, "tokens": tokens, "in": d_in, "out": d_out, "method": m,
                "median_s": times[m],
                "median_s_ms": 1e3 * times[m],
                "vs_base": times[m] / times.get("head", float("nan")),
                "vs_lora": times[m] / times.get("lora_r8", float("nan")),
                "trainable": sum(p.numel() for p in layers[m].parameters() if p.requires_grad),
                "saved_bytes": saved,
                "saved_mb": saved / 2**20,
            })
    return records
