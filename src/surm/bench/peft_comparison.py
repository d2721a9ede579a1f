"""SURM against PEFT's LoRA, C3A, LoKr, FourierFT and VeRA (and LoRA-FIX): per layer, MiniLM
training steps, merged inference.

Prints one Markdown table of ratios per part and writes ``bench.json``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from surm.harness.methods import Method, parse

from . import DEFAULT_METHODS, LLM_METHODS, LLM_REFERENCE_METHODS, PEFT_PARTS, REFERENCE_METHODS
from .report import machine, markdown_table, write_json


def with_references(
    methods: Sequence[str | Method] | None,
    defaults: Sequence[str] = DEFAULT_METHODS,
    references: Sequence[str] = REFERENCE_METHODS,
) -> list[Method]:
    """``methods`` (default ``defaults``) parsed, the references the ratios need (``head``,
    ``lora:8``) put first where missing. Raises ValueError on a bad method string."""
    chosen = [parse(m) for m in (methods or defaults)]
    missing = [parse(r) for r in references if parse(r) not in chosen]
    return missing + chosen


LAYER_TABLE = [
    ("shape", "shape", ""), ("method", "method", ""), ("params", "trainable", ","),
    ("ms", "median_s_ms", ".2f"), ("x base", "vs_base", ".2f"),
    ("x LoRA r=8", "vs_lora", ".2f"), ("saved MB", "saved_mb", ".2f"),
]
#: the ``llm`` table: LoRA r=16 as the reference, the overhead and saved-bytes ratios
LLM_TABLE = [
    ("shape", "shape", ""), ("method", "method", ""), ("params", "trainable", ","),
    ("ms", "median_s_ms", ".1f"), ("x frozen", "vs_base", ".2f"), ("x LoRA r=16", "vs_lora", ".2f"),
    ("overhead / LoRA's", "overhead_vs_lora", ".2f"), ("saved MB", "saved_mb", ".1f"),
    ("saved / LoRA's", "saved_vs_lora", ".2f"),
]


def run_llm(
    methods: Sequence[str | Method] | None = None,
    repeats: int = 10,
    out: Path | None = None,
    quick: bool = False,
    clock: str = "wall",
    device: str = "cpu",
    dtype: str = "float32",
) -> dict[str, Any]:
    """The ``llm`` part: one layer at each of :data:`~surm.bench.layers.LLM_SHAPES` (2048
    tokens), forward + backward, every method against LoRA r=16 in the same rounds, on
    ``device`` in ``dtype``. ``quick``: the first shape at 64 tokens. Writes ``bench_llm.json``."""
    import torch

    from .layers import LLM_SHAPES, bench_layers

    methods = with_references(methods, LLM_METHODS, LLM_REFERENCE_METHODS)
    shapes = [(label, 64 if quick else t, i, o) for label, t, i, o in LLM_SHAPES[: 1 if quick else None]]
    results: dict[str, Any] = {"machine": machine(), "repeats": repeats, "clock": clock, "device": device,
                               "dtype": dtype, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    results["layers"] = bench_layers(methods, shapes, repeats=repeats, clock=clock, device=device,
                                     dtype=getattr(torch, dtype), reference=LLM_REFERENCE_METHODS[1])
    print(f"\n## LLM shapes, one layer: forward + backward (median), {device} {dtype}, ratios measured in one run\n")
    print(markdown_table(results["layers"], LLM_TABLE))
    if out is not None:
        write_json(out / "bench_llm.json", results)
    return results


STEPS_RSS_TABLE = [
    ("tokens", "seq_len", ""), ("method", "method", ""), ("peak RSS growth MiB", "peak_rss_growth_mib", ".1f"),
    ("held after MiB", "held_rss_growth_mib", ".1f"),
    ("runs MiB", lambda r: " / ".join(f"{v:.0f}" for v in r["peak_rss_growth_runs_mib"]), ""),
]


def _resident_growth(methods: Sequence[Method], lens: Sequence[int], batch: int, processes: int) -> list[dict]:
    """The steps' peak resident growth, one fresh process per measurement, printed as a table."""
    import torch

    from .training_step import bench_resident_growth

    records = bench_resident_growth(methods, seq_lens=lens, batch=batch, processes=processes,
                                    threads=torch.get_num_threads())
    print(f"\n## MiniLM, two training steps (AdamW), batch {batch}: peak resident growth over the size before "
          f"them, median of {processes} fresh processes\n")
    print(markdown_table(records, STEPS_RSS_TABLE))
    return records


def run(
    parts: Sequence[str] = PEFT_PARTS,
    methods: Sequence[str | Method] | None = None,
    repeats: int = 10,
    out: Path | None = None,
    seq_lens: tuple[int, ...] = (64, 128),
    quick: bool = False,
    clock: str = "wall",
    device: str = "cpu",
    dtype: str = "float32",
    rss_processes: int = 0,
) -> dict[str, Any]:
    """parts: any of "layers", "steps", "inference". ``quick`` shrinks everything (smoke).
    ``device`` and ``dtype`` (a torch dtype's name) are those of the ``layers`` part.
    ``rss_processes``: with ``steps``, also the peak resident growth of two training steps, the
    median over that many fresh processes per method and length (0: not measured)."""
    methods = with_references(methods)
    results: dict[str, Any] = {"machine": machine(), "repeats": repeats, "clock": clock,
                               "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if "layers" in parts:
        from .layers import DEFAULT_SHAPES, bench_layers

        shapes = [(label, 64 if quick else t, i, o) for label, t, i, o in DEFAULT_SHAPES[: 1 if quick else None]]
        import torch

        results["layers"] = bench_layers(methods, shapes, repeats=repeats, clock=clock, device=device,
                                         dtype=getattr(torch, dtype))
        print("\n## Per layer: forward + backward (median), ratios measured in one run\n")
        print(markdown_table(results["layers"], LAYER_TABLE))
    if "steps" in parts:
        from .training_step import bench_training_steps

        batch = 2 if quick else 32
        lens = (8,) if quick else seq_lens
        results["steps"] = bench_training_steps(methods, seq_lens=lens, batch=batch, repeats=repeats, clock=clock)
        print(f"\n## MiniLM training step (AdamW), batch {batch}, median; floor = head only\n")
        print(markdown_table(results["steps"], [
            ("tokens", "seq_len", ""), ("method", "method", ""), ("params", "trainable", ","),
            ("ms", "median_s_ms", ".1f"), ("x floor", "vs_floor", ".2f"),
            ("x LoRA r=8", "vs_lora", ".2f"), ("train mem MB", "training_memory_mb", ".1f"),
        ]))
        if rss_processes:
            results["steps_rss"] = _resident_growth(methods, lens, batch, rss_processes)
    if "inference" in parts:
        from .training_step import bench_merged_inference

        results["inference"] = bench_merged_inference(methods, seq_len=8 if quick else 64, batch=2 if quick else 32,
                                                      repeats=repeats, clock=clock)
        print("\n## Inference after merge_and_unload (median), vs the base model\n")
        print(markdown_table(results["inference"], [
            ("method", "method", ""), ("ms", "median_s_ms", ".2f"), ("x base", "vs_base", ".3f"),
        ]))
    if out is not None:
        write_json(out / "bench.json", results)
    return results
