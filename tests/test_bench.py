"""Smoke run of the benchmarks: they run and report sane records (no timing is asserted)."""

import json

import torch

from surm.bench.report import run
from surm.bench.timing import interleaved_medians, saved_tensor_bytes


def test_interleaved_medians_runs_every_function_in_each_round():
    calls = []
    medians = interleaved_medians({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1)
    assert set(medians) == {"a", "b"} and all(t >= 0 for t in medians.values())
    assert calls.count("a") == calls.count("b") == 4


def test_saved_tensor_bytes_counts_activations_not_parameters():
    w = torch.randn(8, 8, requires_grad=True)
    x = torch.randn(4, 8, requires_grad=True)
    with_params = saved_tensor_bytes(lambda: (x @ w).sum())
    without = saved_tensor_bytes(lambda: (x @ w).sum(), exclude=[w])
    assert with_params == without + w.numel() * 4
    assert without == x.numel() * 4


def test_bench_smoke(tmp_path, capsys):
    results = run(["layers", "steps", "inference"], methods=["circulant"], repeats=1, out=tmp_path, quick=True)
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert {r["method"] for r in saved["layers"]} == {"head", "lora_r8", "circulant"}
    assert {r["method"] for r in saved["steps"]} == {"head", "lora_r8", "circulant"}
    assert {r["method"] for r in saved["inference"]} == {"base", "lora_r8", "circulant"}
    circ = next(r for r in results["steps"] if r["method"] == "circulant")
    assert circ["trainable"] == 12 * 384 and circ["training_memory_bytes"] > 0
    assert "x LoRA r=8" in capsys.readouterr().out


def test_surm_bench_command(tmp_path):
    from surm.cli import main

    assert main(["bench", "layers", "--quick", "--methods", "toeplitz", "--repeats", "1", "--out", str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert {r["method"] for r in saved["layers"]} == {"head", "lora_r8", "toeplitz"}
    assert "steps" not in saved


def test_surm_bench_rejects_unknown_parts(capsys):
    from surm.cli import main

    assert main(["bench", "layer"]) == 2
    assert "unknown part(s) ['layer']; choose from layers, steps, inference" in capsys.readouterr().out
