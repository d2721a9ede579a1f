"""Smoke runs of ``surm bench``: every part runs at tiny sizes and writes sane JSON (no timing
is asserted), bad input is refused before any model loads, and the output has no
transformers load report."""

import json
import subprocess
import sys

import pytest
import torch

from surm.bench.memory import PeakResidentGrowth, saved_tensor_bytes
from surm.bench.timing import interleaved_medians, interleaved_samples
from surm.commands.main import main


def test_interleaved_medians_runs_every_function_in_each_round():
    calls = []
    medians = interleaved_medians({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1)
    assert set(medians) == {"a", "b"} and all(t >= 0 for t in medians.values())
    assert calls.count("a") == calls.count("b") == 4


@pytest.mark.parametrize("rotate, order", [(True, "abc" "bca" "cab"), (False, "abc" * 3)])
def test_interleaved_samples_times_each_round_by_every_clock(rotate, order):
    calls = []
    samples = interleaved_samples({k: (lambda k=k: calls.append(k)) for k in "abc"}, repeats=3, warmup=0,
                                  clocks=("wall", "cpu"), rotate=rotate)
    assert "".join(calls) == order
    assert all(len(s["wall"]) == len(s["cpu"]) == 3 for s in samples.values())


def test_saved_tensor_bytes_counts_activations_not_parameters():
    w = torch.randn(8, 8, requires_grad=True)
    x = torch.randn(4, 8, requires_grad=True)
    with_params = saved_tensor_bytes(lambda: (x @ w).sum())
    without = saved_tensor_bytes(lambda: (x @ w).sum(), exclude=[w])
    assert with_params == without + w.numel() * 4
    assert without == x.numel() * 4
    assert saved_tensor_bytes(lambda: x @ w, exclude=[w], grad=torch.ones(4, 8)) == without
    assert w.grad is not None  # the backward pass ran


def test_peak_resident_growth_counts_the_block_and_not_what_came_before():
    mib = 2**20
    before = bytearray(192 * mib)  # touched (zero-filled), then freed: an earlier peak
    del before
    with PeakResidentGrowth() as peak:
        inside = bytearray(48 * mib)
        del inside
    assert 40 <= peak.growth_mib < 150


def _methods(path, part):
    return {r["method"] for r in json.loads(path.read_text())[part]}


def test_bench_peft_parts_write_json_without_load_reports(tmp_path, capfd):
    argv = ["bench", "--quick", "--methods", "surm:circulant", "--repeats", "1", "--out", str(tmp_path)]
    assert main(argv) == 0
    saved = tmp_path / "bench.json"
    assert _methods(saved, "layers") == _methods(saved, "steps") == {"head", "lora:8", "surm:circulant"}
    assert _methods(saved, "inference") == {"base", "lora:8", "surm:circulant"}
    circulant = next(r for r in json.loads(saved.read_text())["steps"] if r["method"] == "surm:circulant")
    assert circulant["trainable"] == 6 * (4 * 384 + 2 * 1536) and circulant["training_memory_bytes"] > 0
    out, err = capfd.readouterr()
    assert "x LoRA r=8" in out
    for noise in ("LOAD REPORT", "Loading weights", "MISSING"):
        assert noise not in out + err


def test_bench_steps_measures_resident_growth_in_fresh_processes(tmp_path, capsys):
    argv = ["bench", "steps", "--quick", "--methods", "surm:circulant", "--repeats", "1", "--rss-processes", "1",
            "--threads", "1", "--out", str(tmp_path)]
    assert main(argv) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())["steps_rss"]
    assert {r["method"] for r in rows} == {"head", "lora:8", "surm:circulant"}
    assert all(r["processes"] == 1 and len(r["peak_rss_growth_runs_mib"]) == 1 for r in rows)
    assert all(r["peak_rss_growth_mib"] >= 0 for r in rows)  # the peak is never below the start
    assert "peak RSS growth MiB" in capsys.readouterr().out


def test_bench_llm_quick_measures_every_family_against_lora16(tmp_path, capsys):
    """``surm bench llm``: the LLM shapes without the MiniLM ones, LoRA r=16 as the reference,
    the overhead over the frozen layer and the saved bytes as fractions of LoRA's."""
    argv = ["bench", "llm", "--quick", "--repeats", "1", "--threads", "1", "--dtype", "float32",
            "--out", str(tmp_path)]
    assert main(argv) == 0
    saved = json.loads((tmp_path / "bench_llm.json").read_text())
    rows = {r["method"]: r for r in saved["layers"]}
    assert set(rows) == {"head", "lora:16", "c3a:64", "surm:circulant", "surm:skew_circulant", "surm:toeplitz",
                         "surm:symmetric_toeplitz", "surm:kronecker", "surm:ldr:rank=1"}
    assert {r["shape"] for r in rows.values()} == {"smollm2 q/o"} and not (tmp_path / "bench.json").exists()
    lora = rows["lora:16"]
    assert lora["vs_lora"] == lora["overhead_vs_lora"] == lora["saved_vs_lora"] == 1.0
    assert rows["head"]["overhead_vs_lora"] == 0.0 and rows["head"]["vs_base"] == 1.0
    assert rows["surm:circulant"]["trainable"] == 576 and rows["surm:circulant"]["dtype"] == "float32"
    assert "x LoRA r=16" in capsys.readouterr().out


def test_bench_layers_defaults_measure_peft_structured_methods_with_their_parameter_counts(tmp_path):
    """The default methods include PEFT's C3A, LoKr, FourierFT, VeRA and LoRA-FIX; on the one
    384 x 384 layer each trains what its formula says."""
    argv = ["bench", "layers", "--quick", "--repeats", "1", "--threads", "1", "--out", str(tmp_path)]
    assert main(argv) == 0
    rows = {r["method"]: r for r in json.loads((tmp_path / "bench.json").read_text())["layers"]}
    d, r = 384, 8
    assert rows["lora:8"]["trainable"] == 2 * d * r
    assert rows["lorafix:8"]["trainable"] == d * r  # B alone: A stays at its random init
    assert rows["c3a:384"]["trainable"] == d  # one block: one circulant vector
    assert rows["fourierft:768"]["trainable"] == 768  # one coefficient per frequency
    assert rows["vera:192"]["trainable"] == 192 + d  # the scaling vectors lambda_d and lambda_b
    assert 0 < rows["lokr:8"]["trainable"] < rows["lora:8"]["trainable"]
    assert all(row["saved_bytes"] > 0 and row["median_s"] > 0 for row in rows.values())


def test_bench_layers_runs_in_another_dtype(tmp_path):
    argv = ["bench", "layers", "--quick", "--methods", "surm:toeplitz", "--repeats", "1", "--dtype", "float64",
            "--out", str(tmp_path)]
    assert main(argv) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())["layers"]
    assert {r["dtype"] for r in rows} == {"float64"} and {r["device"] for r in rows} == {"cpu"}


def test_bench_layers_skips_a_method_that_does_not_fit_a_shape(tmp_path, capsys):
    argv = ["bench", "layers", "--quick", "--methods", "surm:toeplitz", "c3a:256", "--repeats", "1",
            "--out", str(tmp_path)]
    assert main(argv) == 0
    assert _methods(tmp_path / "bench.json", "layers") == {"head", "lora:8", "surm:toeplitz"}
    assert "steps" not in json.loads((tmp_path / "bench.json").read_text())
    assert "skip c3a:256 at minilm q/v (384 -> 384)" in capsys.readouterr().out


def test_bench_ops_writes_json(tmp_path):
    assert main(["bench", "ops", "--quick", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "ops.json").read_text())
    assert saved["config"]["tokens"] == 32 and saved["machine"]["threads"] >= 1
    rows = {r["method"]: r for r in saved["results"]}
    assert {"dense", "circulant", "ldr:rank=2", "low_rank:rank=8"} <= set(rows)
    assert rows["dense"]["fwd_ratio"] == rows["dense"]["fwd_bwd_ratio"] == 1.0
    assert rows["circulant"]["params"] == 64 and rows["dense"]["params"] == 64 * 64


def test_bench_ops_cost_model_writes_json(tmp_path):
    assert main(["bench", "ops", "--cost-model", "--quick", "--repeats", "1", "--out", str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "ops_costs.json").read_text())["results"]
    assert [p["op"] for p in saved["points"]] == ["fft 64", "fft 128", "matmul 64x64"]
    assert saved["FFT_NS_PER_UNIT"] > 0 and saved["MATMUL_NS_PER_MAC"] > 0


def test_bench_ops_profile_prints_the_top_ops(capsys):
    assert main(["bench", "ops", "--profile", "circulant", "--quick"]) == 0
    assert "Self CPU" in capsys.readouterr().out


def test_bench_fused_writes_json(tmp_path):
    assert main(["bench", "fused", "--quick", "--repeats", "1", "--out", str(tmp_path)]) == 0
    (config,) = json.loads((tmp_path / "fused.json").read_text())["results"]
    assert (config["in"], config["out"], config["tokens"]) == (64, 64, 32)
    assert {"floor", "lora8", "circulant/plain", "circulant/fused", "ldr_r2/fused"} <= set(config["methods"])
    assert config["methods"]["lora8"]["x_lora8"] == 1.0
    assert config["methods"]["circulant/fused"]["saved_bytes"] > 0


def test_bench_fused_policy_writes_json(tmp_path):
    assert main(["bench", "fused", "--policy", "--quick", "--repeats", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "fused_policy.json").read_text())["results"]
    assert {r["family"] for r in rows} >= {"circulant", "low_rank"}
    assert [p["tokens"] for p in rows[0]["points"]] == [4, 32]
    assert {"train_plain_cpu_ms", "eval_fused_ms", "train_cpu_ratio"} <= set(rows[0]["points"][0])


def test_bench_rejects_an_unknown_method_before_loading_a_model(monkeypatch, capsys):
    import surm.harness.models

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(surm.harness.models, "load_text_classifier", no_model)
    assert main(["bench", "steps", "--methods", "surm:circulant", "lora_r8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("surm bench: error: unknown method 'lora_r8'") and "lora:R" in err and "c3a:B" in err


@pytest.mark.parametrize("argv, message", [
    (["layer"], "unknown part(s) layer; choose from layers, steps, inference, ops, fused"),
    (["--policy"], "--policy applies to fused"),
    (["layers", "--tokens", "64"], "--tokens applies to ops"),
    (["ops", "--profile", "ldr"], "--profile 'ldr': not an ops method; choose from dense, circulant,"),
    (["ops", "--repeats", "0"], "--repeats must be at least 1"),
    (["--device", "cpu"], "--device and --dtype apply to layers and llm only, not to steps, inference"),
    (["ops", "--dtype", "bfloat16"], "--dtype applies to layers or llm"),
    (["llm", "--device", "gpu0"], "--device 'gpu0': not a torch device"),
    (["ops", "--counts", "4"], "--counts applies to adapters"),
    (["adapters", "--counts", "0"], "--counts must be at least 1"),
    (["layers", "--rss-processes", "2"], "--rss-processes applies to steps"),
    (["steps", "--rss-processes", "0"], "--rss-processes must be at least 1"),
])
def test_bench_rejects_bad_options(argv, message, capsys):
    assert main(["bench", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_bench_llm_on_cuda_without_a_gpu_says_so(capsys):
    assert main(["bench", "llm", "--device", "cuda", "--dtype", "bfloat16"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda: torch" in err and "sees no CUDA device" in err


def test_bench_parser_imports_nothing_heavy():
    code = (
        "import argparse, sys; from surm.commands import bench; "
        "p = argparse.ArgumentParser(); bench.add_parser(p.add_subparsers()); "
        "print(sorted({'torch', 'peft', 'transformers'} & set(sys.modules)))"
    )
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert imported.strip() == "[]"


def test_bench_adapters_quick_measures_mixed_batches_and_loading(tmp_path):
    argv = ["bench", "adapters", "--quick", "--counts", "1", "3", "--load-count", "3", "--threads", "1",
            "--out", str(tmp_path)]
    assert main(argv) == 0
    result = json.loads((tmp_path / "adapters.json").read_text())
    rows = result["throughput"]
    assert {(r["adapters"], r["rows"]) for r in rows} == {(1, 16), (3, 16)}
    assert {"surm circulant q,v", "lora r=8 q,v"} <= {r["method"] for r in rows}
    assert all(r["prefill_ratio"] > 0 and r["tensor_bytes_per_adapter"] > 0 for r in rows)
    (load,) = result["loading"]
    assert load["adapters"] == 3 and load["peft_calls_timed"] == 3 and load["load_adapters_s"] > 0


def test_bench_quantized_quick_trains_on_every_base_and_reports_each_merge(tmp_path, capsys):
    """``surm bench quantized --quick`` on the tiny Llama: every (base, method) trains and is
    timed against LoRA on the same base; bitsandbytes bases shrink the weights and merge by
    requantizing (surm's reported rounding beside the logit error), torchao merges of SURM are
    refused with the reason."""
    argv = ["bench", "quantized", "--quick", "--threads", "1", "--out", str(tmp_path)]
    assert main(argv) == 0
    rows = {(r["format"], r["method"]): r for r in json.loads((tmp_path / "quantized.json").read_text())["results"]}
    formats = ("float32", "bfloat16", "bnb-int8", "bnb-nf4", "torchao-int8")
    methods = ("frozen base", "surm circulant q,v", "surm toeplitz q,v", "surm circulant all", "lora r=8 q,v")
    assert set(rows) == {(f, m) for f in formats for m in methods}
    assert all(r["step_s"] > 0 and r["step_peak_bytes"] > 0 for r in rows.values())
    assert all(rows[(f, "lora r=8 q,v")]["vs_lora"] == 1.0 for f in formats)
    assert all(rows[("float32", m)]["vs_float32"] == 1.0 for m in methods)
    for f in formats:  # the overhead over the frozen base, as a multiple of LoRA's
        frozen, lora = rows[(f, "frozen base")], rows[(f, "lora r=8 q,v")]
        assert frozen["adapter_parameters"] == 0 and frozen["merge"] == "-" and frozen["overhead_vs_lora"] is None
        surm = rows[(f, "surm toeplitz q,v")]
        if lora["step_s"] <= frozen["step_s"]:  # one noisy step of a tiny model: no overhead to divide by
            assert lora["overhead_vs_lora"] is None and surm["overhead_vs_lora"] is None
            continue
        assert lora["overhead_vs_lora"] == pytest.approx(1.0)
        assert surm["overhead_vs_lora"] == pytest.approx(
            (surm["step_s"] - frozen["step_s"]) / (lora["step_s"] - frozen["step_s"]))
    half = rows[("bfloat16", "surm circulant q,v")]
    assert half["weight_bytes"] < rows[("float32", "surm circulant q,v")]["weight_bytes"]
    assert half["merge"] == "rounded to bfloat16" and half["logits_merge_error"] < half["logits_adapter_effect"]
    qv, every = rows[("float32", "surm circulant q,v")], rows[("float32", "surm circulant all")]
    assert 0 < qv["adapter_parameters"] < every["adapter_parameters"]
    for fmt in ("bnb-int8", "bnb-nf4", "torchao-int8"):
        assert rows[(fmt, methods[1])]["weight_bytes"] < rows[("float32", methods[1])]["weight_bytes"]
    assert qv["merge"] == "exact" and qv["logits_merge_error"] < 1e-5 < qv["logits_adapter_effect"]
    for fmt in ("bnb-int8", "bnb-nf4"):
        merged = rows[(fmt, "surm circulant all")]
        assert merged["merge"] == "requantized" and merged["surm_weight_rounding"] > 0
        assert "quantized layer(s)" in merged["surm_warning"] and merged["logits_merge_error"] > 0
    refused = rows[("torchao-int8", "surm circulant q,v")]
    assert refused["merge"] == "refused" and "torchao-quantized" in refused["reason"]
    out = capsys.readouterr().out
    assert "| bnb-nf4 | surm circulant all |" in out and "refused (surm circulant q,v on torchao-int8" in out


@pytest.mark.parametrize("argv, message", [
    (["quantized", "--formats", "int4"], "--formats: unknown format(s) int4; choose from float32, bfloat16, bnb-int8"),
    (["adapters", "--steps", "2"], "--steps applies to quantized"),
    (["quantized", "--seq-len", "1"], "--seq-len must be at least 2"),
])
def test_bench_quantized_rejects_bad_options(argv, message, capsys):
    assert main(["bench", *argv]) == 2
    assert message in capsys.readouterr().err
