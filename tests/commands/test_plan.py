"""``surm plan``: usage errors before any weights, the table and the two files, and a config that
``surm finetune --adapter-config`` trains with exactly the planned adapters."""

import json
import re

import pytest
import torch

from surm.commands import finetune, plan
from surm.commands.errors import UsageError
from surm.commands.main import build_parser, main

TINY = ["--model", "tiny-bert", "--batches", "2", "--per-device-train-batch-size", "4", "--max-seq-length", "16",
        "--quiet"]


@pytest.fixture
def no_weights(monkeypatch):
    """Loading any weights, or the data's model, fails the test."""
    import transformers

    import surm.harness.runs.execution as runs

    def forbidden(*args, **kwargs):
        raise AssertionError("weights were loaded before the usage error")

    monkeypatch.setattr(runs, "make_model", forbidden)
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)


def _usage_error(capsys, *argv) -> str:
    assert main(["plan", *argv]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and captured.out == "", captured
    assert lines[0].startswith("surm plan: error: ")
    return lines[0].removeprefix("surm plan: error: ")


@pytest.mark.parametrize("argv, expected", [
    (["--budget", "lora:x"], "--budget must be a parameter count (e.g. 9216) or lora:R with R >= 1"),
    (["--budget", "lora:0"], "lora:R with R >= 1"),
    (["--budget", "-3"], "--budget must be a parameter count"),
    (["--structures", "circulent"], "--structures: unknown structure 'circulent'"),
    (["--batches", "0"], "--batches must be at least 1"),
    (["--threads", "0"], "--threads must be at least 1"),
    (["--data", "imagenet"], "unknown data set 'imagenet'"),
    (["--model", "nope"], "unknown model 'nope'"),
    (["--model", "tiny-bert", "--target-modules", "nope"], "--target-modules on tiny-bert: SurmConfig: "
                                                           "target_modules=['nope'] matched no module"),
])
def test_bad_input_is_a_one_line_usage_error_before_any_weights(argv, expected, no_weights, capsys):
    assert expected in _usage_error(capsys, *argv)


def test_budgets_parse_without_a_model():
    assert plan.parse_budget("9216") == 9216
    assert plan.parse_budget("LoRA:8") == "lora:8"
    with pytest.raises(UsageError):
        plan.parse_budget("8k")


def test_plan_writes_a_config_that_finetune_trains_exactly(tmp_path, capsys):
    out = tmp_path / "plan"
    record = plan.run(build_parser().parse_args(["plan", *TINY, "--budget", "300", "--output-dir", str(out)]))
    printed = capsys.readouterr().out
    assert "bert.encoder.layer.0.attention.self.query" in printed and "budget 300" in printed
    assert "planner time" in printed and f"--adapter-config {out / 'adapter_config.json'}" in printed
    assert record["params"] <= 300 and record["budget"] == 300 and record["batches"] == 2
    assert json.loads((out / "plan.json").read_text())["params"] == record["params"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "SURM" and config["modules_to_save"] == ["classifier"]
    planned = {layer["name"]: layer["choice"] for layer in record["layers"] if layer["choice"]}
    assert sorted(config["target_modules"]) == sorted(planned)
    assert config["structure_pattern"] == {re.escape(n): c["structure"] for n, c in planned.items()}

    args = build_parser().parse_args([
        "finetune", "--data", "rotten_tomatoes", "--model", "tiny-bert", "--adapter-config",
        str(out / "adapter_config.json"), "--max-train-samples", "8", "--max-eval-samples", "8",
        "--per-device-train-batch-size", "4", "--max-steps", "1", "--quiet", "--output-dir", str(tmp_path / "run"),
    ])
    result = finetune.run(args)
    assert result["adapter_params"] == record["params"]
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert saved["structure_pattern"] == config["structure_pattern"]
    assert saved["knob_pattern"] == config["knob_pattern"]


def test_lora_budget_and_structures_and_all_linear(tmp_path, capsys):
    out = tmp_path / "plan"
    before = torch.get_num_threads()
    record = main(["plan", *TINY, "--budget", "lora:1", "--threads", "1", "--structures", "toeplitz", "circulant",
                   "--target-modules", "all-linear", "--output-dir", str(out)])
    assert record == 0
    saved = json.loads((out / "plan.json").read_text())
    assert saved["threads"] == 1 and torch.get_num_threads() == before  # restored
    assert saved["budget"] == 4 * (32 + 32)  # LoRA r=1 on query and value of tiny-bert's 2 layers
    names = [layer["name"] for layer in saved["layers"]]
    assert "classifier" not in names and any(n.endswith("intermediate.dense") for n in names)
    assert {layer["choice"]["structure"] for layer in saved["layers"] if layer["choice"]} <= {"toeplitz", "circulant"}
