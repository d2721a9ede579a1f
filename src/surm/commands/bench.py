"""``surm bench``: speed and memory of SURM against PEFT LoRA and C3A, measured in one run."""

from __future__ import annotations

import argparse

PARTS = ("layers", "steps", "inference")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench",
        help="speed and memory: per layer, MiniLM training steps, merged inference (ratios to LoRA and the floor)",
        description=(
            "Interleaved median timings, in one process, of the frozen base, PEFT LoRA r=8, PEFT C3A "
            "and every SURM family: per-layer forward+backward, end-to-end MiniLM training steps "
            "(head-only as the floor) with their training memory, and inference after merging."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("parts", nargs="*", metavar="PART",
                   help=f"which benchmarks: any of {', '.join(PARTS)} (default: all)")
    p.add_argument("--methods", nargs="+", default=None, help="method names (default: all; see surm.bench.methods)")
    p.add_argument("--repeats", type=int, default=10, help="interleaved rounds per measurement")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[64, 128], help="token counts of the training steps")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall: latency; cpu: process CPU time (robust on a shared machine; use with --threads 1)")
    p.add_argument("--out", default="runs/bench", help="folder for bench.json")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks that everything runs")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from surm.bench import timing
    from surm.bench.report import run as run_bench

    timing.clock = args.clock

    if args.threads:
        torch.set_num_threads(args.threads)
    parts = list(args.parts) or list(PARTS)
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        print(f"surm bench: error: unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
        return 2
    run_bench(parts, methods=args.methods, repeats=args.repeats, out=Path(args.out),
              seq_lens=tuple(args.seq_lens), quick=args.quick)
    return 0
