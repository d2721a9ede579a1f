"""The LoRA-style (parallel) SURM layer, plain against fused, against LoRA; and the crossover.

:func:`bench_config`: per shape (in -> out) and token count, float32, interleaved rounds
(every method once per round, medians over rounds):

- ``floor``: the frozen base linear alone (x requires grad, weight and bias frozen);
- ``lora8``: base + a LoRA r=8 branch written plainly, ``x @ A.T @ B.T`` (A, B trainable),
  the cost of PEFT LoRA's layer;
- ``<family>/plain``: ``F.linear(x, W0, b0) + scale * S(x)``;
- ``<family>/fused``: :func:`surm.structured.fused_parallel_linear`.

Memory, deterministic: the bytes of the tensors autograd saves for backward, not counting the
parameters and frozen weights (which exist anyway); x itself is counted where a method saves
it (the floor does not). Also the peak of CPU allocations during forward + backward
(:func:`~surm.bench.memory.peak_alloc_bytes`), transients included.

:func:`policy`: fused against plain over token counts, training (forward + backward) and
inference (forward under no_grad), the measurement ``surm.structured.prefer_fused`` is
fitted to (docs/fused_policy.md).

Both clocks are recorded: wall-clock, and process CPU time (work done, not preemption: the
contention-robust comparison with one thread). With 2 threads on an oversubscribed CPU every
parallel region can wait a scheduler slice for its second thread, which penalises long
sequences of small ops (the chunked FFT adjoints) far more than one big matmul.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from surm import structured
from surm.structured import MergeWorkspace, fused_parallel_linear, plain_parallel_linear

from .memory import peak_alloc_bytes, saved_tensor_bytes
from .report import machine, markdown_table, write_json
from .timing import interleaved_samples

SHAPES = [(384, 384), (384, 1536), (1536, 384), (768, 768)]  # (in, out)
TOKENS = [32 * 64, 32 * 128]
#: token counts of the crossover measurement
POLICY_TOKENS = [4, 16, 64, 128, 256, 512, 1024, 4096]
#: (label, knobs); the family is the label without its "_r<rank>" suffix
FAMILIES = [
    ("circulant", {}),
    ("toeplitz", {}),
    ("symmetric_toeplitz", {}),
    ("kronecker", {}),
    ("ldr_r1", {"rank": 1}),
    ("ldr_r2", {"rank": 2}),
]
#: the crossover is also measured for a low-rank S (the same rule covers it)
POLICY_FAMILIES = FAMILIES + [("low_rank", {"rank": 8})]
SCALE = 0.5

#: a method: (forward of x, tensors not counted as activations, trainable tensors whose grads reset)
Step = tuple[Callable[[torch.Tensor], torch.Tensor], list[torch.Tensor], list[torch.Tensor]]


def family_name(label: str) -> str:
    return "ldr" if label.startswith("ldr") else label


def make_methods(n: int, m: int, seed: int = 0) -> dict[str, Step]:
    """floor, lora8, and plain and fused for every family of :data:`FAMILIES`, at in=n, out=m."""
    torch.manual_seed(seed)
    W = torch.randn(m, n) * n**-0.5
    b = torch.zeros(m)
    methods: dict[str, Step] = {"floor": (lambda x: F.linear(x, W, b), [W, b], [])}
    A = torch.nn.Parameter(torch.randn(8, n) * n**-0.5)
    B = torch.nn.Parameter(torch.randn(m, 8) * 0.01)
    methods["lora8"] = (lambda x: F.linear(x, W, b) + SCALE * ((x @ A.T) @ B.T), [W, b, A, B], [A, B])
    workspace = MergeWorkspace()  # as a SurmLayer holds one: the merge buffers of this shape
    for label, knobs in FAMILIES:
        S = structured.make(family_name(label), m, n, init="random", **knobs)
        params = list(S.parameters())
        methods[f"{label}/plain"] = (lambda x, S=S: plain_parallel_linear(x, W, b, S, SCALE), [W, b, *params], params)
        methods[f"{label}/fused"] = (
            lambda x, S=S: fused_parallel_linear(x, W, b, S, SCALE, workspace=workspace), [W, b, *params], params
        )
    return methods


def training_step(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, gy: torch.Tensor,
                  trainable: list[torch.Tensor]) -> Callable[[], None]:
    """One forward + backward of ``forward`` on x with output gradient gy, gradients reset first."""

    def run() -> None:
        _clear_grads(x, trainable)
        forward(x).backward(gy)

    return run


def _clear_grads(x: torch.Tensor, trainable: list[torch.Tensor]) -> None:
    for t in (x, *trainable):
        t.grad = None


def bench_config(n: int, m: int, tokens: int, rounds: int, warmup: int = 2) -> dict[str, dict[str, Any]]:
    """Per method: median and min wall ms, median CPU ms, saved and peak bytes, ratios to the
    floor and to lora8."""
    methods = make_methods(n, m)
    torch.manual_seed(1)
    x = torch.randn(tokens, n, requires_grad=True)
    gy = torch.randn(tokens, m)
    steps = {name: training_step(fwd, x, gy, trainable) for name, (fwd, _, trainable) in methods.items()}
    samples = interleaved_samples(steps, rounds, warmup, clocks=("wall", "cpu"), rotate=False)
    out = {}
    for name, (fwd, exclude, trainable) in methods.items():
        wall = [1e3 * s for s in samples[name]["wall"]]
        saved = saved_tensor_bytes(lambda: fwd(x), exclude, grad=gy)
        _clear_grads(x, trainable)  # before the profiler starts: the peak counts this step's gradients
        out[name] = {
            "median_ms": statistics.median(wall),
            "min_ms": min(wall),
            "cpu_ms": 1e3 * statistics.median(samples[name]["cpu"]),
            "saved_bytes": saved,
            "peak_alloc_bytes": peak_alloc_bytes(lambda: fwd(x).backward(gy)),
        }
    floor, lora, lora_cpu = out["floor"]["median_ms"], out["lora8"]["median_ms"], out["lora8"]["cpu_ms"]
    for r in out.values():
        r["x_floor"] = r["median_ms"] / floor
        r["x_lora8"] = r["median_ms"] / lora
        r["cpu_x_lora8"] = r["cpu_ms"] / lora_cpu
    return out


def _mb(value: int | None) -> float | str:
    return value / 2**20 if value is not None else "n/a"


CONFIG_TABLE = [
    ("method", "method", ""), ("median ms", "median_ms", ".2f"), ("/floor", "x_floor", ".2f"),
    ("/lora8", "x_lora8", ".2f"), ("cpu ms", "cpu_ms", ".1f"), ("cpu/lora8", "cpu_x_lora8", ".2f"),
    ("saved MB", lambda r: _mb(r["saved_bytes"]), ".2f"), ("peak MB", lambda r: _mb(r["peak_alloc_bytes"]), ".2f"),
]


def compare(shapes=SHAPES, tokens_list=TOKENS, rounds: int = 15) -> list[dict[str, Any]]:
    """:func:`bench_config` at every shape and token count; prints a table per configuration
    and a summary of fused / lora8."""
    results = []
    for n, m in shapes:
        for tokens in tokens_list:
            res = bench_config(n, m, tokens, rounds)
            print(f"\n## in={n} out={m} tokens={tokens}\n")
            print(markdown_table([{"method": name, **r} for name, r in res.items()], CONFIG_TABLE), flush=True)
            results.append({"in": n, "out": m, "tokens": tokens, "methods": res})
    print("\n## fused / lora8: wall-clock median (process CPU time median)\n")
    summary = [{"shape": f"{r['in']}->{r['out']}", "tokens": r["tokens"],
                **{label: f"{r['methods'][f'{label}/fused']['x_lora8']:.2f} "
                          f"({r['methods'][f'{label}/fused']['cpu_x_lora8']:.2f})" for label, _ in FAMILIES}}
               for r in results]
    print(markdown_table(summary, [("shape", "shape", ""), ("tokens", "tokens", ""),
                                   *((label, label, "") for label, _ in FAMILIES)]))
    return results


def policy(
    shapes=SHAPES, tokens_list=POLICY_TOKENS, families=POLICY_FAMILIES, rounds: int = 15
) -> list[dict[str, Any]]:
    """Fused against plain over token counts (training: forward + backward; inference: forward
    under no_grad), per family and shape. Records wall-clock and process CPU time medians; the
    CPU time (work done, not preemption) is what the policy is fitted to on a shared machine.
    ``<mode>_first_fused_tokens``: the first token count where fused took less CPU time."""
    out = []
    for n, m in shapes:
        torch.manual_seed(0)
        W = torch.randn(m, n) * n**-0.5
        b = torch.zeros(m)
        workspace = MergeWorkspace()
        for label, knobs in families:
            S = structured.make(family_name(label), m, n, init="random", **knobs)
            params = list(S.parameters())
            paths = {
                "plain": lambda x, S=S: plain_parallel_linear(x, W, b, S, SCALE),
                "fused": lambda x, S=S: fused_parallel_linear(x, W, b, S, SCALE, workspace=workspace),
            }
            row = {"in": n, "out": m, "family": label, "points": []}
            for tokens in tokens_list:
                x = torch.randn(tokens, n, requires_grad=True)
                gy = torch.randn(tokens, m)
                fns: dict[str, Callable[[], object]] = {}
                for k, forward in paths.items():
                    fns[f"train_{k}"] = training_step(forward, x, gy, params)
                    fns[f"eval_{k}"] = lambda forward=forward: _no_grad(forward, x)
                samples = interleaved_samples(fns, rounds, warmup=1, clocks=("wall", "cpu"), rotate=False)
                point: dict[str, Any] = {"tokens": tokens}
                for name, by_clock in samples.items():
                    point[f"{name}_ms"] = 1e3 * statistics.median(by_clock["wall"])
                    point[f"{name}_cpu_ms"] = 1e3 * statistics.median(by_clock["cpu"])
                for mode in ("train", "eval"):
                    point[f"{mode}_cpu_ratio"] = point[f"{mode}_fused_cpu_ms"] / point[f"{mode}_plain_cpu_ms"]
                    point[f"{mode}_ratio"] = point[f"{mode}_fused_ms"] / point[f"{mode}_plain_ms"]
                row["points"].append(point)
            for mode in ("train", "eval"):
                first = next((p["tokens"] for p in row["points"] if p[f"{mode}_cpu_ratio"] < 1.0), None)
                row[f"{mode}_first_fused_tokens"] = first
            out.append(row)
            cells = " ".join(f"{p['tokens']}:{p['train_cpu_ratio']:.2f}/{p['eval_cpu_ratio']:.2f}"
                             for p in row["points"])
            print(f"{n:5d}->{m:<5d} {label:18s} fused/plain CPU time, train/eval, by tokens: {cells}", flush=True)
    return out


def _no_grad(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> None:
    with torch.no_grad():
        forward(x)


def run(crossover: bool = False, rounds: int = 15, out: Path | None = None, quick: bool = False) -> dict[str, Any]:
    """The comparison (``fused.json``), or with ``crossover`` the crossover measurement
    (``fused_policy.json``). ``quick``: one 64 -> 64 shape, few tokens (smoke)."""
    shapes = [(64, 64)] if quick else SHAPES
    record: dict[str, Any] = {"machine": machine()}
    config: dict[str, Any] = {"rounds": rounds, "shapes": shapes}
    if crossover:
        config["tokens"] = [4, 32] if quick else POLICY_TOKENS
        results, name = policy(shapes, config["tokens"], rounds=rounds), "fused_policy.json"
    else:
        config["tokens"] = [32] if quick else TOKENS
        results, name = compare(shapes, config["tokens"], rounds=rounds), "fused.json"
    record.update(config=config, results=results)
    if out is not None:
        write_json(out / name, record)
    return record
