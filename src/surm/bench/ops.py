"""Each structured product against a dense matmul: forward, and forward + backward.

For every shape (in -> out), x (tokens, in) float32 with requires_grad, a fixed output
gradient g (tokens, out), and every method:

- ``dense``: ``x @ W.T`` with W (out, in) trainable (``nn.Linear`` without bias);
- each family built by ``surm.structured.make(name, out, in, init="random", **knobs)``.

Two timings per method, medians over interleaved rounds:

- ``fwd``: the product under ``torch.no_grad()`` (inference);
- ``fwd+bwd``: the product and ``y.backward(g)``, which fills the gradients of x and of the
  structure's parameters (what one training step of the layer costs).

Also :func:`profile` (where one method's time goes) and :func:`cost_model` (the per-unit
costs of a real FFT and of a matmul, the constants the adjoints choose their route by).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from surm import structured

from .report import machine, markdown_table, write_json
from .timing import interleaved_medians

SHAPES = [(384, 384), (384, 1536), (768, 768)]  # (in_features, out_features)
#: (label, family, knobs); "dense" is measured beside them as the reference
METHODS: list[tuple[str, str, dict[str, Any]]] = [
    ("circulant", "circulant", {}),
    ("circulant:b=64", "circulant", {"block_size": 64}),
    ("skew_circulant", "skew_circulant", {}),
    ("toeplitz", "toeplitz", {}),
    ("symmetric_toeplitz", "symmetric_toeplitz", {}),
    ("kronecker:terms=1", "kronecker", {"terms": 1}),
    ("ldr:rank=1", "ldr", {"rank": 1}),
    ("ldr:rank=2", "ldr", {"rank": 2}),
    ("low_rank:rank=8", "low_rank", {"rank": 8}),
]
LABELS = ("dense", *(label for label, _, _ in METHODS))


def build(label: str, d_in: int, d_out: int) -> nn.Module:
    """The module of method ``label`` (one of :data:`LABELS`); dense is a bias-free ``nn.Linear``."""
    if label == "dense":
        return nn.Linear(d_in, d_out, bias=False)
    family, knobs = next((fam, knobs) for name, fam, knobs in METHODS if name == label)
    return structured.make(family, d_out, d_in, init="random", **knobs)


def make_steps(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> tuple[Callable[[], None], Callable[[], None]]:
    """(forward, forward+backward) closures for ``module`` on x (tokens, in), g (tokens, out)."""
    params = list(module.parameters())

    def fwd() -> None:
        with torch.no_grad():
            module(x)

    def fwd_bwd() -> None:
        x.grad = None
        for p in params:
            p.grad = None
        module(x).backward(g)

    return fwd, fwd_bwd


def bench_shape(
    d_in: int, d_out: int, tokens: int, repeats: int, warmup: int, clock: str = "wall"
) -> list[dict[str, Any]]:
    """Rows {shape, method, params, fwd_ms, fwd_bwd_ms, *_ratio} for one (in -> out) shape; a
    method whose knobs do not fit the shape (a block size that does not divide it) is skipped."""
    torch.manual_seed(0)
    x = torch.randn(tokens, d_in, requires_grad=True)
    g = torch.randn(tokens, d_out)
    modules: dict[str, nn.Module] = {}
    for label in LABELS:
        try:
            modules[label] = build(label, d_in, d_out)
        except ValueError as exc:
            print(f"skip {label} at {d_in} -> {d_out}: {exc}")
    fns: dict[str, Callable[[], None]] = {}
    for label, module in modules.items():
        fns[f"{label}|fwd"], fns[f"{label}|fwd+bwd"] = make_steps(module, x, g)
    ms = {k: 1e3 * v for k, v in interleaved_medians(fns, repeats=repeats, warmup=warmup, clock=clock).items()}
    rows = []
    for label, module in modules.items():
        row = {
            "shape": [d_in, d_out],
            "method": label,
            "params": sum(p.numel() for p in module.parameters()),
            "fwd_ms": ms[f"{label}|fwd"],
            "fwd_bwd_ms": ms[f"{label}|fwd+bwd"],
        }
        row["fwd_ratio"] = row["fwd_ms"] / ms["dense|fwd"]
        row["fwd_bwd_ratio"] = row["fwd_bwd_ms"] / ms["dense|fwd+bwd"]
        rows.append(row)
    return rows


TABLE = [
    ("in -> out", lambda r: f"{r['shape'][0]} -> {r['shape'][1]}", ""), ("method", "method", ""),
    ("params", "params", ","), ("fwd ms", "fwd_ms", ".2f"), ("× dense", "fwd_ratio", ".2f"),
    ("fwd+bwd ms", "fwd_bwd_ms", ".2f"), ("× dense", "fwd_bwd_ratio", ".2f"),
]


def profile(label: str, d_in: int, d_out: int, tokens: int, rows: int = 12) -> str:
    """Top ops (self CPU time) of 10 forward+backward steps of method ``label``."""
    module = build(label, d_in, d_out)
    x = torch.randn(tokens, d_in, requires_grad=True)
    g = torch.randn(tokens, d_out)
    _, step = make_steps(module, x, g)
    for _ in range(3):
        step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


#: FFT lengths of :func:`cost_model` (its matmuls take the (in, out) shapes)
COST_FFT_SIZES = (384, 768, 1536, 3072)


def cost_model(tokens: int = 4096, repeats: int = 20, warmup: int = 3, clock: str = "wall",
               fft_sizes=COST_FFT_SIZES, matmul_shapes=SHAPES) -> dict[str, Any]:
    """The two constants of the adjoints' route choice (``surm.structured._fft``), measured:
    ns per token of a batched real FFT of length N, divided by ``N * max(1, bit_length(N) - 0.5)``
    (the unit of ``fft_cost``), and ns per multiply-add of a (tokens, in) x (in, out) matmul.
    Each point is a median over interleaved rounds; the constants are geometric means."""
    torch.manual_seed(0)
    fns: dict[str, Callable[[], object]] = {}
    units: dict[str, float] = {}
    for size in fft_sizes:
        x = torch.randn(tokens, size)
        fns[f"fft {size}"] = lambda x=x: torch.fft.rfft(x)
        units[f"fft {size}"] = tokens * size * max(1.0, size.bit_length() - 0.5)
    for d_in, d_out in matmul_shapes:
        x, w = torch.randn(tokens, d_in), torch.randn(d_in, d_out)
        fns[f"matmul {d_in}x{d_out}"] = lambda x=x, w=w: x @ w
        units[f"matmul {d_in}x{d_out}"] = tokens * d_in * d_out
    seconds = interleaved_medians(fns, repeats=repeats, warmup=warmup, clock=clock)
    points = [{"op": name, "median_ms": 1e3 * seconds[name], "ns_per_unit": 1e9 * seconds[name] / units[name]}
              for name in fns]

    def geomean(kind: str) -> float:
        return math.exp(statistics.fmean(math.log(p["ns_per_unit"]) for p in points if p["op"].startswith(kind)))

    return {"points": points, "FFT_NS_PER_UNIT": geomean("fft"), "MATMUL_NS_PER_MAC": geomean("matmul")}


def _sizes(shapes, tokens, quick: bool, default_tokens: int) -> tuple[list[tuple[int, int]], int]:
    """``quick``: one 64 -> 64 shape and 32 tokens, where not given."""
    return list(shapes or ([(64, 64)] if quick else SHAPES)), tokens or (32 if quick else default_tokens)


def run(shapes=None, tokens: int | None = None, repeats: int = 20, warmup: int = 3, out: Path | None = None,
        quick: bool = False, clock: str = "wall") -> dict[str, Any]:
    """Every method at every shape (default :data:`SHAPES`, 2048 tokens): prints a Markdown
    table, writes ``ops.json``."""
    shapes, tokens = _sizes(shapes, tokens, quick, 2048)
    record: dict[str, Any] = {"machine": machine()}
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for d_in, d_out in shapes:
        rows += bench_shape(d_in, d_out, tokens, repeats, warmup, clock)
        print(f"done {d_in} -> {d_out}", flush=True)
    print(f"\n## tokens={tokens}, float32, threads={torch.get_num_threads()}, median of {repeats} rounds (ms)\n")
    print(markdown_table(rows, TABLE))
    record["config"] = {"tokens": tokens, "dtype": "float32", "repeats": repeats, "warmup": warmup, "clock": clock,
                        "wall_s": round(time.perf_counter() - start, 1)}
    record["results"] = rows
    if out is not None:
        write_json(out / "ops.json", record)
    return record


def run_profile(label: str, shapes=None, tokens: int | None = None, quick: bool = False) -> None:
    """Print the top ops of method ``label`` at every shape (default 2048 tokens)."""
    shapes, tokens = _sizes(shapes, tokens, quick, 2048)
    for d_in, d_out in shapes:
        print(f"{label} {d_in} -> {d_out}, {tokens} tokens, fwd+bwd x10")
        print(profile(label, d_in, d_out, tokens))


def run_cost_model(shapes=None, tokens: int | None = None, repeats: int = 20, warmup: int = 3,
                   out: Path | None = None, quick: bool = False, clock: str = "wall") -> dict[str, Any]:
    """:func:`cost_model` (default 4096 tokens; matmuls at ``shapes``): prints the points and
    the two constants, writes ``ops_costs.json``."""
    shapes, tokens = _sizes(shapes, tokens, quick, 4096)
    record: dict[str, Any] = {"machine": machine()}
    fit = cost_model(tokens, repeats, warmup, clock, fft_sizes=(64, 128) if quick else COST_FFT_SIZES,
                     matmul_shapes=shapes)
    print(f"\n## Cost units, {tokens} tokens, median of {repeats} rounds\n")
    print(markdown_table(fit["points"], [("op", "op", ""), ("ms", "median_ms", ".3f"),
                                         ("ns per unit", "ns_per_unit", ".4f")]))
    print(f"\nFFT_NS_PER_UNIT ~ {fit['FFT_NS_PER_UNIT']:.3g}, MATMUL_NS_PER_MAC ~ {fit['MATMUL_NS_PER_MAC']:.3g}")
    record["config"] = {"tokens": tokens, "dtype": "float32", "repeats": repeats, "warmup": warmup, "clock": clock}
    record["results"] = fit
    if out is not None:
        write_json(out / "ops_costs.json", record)
    return record
