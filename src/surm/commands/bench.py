"""``surm bench``: speed and memory, every timing interleaved and measured in one process.

``surm bench [PART ...]``: ``layers``, ``steps``, ``inference`` (SURM against PEFT's LoRA,
C3A, LoKr, FourierFT and VeRA, the default), ``ops`` (each structured product against dense),
``fused`` (the fused parallel layer against the plain one; ``--policy``: where fused starts to
win), ``llm`` (one layer at SmolLM2-135M's and Llama-2-7B's shapes against LoRA r=16;
``--device``/``--dtype`` for a GPU). The benchmarks are
:mod:`surm.bench`; this module parses, checks and dispatches.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from surm.bench import DEFAULT_METHODS, PARTS, PEFT_PARTS, QUANT_FORMATS, REFERENCE_METHODS
from surm.commands.errors import UsageError
from surm.harness.outputs import default_dir

if TYPE_CHECKING:
    from surm.harness.methods import Method

HELP = "speed and memory: SURM against PEFT's LoRA, C3A, LoKr, FourierFT and VeRA, structured products, the fused layer"

DESCRIPTION = """\
Interleaved median timings, in one process, read as ratios to references measured in the
same rounds. Parts:
  layers     one linear layer, forward + backward, frozen and with each method
  steps      MiniLM training steps (head only as the floor) and their training memory
             (--rss-processes: and their peak resident growth, in fresh processes)
  inference  MiniLM after merge_and_unload, against the base model
  ops        each structured product, forward and forward + backward, against a dense matmul
  fused      the fused parallel SURM layer against the plain one and a LoRA branch
  llm        one layer at SmolLM2-135M's and Llama-2-7B's shapes, 2048 tokens, against LoRA
             r=16: time, overhead over the frozen layer, saved-for-backward bytes
  adapters   SmolLM2-135M with N adapters: batches whose rows use different adapters
             (adapter_names) against one adapter, SURM against LoRA r=8; resident memory per
             adapter; loading N saved adapters (load_adapters against PEFT's load_adapter)
  quantized  SmolLM2-135M on float32, bfloat16, bitsandbytes int8 / nf4 and torchao int8 bases:
             SURM circulant and Toeplitz (q,v) and circulant on every map against LoRA r=8 (q,v)
             and the frozen base: training steps, memory, and what merging does on each base
"""

EPILOG = f"""\
methods (--methods): method strings, as for surm finetune, e.g.
  lora:8   c3a:64   surm:circulant   surm:circulant:block_size=128   surm:ldr:rank=2
  surm:toeplitz:serial   houlsby:32   head   full   bitfit
  {' and '.join(REFERENCE_METHODS)} are always measured: the ratios are taken to them.

examples:
  surm bench --threads 1 --clock cpu --repeats 7      # docs/benchmarks.md
  surm bench llm --threads 1 --clock cpu --repeats 5  # docs/benchmarks.md, LLM shapes
  surm bench llm --device cuda --dtype bfloat16       # the same on a GPU
  surm bench layers --methods surm:kronecker --quick
  surm bench ops --threads 1                          # docs/structured_ops.md
  surm bench ops --profile ldr:rank=2 --shape 384 1536
  surm bench ops --cost-model --threads 1             # docs/fused_policy.md
  surm bench fused --policy --threads 1 --repeats 7   # docs/fused_policy.md
  surm bench adapters --threads 1 --clock cpu         # docs/benchmarks.md, many adapters
  surm bench quantized --threads 1 --clock cpu        # docs/benchmarks.md, quantized bases
"""

#: options that only some parts read: dest -> (the parts, the flag as written)
_PART_OPTIONS = {
    "methods": ((*PEFT_PARTS, "llm"), "--methods"),
    "device": (("layers", "llm"), "--device"),
    "dtype": (("layers", "llm"), "--dtype"),
    "seq_lens": (("steps",), "--seq-lens"),
    "rss_processes": (("steps",), "--rss-processes"),
    "tokens": (("ops",), "--tokens"),
    "shape": (("ops",), "--shape"),
    "warmup": (("ops",), "--warmup"),
    "profile": (("ops",), "--profile"),
    "cost_model": (("ops",), "--cost-model"),
    "policy": (("fused",), "--policy"),
    "counts": (("adapters",), "--counts"),
    "prompt_tokens": (("adapters",), "--prompt-tokens"),
    "new_tokens": (("adapters",), "--new-tokens"),
    "load_count": (("adapters",), "--load-count"),
    "formats": (("quantized",), "--formats"),
    "steps": (("quantized",), "--steps"),
    "batch_size": (("quantized",), "--batch-size"),
    "seq_len": (("quantized",), "--seq-len"),
}
#: interleaved rounds when --repeats is not given
_DEFAULT_REPEATS = {"peft": 10, "ops": 20, "fused": 15, "adapters": 3, "quantized": 3}
#: --dtype choices (names of torch dtypes)
DTYPES = ("float32", "bfloat16", "float16", "float64")
#: the parts that read --device and --dtype; the others run on the CPU in float32
_DEVICE_PARTS = ("layers", "llm")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``bench`` on an ``argparse`` subparsers object; sets ``func=run``."""
    p = subparsers.add_parser(
        "bench", help=HELP, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description=DESCRIPTION,
    )
    p.add_argument("parts", nargs="*", metavar="PART",
                   help=f"any of {', '.join(PARTS)} (default: {' '.join(PEFT_PARTS)})")
    every = p.add_argument_group("every part")
    every.add_argument("--repeats", "--rounds", dest="repeats", type=int, default=None,
                       help="interleaved rounds per measurement (default: 10; ops 20, fused 15)")
    every.add_argument("--threads", type=int, default=None,
                       help="torch threads (default: torch's; ops: every core)")
    every.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                       help="wall: latency; cpu: process CPU time, robust on a shared machine, use with "
                            "--threads 1 (default: wall; fused records both)")
    every.add_argument("--output-dir", "--out", dest="output_dir", default=str(default_dir("bench")),
                       help="folder for bench.json, ops.json, ops_costs.json, fused.json, fused_policy.json "
                            "(default: %(default)s)")
    every.add_argument("--quick", action="store_true", help="tiny sizes: checks that everything runs")
    layer = p.add_argument_group("layers, llm")
    layer.add_argument("--device", default=None, help="torch device of the layers, e.g. cuda (default: cpu)")
    layer.add_argument("--dtype", choices=DTYPES, default=None,
                       help="dtype of the base layer, inputs and gradients (default: float32)")
    peft = p.add_argument_group(", ".join(PEFT_PARTS) + ", llm")
    peft.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                      help=f"method strings (default: {' '.join(DEFAULT_METHODS)})")
    peft.add_argument("--seq-lens", type=int, nargs="+", default=None, metavar="N",
                      help="token counts of the training steps (default: 64 128)")
    peft.add_argument("--rss-processes", type=int, default=None, metavar="N",
                      help="steps: also the peak resident (RSS) growth of two training steps, the median of N "
                           "fresh processes per method and token count (default: not measured)")
    ops = p.add_argument_group("ops")
    ops.add_argument("--tokens", type=int, default=None, help="rows of x (default: 2048; --cost-model 4096)")
    ops.add_argument("--shape", type=int, nargs=2, action="append", metavar=("IN", "OUT"),
                     help="(in, out) shape; repeat for several (default: 384 384, 384 1536, 768 768)")
    ops.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default: 3)")
    ops.add_argument("--profile", metavar="METHOD", default=None,
                     help="print the top ops of one method (dense, circulant, ldr:rank=2, ...) instead")
    ops.add_argument("--cost-model", action="store_true",
                     help="measure the FFT and matmul cost units the adjoints choose their route by, instead")
    fused = p.add_argument_group("fused")
    fused.add_argument("--policy", action="store_true",
                       help="measure fused against plain over token counts (the crossover of prefer_fused) instead")
    many = p.add_argument_group("adapters")
    many.add_argument("--counts", type=int, nargs="+", default=None, metavar="N",
                      help="numbers of distinct adapters in the batch (default: 1 4 16 64 256 1024)")
    many.add_argument("--prompt-tokens", type=int, default=None, help="tokens per prompt row (default: 4)")
    many.add_argument("--new-tokens", type=int, default=None, help="greedy tokens generated per row (default: 3)")
    many.add_argument("--load-count", type=int, default=None,
                      help="saved adapters loaded in the loading test (default: the largest of --counts)")
    quant = p.add_argument_group("quantized")
    quant.add_argument("--formats", nargs="+", default=None, metavar="FORMAT",
                       help=f"base formats, any of {' '.join(QUANT_FORMATS)} (default: all)")
    quant.add_argument("--steps", type=int, default=None,
                       help="training steps per model in each timed round (default: 2)")
    quant.add_argument("--batch-size", type=int, default=None, help="sequences per training step (default: 2)")
    quant.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: 128)")
    p.set_defaults(func=run)
    return p


def _check(args: argparse.Namespace) -> tuple[list[str], list[Method] | None]:
    """The parts to run and the parsed methods (None without a PEFT part); raises UsageError on
    anything that cannot run, before any model loads."""
    parts = list(dict.fromkeys(args.parts)) or list(PEFT_PARTS)
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise UsageError(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    for dest, (readers, flag) in _PART_OPTIONS.items():
        if getattr(args, dest) not in (None, False) and not set(readers) & set(parts):
            raise UsageError(f"{flag} applies to {' or '.join(readers)}, which this run leaves out; "
                             f"e.g. surm bench {readers[0]} {flag} ...")
    numbers = [("--repeats", args.repeats, 1), ("--threads", args.threads, 1), ("--tokens", args.tokens, 1),
               ("--warmup", args.warmup, 0)]
    numbers += [("--seq-lens", n, 1) for n in args.seq_lens or ()]
    numbers += [("--rss-processes", args.rss_processes, 1)]
    numbers += [("--counts", n, 1) for n in args.counts or ()]
    numbers += [("--prompt-tokens", args.prompt_tokens, 1), ("--new-tokens", args.new_tokens, 1),
                ("--load-count", args.load_count, 1)]
    numbers += [("--shape", n, 1) for shape in args.shape or () for n in shape]
    numbers += [("--steps", args.steps, 1), ("--batch-size", args.batch_size, 1), ("--seq-len", args.seq_len, 2)]
    for flag, value, least in numbers:
        if value is not None and value < least:
            raise UsageError(f"{flag} must be at least {least}, got {value}")
    _check_device(args, parts)
    unknown_formats = [f for f in args.formats or () if f not in QUANT_FORMATS]
    if unknown_formats:
        raise UsageError(f"--formats: unknown format(s) {', '.join(unknown_formats)}; choose from "
                         f"{', '.join(QUANT_FORMATS)}")
    if args.profile and args.cost_model:
        raise UsageError("--profile and --cost-model are two different runs; give one")
    if args.profile:
        from surm.bench.ops import LABELS

        if args.profile not in LABELS:
            raise UsageError(f"--profile {args.profile!r}: not an ops method; choose from {', '.join(LABELS)}")
    if not set(PEFT_PARTS) & set(parts):
        if "llm" in parts and args.methods:
            _methods(args.methods)
        return parts, None
    return parts, _methods(args.methods)


def _methods(strings: list[str] | None) -> list[Method]:
    """The PEFT comparison's methods (references first), or a UsageError on a bad string."""
    from surm.bench.peft_comparison import with_references

    try:
        return with_references(strings)
    except ValueError as err:
        raise UsageError(err) from None


def _check_device(args: argparse.Namespace, parts: list[str]) -> None:
    """--device and --dtype: only with the parts that read them, a device torch knows, CUDA only
    where torch sees it, and the wall clock off the CPU (process CPU time does not see a GPU)."""
    if args.device is None and args.dtype is None:
        return
    others = [p for p in parts if p not in _DEVICE_PARTS]
    if others:
        raise UsageError(f"--device and --dtype apply to {' and '.join(_DEVICE_PARTS)} only, not to "
                         f"{', '.join(others)}; e.g. surm bench llm --device cuda --dtype bfloat16")
    if args.device is None:
        return
    import torch

    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {args.device!r}: not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: torch {torch.__version__} sees no CUDA device on this machine; "
                         f"leave --device out to run on the CPU")
    if device.type != "cpu" and args.clock == "cpu":
        raise UsageError(f"--clock cpu measures this process's CPU time, not the work of {device.type}; "
                         f"use --clock wall with --device {args.device}")


def _device_options(args: argparse.Namespace) -> dict[str, str]:
    return {"device": args.device or "cpu", "dtype": args.dtype or "float32"}


def run(args: argparse.Namespace) -> int:
    """Run the parts the arguments name; prints tables, writes JSON into ``--output-dir``."""
    import os
    from pathlib import Path

    from surm.harness.threads import torch_threads

    parts, methods = _check(args)
    out = Path(args.output_dir)
    peft_parts = [p for p in PEFT_PARTS if p in parts]
    if peft_parts:
        from surm.bench import peft_comparison

        with torch_threads(args.threads):
            peft_comparison.run(peft_parts, methods, repeats=args.repeats or _DEFAULT_REPEATS["peft"], out=out,
                                seq_lens=tuple(args.seq_lens or (64, 128)), quick=args.quick, clock=args.clock,
                                rss_processes=args.rss_processes or 0, **_device_options(args))
    if "llm" in parts:
        from surm.bench import peft_comparison

        with torch_threads(args.threads):
            peft_comparison.run_llm(args.methods, repeats=args.repeats or _DEFAULT_REPEATS["peft"], out=out,
                                    quick=args.quick, clock=args.clock, **_device_options(args))
    if "ops" in parts:
        from surm.bench import ops

        shapes = [tuple(s) for s in args.shape] if args.shape else None
        warmup = 3 if args.warmup is None else args.warmup
        timed = {"repeats": args.repeats or _DEFAULT_REPEATS["ops"], "warmup": warmup, "out": out,
                 "quick": args.quick, "clock": args.clock}
        with torch_threads(args.threads or os.cpu_count()):
            if args.profile:
                ops.run_profile(args.profile, shapes, args.tokens, quick=args.quick)
            elif args.cost_model:
                ops.run_cost_model(shapes, args.tokens, **timed)
            else:
                ops.run(shapes, args.tokens, **timed)
    if "fused" in parts:
        from surm.bench import fused

        with torch_threads(args.threads):
            fused.run(crossover=args.policy, rounds=args.repeats or _DEFAULT_REPEATS["fused"], out=out,
                      quick=args.quick)
    if "adapters" in parts:
        from surm.bench import adapters

        with torch_threads(args.threads):
            adapters.run(counts=args.counts, prompt_tokens=args.prompt_tokens or 4, new_tokens=args.new_tokens or 3,
                         repeats=args.repeats or _DEFAULT_REPEATS["adapters"], clock=args.clock, out=out,
                         quick=args.quick, load_count=args.load_count)
    if "quantized" in parts:
        from surm.bench import quantized

        with torch_threads(args.threads):
            quantized.run(args.formats, steps=args.steps or 2, repeats=args.repeats or _DEFAULT_REPEATS["quantized"],
                          batch=args.batch_size or 2, seq_len=args.seq_len or 128, clock=args.clock, out=out,
                          quick=args.quick)
    return 0
