"""Micro-benchmark: forward + backward of each structured family against a dense matmul.

    python benchmarks/structured_ops.py [--tokens 2048] [--repeats 20] [--threads N] [--out ops.json]
    python benchmarks/structured_ops.py --profile ldr:rank=2 --shape 384 1536   # where the time goes

For every shape (in -> out), x (tokens, in) float32 with requires_grad, a fixed output
gradient g (tokens, out), and every method:

- ``dense``: ``x @ W.T`` with W (out, in) trainable (``nn.Linear`` without bias);
- each family built by ``surm.structured.make(name, out, in, init="random", **knobs)``.

Two timings per method, both medians over ``--repeats`` rounds after ``--warmup`` rounds;
each round runs every method once, in a rotating order, so that the drift of a shared
machine hits all methods alike:

- ``fwd``: the product under ``torch.no_grad()`` (inference);
- ``fwd+bwd``: the product and ``y.backward(g)``, which fills the gradients of x and of the
  structure's parameters (what one training step of the layer costs).

Not a test: run by hand; the numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from typing import Any, Callable

import torch
from torch import nn

from surm import structured
from surm.bench.timing import interleaved_medians

SHAPES = [(384, 384), (384, 1536), (768, 768)]  # (in_features, out_features)
METHODS: list[tuple[str, str, dict[str, Any]]] = [  # (label, family, knobs)
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


def build(label: str, family: str | None, knobs: dict[str, Any], d_in: int, d_out: int) -> nn.Module:
    """The module of one method: dense (``family=None``) is a bias-free ``nn.Linear``."""
    if family is None:
        return nn.Linear(d_in, d_out, bias=False)
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


def bench_shape(d_in: int, d_out: int, tokens: int, repeats: int, warmup: int) -> list[dict[str, Any]]:
    """Rows {shape, method, params, fwd_ms, fwd_bwd_ms, *_ratio} for one (in -> out) shape."""
    torch.manual_seed(0)
    x = torch.randn(tokens, d_in, requires_grad=True)
    g = torch.randn(tokens, d_out)
    modules: dict[str, nn.Module] = {}
    for label, fam, knobs in [("dense", None, {})] + METHODS:
        try:
            modules[label] = build(label, fam, knobs, d_in, d_out)
        except ValueError as exc:  # e.g. a block size that does not divide this shape
            print(f"skip {label} at {d_in} -> {d_out}: {exc}")
    fns: dict[str, Callable[[], None]] = {}
    for label, module in modules.items():
        fns[f"{label}|fwd"], fns[f"{label}|fwd+bwd"] = make_steps(module, x, g)
    ms = {k: 1e3 * v for k, v in interleaved_medians(fns, repeats=repeats, warmup=warmup).items()}
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


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table: shape, method, params, fwd ms (x dense), fwd+bwd ms (x dense)."""
    head = "| in -> out | method | params | fwd ms | × dense | fwd+bwd ms | × dense |"
    sep = "|---|---|---:|---:|---:|---:|---:|"
    lines = [head, sep]
    for r in rows:
        lines.append(
            f"| {r['shape'][0]} -> {r['shape'][1]} | {r['method']} | {r['params']:,} | {r['fwd_ms']:.2f} | "
            f"{r['fwd_ratio']:.2f} | {r['fwd_bwd_ms']:.2f} | {r['fwd_bwd_ratio']:.2f} |"
        )
    return "\n".join(lines)


def profile(spec: str, d_in: int, d_out: int, tokens: int, rows: int = 12) -> str:
    """Top ops (self CPU time) of 10 forward+backward steps of method ``spec`` ("dense" or a
    label of :data:`METHODS`)."""
    methods = {label: (fam, knobs) for label, fam, knobs in METHODS}
    family, knobs = (None, {}) if spec == "dense" else methods[spec]
    module = build(spec, family, knobs, d_in, d_out)
    x = torch.randn(tokens, d_in, requires_grad=True)
    g = torch.randn(tokens, d_out)
    _, step = make_steps(module, x, g)
    for _ in range(3):
        step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def code_version() -> str:
    """``git describe --always --dirty`` of the checkout (the families change; say which ran)."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--shape", type=int, nargs=2, action="append", metavar=("IN", "OUT"),
                   help="(in, out) shape; repeat for several (default: 384 384, 384 1536, 768 768)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads (default: all cores)")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--profile", metavar="METHOD", help="print the top ops of one method (e.g. dense, ldr:rank=2) and exit")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = [tuple(s) for s in args.shape] if args.shape else SHAPES
    if args.profile:
        for d_in, d_out in shapes:
            print(f"{args.profile} {d_in} -> {d_out}, {args.tokens} tokens, fwd+bwd x10")
            print(profile(args.profile, d_in, d_out, args.tokens))
        return 0
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    for d_in, d_out in shapes:
        rows += bench_shape(d_in, d_out, args.tokens, args.repeats, args.warmup)
        print(f"done {d_in} -> {d_out}", flush=True)
    config = {
        "tokens": args.tokens,
        "dtype": "float32",
        "repeats": args.repeats,
        "warmup": args.warmup,
        "threads": args.threads,
        "torch": torch.__version__,
        "code": code_version(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_count": os.cpu_count(),
        "loadavg_at_end": os.getloadavg(),
        "wall_s": round(time.perf_counter() - start, 1),
    }
    print(f"\ntokens={args.tokens}, float32, threads={args.threads}, median of {args.repeats} rounds (ms)\n")
    print(format_table(rows))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"config": config, "results": rows}, fh, indent=1)
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
