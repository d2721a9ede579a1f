"""``surm finetune``: Hugging Face flag names, usage errors found before any model is loaded,
``--adapter-config``, and an output folder that serves inference."""

import json

import numpy as np
import peft
import pytest
import torch

from surm.commands import finetune
from surm.commands.errors import UsageError
from surm.commands.main import build_parser, main
from surm.harness.training import loop as train

TINY = ["--data", "rotten_tomatoes", "--model", "tiny-bert", "--max-train-samples", "24", "--max-eval-samples", "16",
        "--per-device-train-batch-size", "8", "--quiet"]


def _args(*argv):
    return build_parser().parse_args(["finetune", *argv])


def _tiny(tmp_path, *argv):
    return _args(*TINY, "--output-dir", str(tmp_path / "run"), *argv)


@pytest.fixture
def no_weights(monkeypatch):
    """Loading any weights, or starting the run, fails the test."""
    import safetensors.torch
    import transformers

    import surm.harness.runs.execution as runs

    def forbidden(*args, **kwargs):
        raise AssertionError("weights were loaded or a run started before the usage error")

    monkeypatch.setattr(runs, "make_model", forbidden)
    monkeypatch.setattr(runs, "execute", forbidden)
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(safetensors.torch, "load_file", forbidden)


def _usage_error(capsys, *argv) -> str:
    """Run ``surm finetune ARGV``; the one line it writes on stderr (status 2, nothing on stdout)."""
    assert main(["finetune", *argv]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and captured.out == "", captured
    assert lines[0].startswith("surm finetune: error: ")
    return lines[0].removeprefix("surm finetune: error: ")


# --------------------------------------------------------------------------- flags


def test_hugging_face_flag_names_and_the_short_aliases_mean_the_same(tmp_path):
    long = _args("--learning-rate", "0.01", "--num-train-epochs", "2", "--per-device-train-batch-size", "8",
                 "--seed", "3", "--output-dir", str(tmp_path), "--max-train-samples", "40", "--max-eval-samples", "8",
                 "--max-seq-length", "32", "--head-learning-rate", "0.1")
    short = _args("--lr", "0.01", "--epochs", "2", "--batch-size", "8", "--seed", "3", "--out", str(tmp_path),
                  "--max-train", "40", "--max-eval", "8", "--max-length", "32", "--head-lr", "0.1")
    assert vars(long) == vars(short)
    spec = finetune.spec_from_args(_args("--model", "tiny-bert", "--learning-rate", "0.01",
                                                  "--num-train-epochs", "2", "--per-device-train-batch-size", "8"))
    assert spec.adapter is None and (spec.lr, spec.epochs, spec.batch_size) == (0.01, 2.0, 8)
    assert spec.method.name == "surm:circulant" and spec.model == "tiny-bert"


def test_max_steps_trains_exactly_that_many_steps(tmp_path, capsys):
    record = finetune.run(_tiny(tmp_path, "--method", "head", "--max-steps", "5", "--num-train-epochs", "3"))
    assert record["train"]["steps"] == 5  # 3 epochs of 3 batches would be 9
    assert "5 steps" in capsys.readouterr().out


# --------------------------------------------------------------------------- usage errors


@pytest.mark.parametrize("argv, expected", [
    (["--data", "imdb"], "unknown data set 'imdb'; known: rotten_tomatoes, election_tweets, r8, newsgroups, mnist"),
    (["--method", "prefix:8"], "unknown method 'prefix:8': it must start with one of full, head, bitfit"),
    (["--method", "surm:hexagonal"], "unknown structure"),
    (["--method", "surm:circulant:rank=4"], "'rank' is not a knob of structure 'circulant'; its knobs: block_size"),
    (["--method", "surm:circulant:block_size=100"],
     "block_size=100 must divide both out_features=384 and in_features=384"),
    (["--method", "surm:kronecker:factors=((2,3),(5,7))"], "a1*b1 must equal 384"),
    (["--data", "digits", "--method", "surm:circulant:block_size=100"], "must divide both out_features=16"),
    (["--model", "no-such-model"],
     "unknown model 'no-such-model': choose minilm, tiny-bert, efficientnet, smollm2-135m, tiny-llama or a local"),
    # the run names the mismatch
    (["--model", "efficientnet"], "model efficientnet takes labelled images, but the data are labelled texts"),
    (["--max-steps", "0"], "--max-steps must be at least 1, got 0"),
])
def test_bad_input_is_a_one_line_usage_error_before_any_weights(argv, expected, no_weights, capsys):
    assert expected in _usage_error(capsys, *argv)


def test_a_folder_without_a_model_is_a_usage_error(tmp_path, no_weights, capsys):
    assert f"model '{tmp_path}': no transformers config there" in _usage_error(capsys, "--model", str(tmp_path))


def test_usage_errors_name_what_was_wrong(no_weights, capsys):
    message = _usage_error(capsys, "--method", "surm:circulant:block_size=100")
    assert message.startswith("surm:circulant:block_size=100 on minilm: ")
    assert "Use a common divisor (the largest is gcd = 384)" in message


def _write(tmp_path, payload, name="adapter.json"):
    path = tmp_path / name
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    return str(path)


@pytest.mark.parametrize("payload, expected", [
    ("{not json", "is not JSON"),
    ([1, 2], "holds a list; expected an object of SurmConfig fields"),
    ({"peft_type": "LORA", "r": 8}, "is a LORA config; surm finetune takes SURM configs"),
    ({"structure": "circulant", "blocksize": 64}, "unknown field(s) blocksize; SurmConfig fields: activation, alpha"),
    ({"structure": "circulant", "rank": 2}, "'rank' is not a knob of structure 'circulant'"),
    ({"structure": "circulant", "knob_pattern": {"value": {"block_size": 100}}}, "block_size=100 must divide"),
    ({"structure": "circulant", "target_modules": ["no_such_layer"]}, "the adapter config on minilm: "),
])
def test_bad_adapter_configs_are_usage_errors(tmp_path, payload, expected, no_weights, capsys):
    assert expected in _usage_error(capsys, "--adapter-config", _write(tmp_path, payload))


def test_a_missing_adapter_config_is_a_usage_error(tmp_path, no_weights, capsys):
    assert "cannot read" in _usage_error(capsys, "--adapter-config", str(tmp_path / "absent.json"))


def test_usage_errors_raise_usage_error_when_called_directly(no_weights):
    with pytest.raises(UsageError, match="unknown data set"):
        finetune.run(_args("--data", "imdb"))


# --------------------------------------------------------------------------- runs and outputs


def _predict(folder, base, texts):
    """Predicted labels of a fresh base with the folder's adapter and tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = peft.PeftModel.from_pretrained(base, str(folder)).eval()
    batcher = train.TextBatcher(tokenizer, max_length=64)
    with torch.no_grad():
        inputs = batcher.collate(batcher.tokenizer(texts, truncation=True, max_length=64)["input_ids"])
        return model(**inputs).logits.argmax(-1).tolist()


def test_the_output_folder_serves_inference(tmp_path, capsys):
    from transformers import AutoConfig, BertForSequenceClassification

    from surm.harness.runs import load_splits, make_model

    args = _tiny(tmp_path, "--method", "surm:circulant", "--learning-rate", "0.05", "--num-train-epochs", "2")
    record = finetune.run(args)
    out = tmp_path / "run"
    saved = json.loads((out / "results.json").read_text())
    assert saved["method"] == "surm:circulant" and saved["lr"] == 0.05 and saved["saved"] == str(out / "adapter")
    assert saved["sizes"]["train"] == 24 and saved["sizes"]["test"] == 16
    assert saved["train"]["steps"] == 6 and saved["adapter_params"] == 2 * (4 * 32 + 2 * 64)  # every map of 2 blocks
    assert "test       accuracy" in capsys.readouterr().out

    # the folder alone: its config names the labels, its tokenizer and adapter rebuild the predictions
    folder = out / "adapter"
    config = AutoConfig.from_pretrained(str(folder))
    assert config.id2label == {0: "rotten", 1: "fresh"} and config.label2id == {"rotten": 0, "fresh": 1}
    assert config.id2label == dict(enumerate(record["label_names"]))
    torch.manual_seed(0)  # tiny-bert is a random base: the run made it from its seed
    base = BertForSequenceClassification(config)
    spec = finetune.spec_from_args(args)
    splits = load_splits(spec)
    texts = list(splits.test.inputs)
    predictions = _predict(folder, base, texts)
    assert np.mean(np.array(predictions) == splits.test.labels) == pytest.approx(record["test"]["accuracy"])

    # and they are the trained model's predictions on the same texts
    trained, batcher = make_model(spec, splits.num_labels)
    trained = peft.PeftModel.from_pretrained(trained, str(folder))
    assert train.predict(trained, batcher, splits.test).tolist() == predictions


def test_full_head_and_bitfit_save_the_trained_tensors_config_and_tokenizer(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    record = finetune.run(_tiny(tmp_path, "--method", "head"))
    out = tmp_path / "run"
    assert record["saved"] == str(out / "trainable.safetensors") and record["adapter_params"] == 0
    assert set(load_file(str(out / "trainable.safetensors"))) == {"classifier.weight", "classifier.bias"}
    assert AutoConfig.from_pretrained(str(out)).id2label == {0: "rotten", 1: "fresh"}
    assert AutoTokenizer.from_pretrained(str(out))("a film")["input_ids"][0] == 101  # [CLS]


def test_bitfit_trains_its_head_at_head_onlys_rate(tmp_path, capsys):
    from surm.harness import methods

    record = finetune.run(_tiny(tmp_path, "--method", "bitfit"))
    assert record["head_lr"] == methods.default_lr("head") != record["lr"]
    assert f"lr {record['lr']:g} (head {record['head_lr']:g})" in capsys.readouterr().out
    record = finetune.run(_tiny(tmp_path, "--method", "lora:2", "--head-learning-rate", "0.02"))
    assert record["head_lr"] == 0.02 and record["lr"] == methods.default_lr("lora:2")
    assert record["adapter_params"] == 2 * 2 * 2 * (32 + 32)
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_the_default_output_folder_is_under_outputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = _args(*TINY, "--method", "surm:toeplitz:serial", "--seed", "2", "--no-save")
    record = finetune.run(args)
    folder = tmp_path / "outputs" / "finetune" / "rotten_tomatoes-surm-toeplitz-serial-s2"
    assert json.loads((folder / "results.json").read_text())["key"] == record["key"]
    assert "saved" not in record and not (folder / "adapter").exists()


def test_adapter_config_sets_what_method_strings_cannot(tmp_path):
    from surm import SurmConfig

    config = {"structure": "circulant", "target_modules": ["query", "value"],
              "knob_pattern": {"value": {"block_size": 16}}}
    path = _write(tmp_path, config, "circ16.json")
    record = finetune.run(_tiny(tmp_path, "--adapter-config", path, "--learning-rate", "0.05"))
    # tiny-bert: 2 layers, query a full 32-circulant (32 parameters), value two 16-blocks (2 * 2 * 16)
    assert record["adapter_params"] == 2 * (32 + 2 * 2 * 16)
    assert record["method"] == "surm:circulant" and record["label"] == "SURM circulant (circ16)"
    assert record["adapter_config"]["knob_pattern"] == {"value": {"block_size": 16}}
    assert record["key"].startswith("rotten_tomatoes-surm-circulant-adapter")  # not the key of --method surm:circulant
    assert record["key"] != finetune.spec_from_args(_tiny(tmp_path, "--method", "surm:circulant")).key
    saved = SurmConfig.from_pretrained(str(tmp_path / "run" / "adapter"))
    assert saved.knob_pattern == {"value": {"block_size": 16}} and "classifier" in saved.modules_to_save

    # the adapter_config.json a run writes is an adapter config too (its folder, or the file)
    again = finetune.run(_tiny(tmp_path / "again", "--adapter-config", str(tmp_path / "run" / "adapter"),
                               "--learning-rate", "0.05"))
    assert again["adapter_params"] == record["adapter_params"]
    assert again["test"] == record["test"] and again["train"]["losses"] == record["train"]["losses"]


def test_adapter_config_default_folder_is_named_after_the_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path, {"structure": "toeplitz"}, "toep.json")
    finetune.run(_args(*TINY, "--adapter-config", path, "--no-save", "--max-steps", "1"))
    assert (tmp_path / "outputs" / "finetune" / "rotten_tomatoes-surm-toeplitz-s0-toep" / "results.json").is_file()


@pytest.mark.integration
def test_finetune_on_the_packaged_minilm(tmp_path):
    args = _args("--data", "rotten_tomatoes", "--method", "surm:toeplitz", "--max-train-samples", "32",
                 "--max-eval-samples", "32", "--output-dir", str(tmp_path), "--quiet")
    record = finetune.run(args)
    # 6 blocks x (query, key, value, attention output: 384 x 384; FFN in and out: 1536 x 384, 384 x 1536)
    assert record["adapter_params"] == 6 * (4 * (384 + 384 - 1) + 2 * (1536 + 384 - 1))
    assert record["train"]["steps"] == 2 and 0 <= record["test"]["accuracy"] <= 1
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "adapter" / "config.json").is_file()
    assert (tmp_path / "adapter" / "tokenizer_config.json").is_file()
