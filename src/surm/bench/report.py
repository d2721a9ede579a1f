"""Run the selected benchmarks, print Markdown tables of ratios, write JSON."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from .methods import BENCH_METHODS


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": "cpu",
    }
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
    return info


def _table(records: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    head = "| " + " | ".join(title for title, _, _ in columns) + " |"
    rule = "|" + "|".join("---:" if fmt else "---" for _, _, fmt in columns) + "|"
    rows = []
    for r in records:
        cells = []
        for _, key, fmt in columns:
            value = r.get(key)
            cells.append(format(value, fmt) if fmt and isinstance(value, (int, float)) else str(value))
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, rule, *rows])


def run(
    parts: list[str],
    methods: list[str] | None = None,
    repeats: int = 10,
    out: Path | None = None,
    seq_lens: tuple[int, ...] = (64, 128),
    quick: bool = False,
) -> dict[str, Any]:
    """parts: any of "layers", "steps", "inference". ``quick`` shrinks everything (smoke)."""
    methods = methods or list(BENCH_METHODS)
    unknown = set(methods) - set(BENCH_METHODS)
    if unknown:
        raise ValueError(f"unknown benchmark method(s) {sorted(unknown)}; known: {', '.join(BENCH_METHODS)}")
    for required in ("head", "lora_r8"):
        if required not in methods:
            methods = [required, *methods]
    from . import timing

    results: dict[str, Any] = {"machine": machine(), "repeats": repeats, "clock": timing.clock,
                               "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if "layers" in parts:
        from .layers import DEFAULT_SHAPES, bench_layers

        shapes = [(label, 64 if quick else t, i, o) for label, t, i, o in DEFAULT_SHAPES[: 1 if quick else None]]
        results["layers"] = bench_layers(methods, shapes, repeats=repeats)
        print("\n## Per layer: forward + backward (median), ratios measured in one run\n")
        print(_table(results["layers"], [("shape", "shape", ""), ("method", "method", ""), ("params", "trainable", ","),
                                          ("ms", "median_s_ms", ".2f"), ("x base", "vs_base", ".2f"),
                                          ("x LoRA r=8", "vs_lora", ".2f"), ("saved MB", "saved_mb", ".2f")]))
    if "steps" in parts:
        from .training_step import bench_training_steps

        batch = 2 if quick else 32
        lens = (8,) if quick else seq_lens
        results["steps"] = bench_training_steps(methods, seq_lens=lens, batch=batch, repeats=repeats)
        print("\n## MiniLM training step (AdamW), batch %d, median; floor = head only\n" % batch)
        print(_table(results["steps"], [("tokens", "seq_len", ""), ("method", "method", ""), ("params", "trainable", ","),
                                         ("ms", "median_s_ms", ".1f"), ("x floor", "vs_floor", ".2f"),
                                         ("x LoRA r=8", "vs_lora", ".2f"), ("train mem MB", "training_memory_mb", ".1f")]))
    if "inference" in parts:
        from .training_step import bench_merged_inference

        results["inference"] = bench_merged_inference(methods, seq_len=8 if quick else 64, batch=2 if quick else 32, repeats=repeats)
        print("\n## Inference after merge_and_unload (median), vs the base model\n")
        print(_table(results["inference"], [("method", "method", ""), ("ms", "median_s_ms", ".2f"), ("x base", "vs_base", ".3f")]))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps(results, indent=2))
        print(f"\nwrote {out / 'bench.json'}")
    return results
