"""Every experiment follows the protocol and its smoke preset runs; what the fine-tuning
experiments (nlp, lowres, cka, vision, lr_sweep) promise about their runs."""

import inspect
import json

import pytest
import torch

from surm import experiments
from surm.experiments import cka, lowres, nlp, report
from surm.harness.methods import parse
from surm.harness.runs import Runner, RunStore

FINETUNING = ["nlp", "lowres", "cka", "vision", "lr_sweep"]


def test_registry_names_every_experiment():
    assert set(experiments.names()) >= {"pinwheel", "nlp", "vision", "lowres", "cka", "lr_sweep"}
    with pytest.raises(ValueError, match="unknown experiment"):
        experiments.load("glue")


@pytest.mark.parametrize("name", experiments.names())
def test_every_experiment_follows_the_protocol(name):
    module = experiments.load(name)
    assert list(inspect.signature(module.run).parameters) == ["config", "out_dir", "runner"]
    assert callable(module.run) and {"smoke", "quick", "full"} <= set(module.PRESETS)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return RunStore(tmp_path_factory.mktemp("runs"))


@pytest.mark.parametrize("name", experiments.names())
def test_smoke_preset_writes_json_markdown_and_plots(tmp_path, store, name):
    module = experiments.load(name)
    outcome = module.run(module.PRESETS["smoke"], tmp_path / name, Runner(store, progress=False))
    out = tmp_path / name
    assert isinstance(outcome, report.Outcome) and outcome.experiment == name
    payload = json.loads((out / f"{name}.json").read_text())
    assert payload["experiment"] == name and payload["preset"] == "smoke"
    assert (out / f"{name}.md").read_text() == outcome.markdown and outcome.markdown.startswith("# ")
    assert list(out.glob("*.png")) and all(path.exists() for path in outcome.files)
    if name in FINETUNING:
        assert payload["config"]["name"] == "smoke" and all(r["code"] for r in payload["runs"])
        assert list(store.root.glob("*.json"))  # the runs went to the given store


def test_tables_mark_runs_from_the_store(tmp_path, store):
    config = nlp.PRESETS["smoke"].replace(methods={"rotten_tomatoes": ("head",)})
    fresh = nlp.run(config, tmp_path, Runner(RunStore(tmp_path / "runs"), progress=False))
    assert report.STORED not in fresh.markdown
    again = nlp.run(config, tmp_path, Runner(RunStore(tmp_path / "runs"), progress=False))
    assert f"| head only {report.STORED} |" in again.markdown
    assert "Read from the run store (1 of 1 runs)" in again.markdown
    assert again.payload["rows"][0].accuracy == fresh.payload["rows"][0].accuracy


def test_lowres_min_steps_only_where_an_epoch_is_shorter():
    config = lowres.PRESETS["full"].replace(fractions=(0.01, 0.05, 0.1, 0.25))
    by_fraction = {s.train_fraction: s.min_steps for s in lowres.specs(config)}
    assert by_fraction == {0.01: 64, 0.05: 64, 0.1: 0, 0.25: 0}  # 10 %: one epoch is 64 steps already


def test_nlp_every_family_contains_the_quick_runs():
    quick = {s.key for s in nlp.specs(nlp.PRESETS["quick"])}
    assert quick <= {s.key for s in nlp.specs(nlp.PRESETS["every_family"])}


def test_nlp_saves_deltas_of_parallel_updates_on_rotten_tomatoes():
    saved = {s.method.name for s in nlp.specs(nlp.PRESETS["every_family"]) if s.save_deltas}
    assert saved == {"full", "lora:1", "lora:4", "lora:8", "surm:circulant", "surm:skew_circulant", "surm:toeplitz",
                     "surm:symmetric_toeplitz", "surm:kronecker", "surm:ldr:rank=1"}


def test_cka_reuses_the_nlp_runs():
    nlp_keys = {s.key for s in nlp.specs(nlp.PRESETS["every_family"]) if s.dataset == "rotten_tomatoes"}
    assert {s.key for s in cka.specs(cka.PRESETS["full"])} <= nlp_keys


def test_a_preset_lr_reaches_the_specs():
    config = nlp.PRESETS["quick"].replace(lr={"surm:circulant": 0.02})
    lrs = {s.method.name: s.effective_lr for s in nlp.specs(config)}
    assert lrs["surm:circulant"] == 0.02 and lrs["lora:8"] == 0.003
    assert {s.lr for s in nlp.specs(config.replace(lr=0.01))} == {0.01}


def test_quick_preset_is_the_readme_comparison():
    quick = nlp.PRESETS["quick"]
    assert list(quick.methods) == ["rotten_tomatoes"] and quick.model == "minilm"
    methods = quick.methods["rotten_tomatoes"]
    assert {parse("head"), parse("lora:8"), parse("surm:circulant")} <= set(methods)
    assert sum(m.kind == "surm" for m in methods) >= 2


def test_linear_cka_properties():
    torch.manual_seed(0)
    x = torch.randn(50, 8)
    q, _ = torch.linalg.qr(torch.randn(8, 8))
    assert cka.linear_cka(x, x) == pytest.approx(1.0)
    assert cka.linear_cka(x, 3 * x @ q) == pytest.approx(1.0)  # orthogonal and scale invariant
    assert cka.linear_cka(x, torch.randn(50, 8)) < 0.5
    assert cka.linear_cka(x, torch.zeros(50, 8)) == 0.0
    assert cka.drift(x, x) == pytest.approx(0.0, abs=1e-12) and cka.drift(-x, x) == pytest.approx(2.0)
