"""SURM against PEFT LoRA and C3A: per layer, MiniLM training steps, merged inference.

Prints one Markdown table of ratios per part and writes ``bench.json``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

from surm.methods import Method, parse

from . import DEFAULT_METHODS, PEFT_PARTS, REFERENCE_METHODS
from .report import machine, markdown_table, write_json


def with_references(methods: Sequence[str | Method] | None) -> list[Method]:
    """``methods`` (default :data:`~surm.bench.DEFAULT_METHODS`) parsed, the references the
    ratios need (``head``, ``lora:8``) put first where missing. Raises ValueError on a bad
    method string."""
    chosen = [parse(m) for m in (methods or DEFAULT_METHODS)]
    missing = [parse(r) for r in REFERENCE_METHODS if parse(r) not in chosen]
    return missing + chosen


def run(
    parts: Sequence[str] = PEFT_PARTS,
    methods: Sequence[str | Method] | None = None,
    repeats: int = 10,
    out: Path | None = None,
    seq_lens: tuple[int, ...] = (64, 128),
    quick: bool = False,
    clock: str = "wall",
) -> dict[str, Any]:
    """parts: any of "layers", "steps", "inference". ``quick`` shrinks everything (smoke)."""
    methods = with_references(methods)
    results: dict[str, Any] = {"machine": machine(), "repeats": repeats, "clock": clock,
                               "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if "layers" in parts:
        from .layers import DEFAULT_SHAPES, bench_layers

        shapes = [(label, 64 if quick else t, i, o) for label, t, i, o in DEFAULT_SHAPES[: 1 if quick else None]]
        results["layers"] = bench_layers(methods, shapes, repeats=repeats, clock=clock)
        print("\n## Per layer: forward + backward (median), ratios measured in one run\n")
        print(markdown_table(results["layers"], [
            ("shape", "shape", ""), ("method", "method", ""), ("params", "trainable", ","),
            ("ms", "median_s_ms", ".2f"), ("x base", "vs_base", ".2f"),
            ("x LoRA r=8", "vs_lora", ".2f"), ("saved MB", "saved_mb", ".2f"),
        ]))
    if "steps" in parts:
        from .training_step import bench_training_steps

        batch = 2 if quick else 32
        lens = (8,) if quick else seq_lens
        results["steps"] = bench_training_steps(methods, seq_lens=lens, batch=batch, repeats=repeats, clock=clock)
        print("\n## MiniLM training step (AdamW), batch %d, median; floor = head only\n" % batch)
        print(markdown_table(results["steps"], [
            ("tokens", "seq_len", ""), ("method", "method", ""), ("params", "trainable", ","),
            ("ms", "median_s_ms", ".1f"), ("x floor", "vs_floor", ".2f"),
            ("x LoRA r=8", "vs_lora", ".2f"), ("train mem MB", "training_memory_mb", ".1f"),
        ]))
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
