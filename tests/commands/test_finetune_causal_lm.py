"""``surm finetune`` on prompt -> response data: the tiny random Llama end to end, usage errors
before any model is loaded."""

import json

import peft
import pytest
import torch

from surm.commands import finetune
from surm.commands.errors import UsageError
from surm.commands.main import build_parser, main

TINY = ["--data", "grimm_tales", "--model", "tiny-llama", "--max-steps", "3", "--per-device-train-batch-size", "2",
        "--max-train-samples", "6", "--max-eval-samples", "2", "--quiet"]


def _args(*argv):
    return build_parser().parse_args(["finetune", *argv])


def test_finetune_tiny_llama_writes_results_and_an_adapter_that_loads(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["finetune", *TINY, "--method", "surm:circulant", "--output-dir", str(out)]) in (0, None)
    printed = capsys.readouterr().out
    assert "SURM circulant on tiny-llama / grimm_tales" in printed and "perplexity" in printed
    result = json.loads((out / "results.json").read_text())
    assert result["train"]["steps"] == 3 and result["lr"] == pytest.approx(3e-2) and result["spec"]["max_length"] == 256
    assert result["sizes"]["validation"] == 2 and result["trainable_params"] > 0
    assert [p["step"] for p in result["curve"]][0] == 0 and result["curve"][-1]["step"] == 3
    assert result["test"]["perplexity"] > 1
    from surm.harness.models import tiny as tiny_llama

    loaded = peft.PeftModel.from_pretrained(tiny_llama.model(), out / "adapter")
    assert sum(".surm_" in n for n, _ in loaded.named_parameters()) > 0


def test_lora_default_rate_and_no_save(tmp_path):
    out = tmp_path / "run"
    main(["finetune", *TINY, "--method", "lora:2", "--output-dir", str(out), "--no-save"])
    result = json.loads((out / "results.json").read_text())
    assert result["lr"] == pytest.approx(3e-3) and not (out / "adapter").exists()


def test_adapter_config_on_a_causal_lm(tmp_path):
    config = tmp_path / "toeplitz_qv.json"
    config.write_text(json.dumps({"structure": "toeplitz", "target_modules": ["q_proj", "v_proj"]}))
    out = tmp_path / "run"
    main(["finetune", *TINY, "--adapter-config", str(config), "--output-dir", str(out)])
    result = json.loads((out / "results.json").read_text())
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert result["label"] == "SURM toeplitz (toeplitz_qv)" and result["lr"] == pytest.approx(3e-2)
    assert sorted(saved["target_modules"]) == ["q_proj", "v_proj"] and saved["structure"] == "toeplitz"


@pytest.mark.parametrize("argv, message", [
    (["--method", "head"], "classification head"),
    (["--method", "lora8"], "unknown method"),
    (["--model", "gpt-nothing"], "unknown model 'gpt-nothing'"),
    (["--model", "minilm"], "takes labelled texts, but the data are prompt -> response pairs"),
    (["--head-learning-rate", "0.1"], "without a head"),
    (["--max-seq-length", "1"], "at least 2"),
])
def test_usage_errors_before_any_model_loads(argv, message):
    with pytest.raises(UsageError, match=message):
        finetune.spec_from_args(_args(*TINY, *argv))


def test_torchrun_two_processes_train_like_one(tmp_path):
    """``torchrun --nproc-per-node 2`` (gloo, CPU): each process takes half of every batch, so the
    result matches one process up to how the per-process token means are averaged."""
    import os
    import signal
    import subprocess
    import sys

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    argv = [*TINY, "--method", "surm:circulant", "--no-save"]
    main(["finetune", *argv, "--output-dir", str(tmp_path / "one")])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                               "-m", "surm", "finetune", *argv, "--output-dir", str(tmp_path / "two")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)  # its own process group: a hung launch takes its workers along
    try:
        _, stderr = launch.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(launch.pid, signal.SIGKILL)
        launch.communicate()
        pytest.fail("torchrun did not finish within 300 s")
    assert launch.returncode == 0, stderr[-2000:]
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["curve"][0]["loss"] == pytest.approx(one["curve"][0]["loss"])  # the same start
    assert two["test"]["loss"] == pytest.approx(one["test"]["loss"], abs=2e-3)
    assert two["test"]["loss"] < two["curve"][0]["loss"] + 0.05


def test_a_bf16_base_trains_float32_adapters_close_to_a_float32_run(tmp_path):
    """``--dtype bfloat16``: the base in bf16, the adapter in float32, every forward under autocast;
    the held-out loss stays within bf16's rounding of the float32 run's."""
    from surm.harness.runs import RunSpec, execute

    spec = RunSpec("grimm_tales", "surm:circulant", model="tiny-llama", epochs=0.0, min_steps=3, batch_size=2,
                   n_train=6, n_eval=2, max_length=256, eval_splits=("validation", "test"))
    float32, _, _ = execute(spec, progress=False)
    bf16, model, _ = execute(spec.replace(dtype="bfloat16"), progress=False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert all(p.dtype == torch.bfloat16 for p in frozen)
    assert bf16.config["autocast"] == "bfloat16" and bf16.key != float32.key
    # bf16 keeps 8 bits of mantissa: a relative error of 2**-8 per rounding, a few roundings deep
    assert bf16.test["loss"] == pytest.approx(float32.test["loss"], rel=0.05)


def test_prompts_too_long_for_max_seq_length_are_refused_before_any_weights(tmp_path, monkeypatch):
    import transformers

    import surm.harness.runs.execution as execution

    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded before the usage error")

    monkeypatch.setattr(execution, "make_model", forbidden)
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", forbidden)
    with pytest.raises(UsageError, match=r"--max-seq-length 20: \d+ prompt\(s\) of grimm_tales .* give "
                                         r"--max-seq-length \d+ or more"):
        finetune.spec_from_args(_args(*TINY, "--max-seq-length", "20"))
    # without the flag, the default grows to the longest prompt plus 64 tokens
    long = tmp_path / "long.jsonl"
    long.write_text("".join(json.dumps({"prompt": "the fox " * 200 + str(i), "response": "the end"}) + "\n"
                            for i in range(10)))
    spec = finetune.spec_from_args(_args("--data", str(long), "--model", "tiny-llama"))
    assert spec.max_length > 400
    assert finetune.spec_from_args(_args("--data", "grimm_tales", "--model", "tiny-llama")).max_length == 256
