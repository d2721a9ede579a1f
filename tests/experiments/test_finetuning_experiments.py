"""The fine-tuning experiments (nlp, lowres, cka, vision, lr_sweep) in their smoke presets, the run
store, and ``surm reproduce``."""

import argparse
import json

import numpy as np
import pytest
import torch

from surm import experiments
from surm.commands import reproduce
from surm.experiments import cka, common, lowres, lr_sweep, nlp, vision

SMOKE = ["nlp", "lowres", "cka", "vision", "lr_sweep"]


def test_registry_names_every_experiment():
    assert set(experiments.names()) >= {"pinwheel", "nlp", "vision", "lowres", "cka"}
    for name in SMOKE:
        module = experiments.load(name)
        assert callable(module.run) and {"smoke", "quick", "full"} <= set(module.PRESETS)
    with pytest.raises(ValueError, match="unknown experiment"):
        experiments.load("glue")


@pytest.mark.parametrize("name", SMOKE)
def test_smoke_preset_writes_json_markdown_and_plots(tmp_path, name):
    result = experiments.load(name).run(tmp_path / name, "smoke", progress=False)
    out = tmp_path / name
    payload = json.loads((out / f"{name}.json").read_text())
    assert payload["experiment"] == name and payload["preset"] == "smoke"
    assert (out / f"{name}.md").read_text() == result["markdown"] and result["markdown"].startswith("# ")
    assert list(out.glob("*.png"))
    assert all(path.exists() for path in result["files"])
    assert list((tmp_path / "runs").glob("*.json"))  # the shared store, next to the output folder


def test_store_reuses_runs_and_fresh_retrains(tmp_path):
    first = nlp.run(tmp_path / "nlp", "smoke", progress=False, methods={"rotten_tomatoes": ["head"]})
    stored = list((tmp_path / "runs").glob("*.json"))
    assert len(stored) == 1
    seconds = json.loads(stored[0].read_text())["seconds"]
    again = nlp.run(tmp_path / "nlp", "smoke", progress=False, methods={"rotten_tomatoes": ["head"]})
    assert again["rows"][0]["accuracy"] == first["rows"][0]["accuracy"]
    assert json.loads(stored[0].read_text())["seconds"] == seconds  # read back, not retrained
    nlp.run(tmp_path / "nlp", "smoke", progress=False, methods={"rotten_tomatoes": ["head"]}, fresh=True)
    assert json.loads(stored[0].read_text())["seconds"] != seconds


def test_runs_are_deterministic():
    spec = common.RunSpec("rotten_tomatoes", "surm:circulant", model="tiny-bert", train_fraction=0.003, n_eval=16,
                          batch_size=8)
    with common.threads(1):
        a = common.run_one(spec, progress=False)
        b = common.run_one(spec, progress=False)
    assert a["train"]["losses"] == b["train"]["losses"] and a["test"] == b["test"]


def test_run_spec_key_tracks_what_changes_results():
    spec = common.RunSpec("rotten_tomatoes", "lora:8")
    assert spec.key == common.RunSpec("rotten_tomatoes", "lora:8", save_deltas=True).key
    assert spec.key == common.RunSpec("rotten_tomatoes", "lora:8", lr=spec.effective_lr).key  # default lr = explicit
    assert spec.key != spec.replace(seed=1).key != spec.replace(lr=0.5).key
    assert spec.key.startswith("rotten_tomatoes-lora-8-s0-")
    assert common.RunSpec("digits", "surm:ldr:rank=2").slug == "digits-surm-ldr-rank2-s0"
    # a head rate equal to the method's is no change; a different one is
    assert spec.key == spec.replace(head_lr=spec.effective_lr).key != spec.replace(head_lr=0.1).key
    bitfit = common.RunSpec("rotten_tomatoes", "bitfit")
    assert bitfit.effective_head_lr == 0.1 and bitfit.key != bitfit.replace(head_lr=bitfit.effective_lr).key


def test_load_splits_sizes_and_fixed_eval_subset():
    a = common.load_splits(common.RunSpec("rotten_tomatoes", "head", train_fraction=0.01, n_eval=50, seed=0))
    b = common.load_splits(common.RunSpec("rotten_tomatoes", "head", train_fraction=0.01, n_eval=50, seed=1))
    assert len(a.train) == 102 and len(a.test) == 50 and len(a.validation) == 50
    assert not np.array_equal(a.train.ids, b.train.ids)  # the seed picks the training subsample...
    assert np.array_equal(a.test.ids, b.test.ids)  # ...never the evaluation subset


def test_deltas_are_merged_weight_changes(tmp_path):
    spec = common.RunSpec("rotten_tomatoes", "lora:2", model="tiny-bert", train_fraction=0.003, n_eval=8,
                          batch_size=8, lr=0.05, save_deltas=True)
    with common.threads(1):
        record, model, deltas = common.execute(spec, progress=False)
    assert len(deltas) == 4 and all(n.endswith(("query.weight", "value.weight")) for n in deltas)
    layer = model.base_model.model.bert.encoder.layer[0].attention.self.query
    expected = layer.get_delta_weight("default")
    torch.testing.assert_close(deltas["bert.encoder.layer.0.attention.self.query.weight"], expected)
    assert all(d.abs().sum() > 0 for d in deltas.values())


def test_linear_cka_properties():
    torch.manual_seed(0)
    x = torch.randn(50, 8)
    q, _ = torch.linalg.qr(torch.randn(8, 8))
    assert cka.linear_cka(x, x) == pytest.approx(1.0)
    assert cka.linear_cka(x, 3 * x @ q) == pytest.approx(1.0)  # orthogonal and scale invariant
    assert cka.linear_cka(x, torch.randn(50, 8)) < 0.5
    assert cka.linear_cka(x, torch.zeros(50, 8)) == 0.0
    assert cka.drift(x, x) == pytest.approx(0.0, abs=1e-12) and cka.drift(-x, x) == pytest.approx(2.0)


def test_lowres_min_steps_only_where_an_epoch_is_shorter():
    by_fraction = {s.train_fraction: s.min_steps for s in lowres.specs(dict(lowres.PRESETS["full"]))}
    assert by_fraction == {0.01: 64, 0.05: 64, 0.1: 0, 0.25: 0}  # 10 %: one epoch is 64 steps already


def test_nlp_full_contains_the_quick_runs():
    quick = {s.key for s in nlp.specs(dict(nlp.PRESETS["quick"]))}
    assert quick <= {s.key for s in nlp.specs(dict(nlp.PRESETS["full"]))}


def test_cka_reuses_the_nlp_runs():
    nlp_keys = {s.key for s in nlp.specs(dict(nlp.PRESETS["full"])) if s.dataset == "rotten_tomatoes"}
    base = nlp.base_spec(nlp.PRESETS["full"], "rotten_tomatoes")
    config = cka.PRESETS["full"]
    for method in [config["reference"], *config["methods"]]:
        assert base.replace(method=method, seed=0).key in nlp_keys


@pytest.mark.parametrize("module", [nlp, lowres, cka, vision, lr_sweep],
                         ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_every_preset_accepts_a_threads_override(module):
    # regression: `surm reproduce cka --set threads=1` used to fail (cka had no threads key)
    name = module.__name__.rsplit(".", 1)[-1]
    for preset in module.PRESETS:
        assert common.resolve_preset(name, module.PRESETS, preset, {"threads": 1})["threads"] == 1


def test_bad_preset_and_override_messages(tmp_path):
    with pytest.raises(ValueError, match="nlp: unknown preset 'huge'"):
        nlp.run(tmp_path, "huge")
    with pytest.raises(TypeError, match="nlp: unknown override"):
        nlp.run(tmp_path, "smoke", epochz=2)


def _reproduce(argv):
    parser = argparse.ArgumentParser()
    reproduce.add_parser(parser.add_subparsers())
    args = parser.parse_args(["reproduce", *argv])
    return args.func(args)


def test_reproduce_command_prints_the_table(tmp_path, capsys):
    results = _reproduce(["lowres", "--preset", "smoke", "--out", str(tmp_path / "lowres"), "--seeds", "1",
                          "--set", "methods=['head', 'surm:circulant']", "--set", "progress=False"])
    printed = capsys.readouterr().out
    assert "| SURM circulant |" in printed and "Low-resource" in printed
    assert results["lowres"]["rows"][0]["seeds"] == [1]
    with pytest.raises(SystemExit, match="unknown override"):
        _reproduce(["nlp", "--preset", "smoke", "--out", str(tmp_path / "x"), "--set", "nope=1"])
    assert reproduce.parse_overrides(["a=[1, 2]", "b=text", "c=3e-3"]) == {"a": [1, 2], "b": "text", "c": 0.003}


def test_quick_preset_is_the_readme_comparison():
    quick = nlp.PRESETS["quick"]
    assert list(quick["methods"]) == ["rotten_tomatoes"] and quick["model"] == "minilm"
    methods = quick["methods"]["rotten_tomatoes"]
    assert {"head", "lora:8", "surm:circulant"} <= set(methods)
    assert sum(m.startswith("surm:") for m in methods) >= 2
