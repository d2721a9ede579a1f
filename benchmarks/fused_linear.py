"""Forward + backward cost of a LoRA-style (parallel) SURM layer, plain vs fused, against LoRA.

    python benchmarks/fused_linear.py [--rounds 15] [--out results.json]
    python benchmarks/fused_linear.py --policy [--out policy.json]     # crossover of prefer_fused

Per shape (in -> out) and token count, one process, interleaved rounds (every method once per
round, medians over rounds), float32, default threads:

- ``floor``: the frozen base linear alone (x requires grad, weight and bias frozen);
- ``lora8``: base + a LoRA r=8 branch written plainly, ``x @ A.T @ B.T`` (A, B trainable),
  the cost of PEFT LoRA's layer;
- ``<family>/plain``: ``F.linear(x, W0, b0) + scale * S(x)``;
- ``<family>/fused``: :func:`surm.structured.fused_parallel_linear`.

Memory, deterministic: the bytes of the tensors autograd saves for backward
(``saved_tensors_hooks``), unique storages, not counting the parameters and frozen weights
(which exist anyway); x itself is counted where a method saves it (the floor does not). Also
the peak of CPU allocations during forward + backward above the starting level (profiler
memory events): that includes transients (W_eff, FFT buffers, y, the gradients). The profiler
prints its start/stop lines on stderr.

Timings are sensitive to other load on the machine: with 2 threads on an oversubscribed CPU
every parallel region can wait a scheduler slice for its second thread, which penalises long
sequences of small ops (the chunked FFT adjoints) far more than one big matmul. The load
average at start is recorded; ``--threads 1`` (with the process CPU-time column) gives the
contention-robust comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from surm import structured
from surm.structured import fused_parallel_linear, plain_parallel_linear

SHAPES = [(384, 384), (384, 1536), (1536, 384), (768, 768)]  # (in, out)
TOKENS = [32 * 64, 32 * 128]
FAMILIES = [
    ("circulant", {}),
    ("toeplitz", {}),
    ("symmetric_toeplitz", {}),
    ("kronecker", {}),
    ("ldr_r1", {"rank": 1}),
    ("ldr_r2", {"rank": 2}),
]
SCALE = 0.5


def family_name(label: str) -> str:
    return "ldr" if label.startswith("ldr") else label


def make_methods(n: int, m: int, seed: int = 0):
    """name -> (step function computing y, the parameters that must not be counted as activations,
    the trainable tensors whose .grad is reset)."""
    torch.manual_seed(seed)
    W = torch.randn(m, n) * n**-0.5
    b = torch.zeros(m)
    methods = {}

    def floor(x):
        return F.linear(x, W, b)

    methods["floor"] = (floor, [W, b], [])

    A = torch.nn.Parameter(torch.randn(8, n) * n**-0.5)
    B = torch.nn.Parameter(torch.randn(m, 8) * 0.01)

    def lora(x):
        return F.linear(x, W, b) + SCALE * ((x @ A.T) @ B.T)

    methods["lora8"] = (lora, [W, b, A, B], [A, B])

    for label, knobs in FAMILIES:
        S = structured.make(family_name(label), m, n, init="random", **knobs)
        params = list(S.parameters())
        methods[f"{label}/plain"] = (lambda x, S=S: plain_parallel_linear(x, W, b, S, SCALE), [W, b, *params], params)
        methods[f"{label}/fused"] = (lambda x, S=S: fused_parallel_linear(x, W, b, S, SCALE), [W, b, *params], params)
    return methods


def run_once(step, x, gy, trainable):
    x.grad = None
    for p in trainable:
        p.grad = None
    y = step(x)
    y.backward(gy)


def saved_bytes(step, x, gy, exclude) -> int:
    """Bytes of the unique storages autograd saves during the forward, parameters excluded."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in excluded:
            storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = step(x)
    y.backward(gy)
    return sum(storages.values())


def peak_bytes(step, x, gy, trainable) -> int | None:
    """Peak of CPU allocations during one forward + backward, above the level at its start."""
    try:
        from torch.profiler import ProfilerActivity, profile
    except ImportError:  # pragma: no cover
        return None
    x.grad = None
    for p in trainable:
        p.grad = None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        y = step(x)
        y.backward(gy)
        del y
    # allocations are attributed (self) to the innermost op, frees are "[memory]" events
    events = [(e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage]
    if not events:
        return None
    level = peak = 0
    for _, delta in sorted(events):
        level += delta
        peak = max(peak, level)
    return peak


def bench_config(n, m, tokens, rounds, warmup=2):
    methods = make_methods(n, m)
    torch.manual_seed(1)
    x = torch.randn(tokens, n, requires_grad=True)
    gy = torch.randn(tokens, m)
    times = {name: [] for name in methods}
    cpu = {name: [] for name in methods}
    for name, (step, _, trainable) in methods.items():
        for _ in range(warmup):
            run_once(step, x, gy, trainable)
    for _ in range(rounds):
        for name, (step, _, trainable) in methods.items():
            c0, t0 = time.process_time(), time.perf_counter()
            run_once(step, x, gy, trainable)
            times[name].append((time.perf_counter() - t0) * 1e3)
            cpu[name].append((time.process_time() - c0) * 1e3)
    out = {}
    for name, (step, exclude, trainable) in methods.items():
        out[name] = {
            "median_ms": statistics.median(times[name]),
            "min_ms": min(times[name]),
            "cpu_ms": statistics.median(cpu[name]),
            "saved_bytes": saved_bytes(step, x, gy, exclude),
            "peak_alloc_bytes": peak_bytes(step, x, gy, trainable),
        }
    floor, lora = out["floor"]["median_ms"], out["lora8"]["median_ms"]
    lora_cpu = out["lora8"]["cpu_ms"]
    for r in out.values():
        r["x_floor"] = r["median_ms"] / floor
        r["x_lora8"] = r["median_ms"] / lora
        r["cpu_x_lora8"] = r["cpu_ms"] / lora_cpu
    return out


def print_table(key, res):
    print(f"\n## in={key[0]} out={key[1]} tokens={key[2]}")
    print(
        f"{'method':26s} {'median ms':>9s} {'/floor':>6s} {'/lora8':>6s} {'cpu ms':>7s} {'cpu/lora8':>9s} "
        f"{'saved MB':>8s} {'peak MB':>7s}"
    )
    for name, r in res.items():
        peak = r["peak_alloc_bytes"]
        peak_s = f"{peak / 2**20:7.2f}" if peak is not None else "    n/a"
        print(
            f"{name:26s} {r['median_ms']:9.2f} {r['x_floor']:6.2f} {r['x_lora8']:6.2f} {r['cpu_ms']:7.1f} "
            f"{r['cpu_x_lora8']:9.2f} {r['saved_bytes'] / 2**20:8.2f} {peak_s}"
        )
    sys.stdout.flush()


def main_bench(args):
    results = []
    for n, m in SHAPES:
        for tokens in TOKENS:
            res = bench_config(n, m, tokens, args.rounds)
            print_table((n, m, tokens), res)
            results.append({"in": n, "out": m, "tokens": tokens, "methods": res})
    print("\n## fused / lora8: wall-clock median (process CPU time median)")
    print(f"{'shape':12s} {'tokens':>6s} " + " ".join(f"{label:>18s}" for label, _ in FAMILIES))
    for r in results:
        cells = " ".join(
            f"{r['methods'][f'{label}/fused']['x_lora8']:9.2f} ({r['methods'][f'{label}/fused']['cpu_x_lora8']:4.2f})"
            for label, _ in FAMILIES
        )
        print(f"{r['in']:>5d}->{r['out']:<5d} {r['tokens']:6d} {cells}")
    return results


def main_policy(args):
    """Fused vs plain over token counts (training: forward + backward; inference: forward under
    no_grad), per family and shape. Records wall-clock and process CPU time medians; the CPU
    time (work done, not preemption) is what the policy is fitted to on a shared machine."""
    tokens_list = [4, 16, 64, 128, 256, 512, 1024, 4096]
    out = []
    for n, m in SHAPES:
        torch.manual_seed(0)
        W = torch.randn(m, n) * n**-0.5
        b = torch.zeros(m)
        for label, knobs in FAMILIES + [("low_rank", {"rank": 8})]:
            S = structured.make(family_name(label), m, n, init="random", **knobs)
            params = list(S.parameters())
            row = {"in": n, "out": m, "family": label, "points": []}
            steps = {
                "plain": lambda x, S=S: plain_parallel_linear(x, W, b, S, SCALE),
                "fused": lambda x, S=S: fused_parallel_linear(x, W, b, S, SCALE),
            }
            for tokens in tokens_list:
                x = torch.randn(tokens, n, requires_grad=True)
                gy = torch.randn(tokens, m)
                rec = {
                    f"{mode}_{k}_{clock}": []
                    for mode in ("train", "eval")
                    for k in steps
                    for clock in ("ms", "cpu_ms")
                }
                for step in steps.values():
                    run_once(step, x, gy, params)
                for _ in range(args.rounds):
                    for k, step in steps.items():
                        c0, t0 = time.process_time(), time.perf_counter()
                        run_once(step, x, gy, params)
                        rec[f"train_{k}_ms"].append((time.perf_counter() - t0) * 1e3)
                        rec[f"train_{k}_cpu_ms"].append((time.process_time() - c0) * 1e3)
                        with torch.no_grad():
                            c0, t0 = time.process_time(), time.perf_counter()
                            step(x)
                            rec[f"eval_{k}_ms"].append((time.perf_counter() - t0) * 1e3)
                            rec[f"eval_{k}_cpu_ms"].append((time.process_time() - c0) * 1e3)
                point = {"tokens": tokens, **{k: statistics.median(v) for k, v in rec.items()}}
                for mode in ("train", "eval"):
                    point[f"{mode}_cpu_ratio"] = point[f"{mode}_fused_cpu_ms"] / point[f"{mode}_plain_cpu_ms"]
                    point[f"{mode}_ratio"] = point[f"{mode}_fused_ms"] / point[f"{mode}_plain_ms"]
                row["points"].append(point)
            for mode in ("train", "eval"):
                first = next((p["tokens"] for p in row["points"] if p[f"{mode}_cpu_ratio"] < 1.0), None)
                row[f"{mode}_first_fused_tokens"] = first
            out.append(row)
            cells = " ".join(
                f"{p['tokens']}:{p['train_cpu_ratio']:.2f}/{p['eval_cpu_ratio']:.2f}" for p in row["points"]
            )
            print(f"{n:5d}->{m:<5d} {label:18s} fused/plain CPU time, train/eval, by tokens: {cells}")
            sys.stdout.flush()
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--policy", action="store_true", help="measure the fused/plain crossover instead")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's default)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    env = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "rounds": args.rounds,
        "loadavg_at_start": os.getloadavg(),
    }
    print(json.dumps(env))
    results = main_policy(args) if args.policy else main_bench(args)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"env": env, "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
