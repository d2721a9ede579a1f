"""The fair protocol of nlp, vision and lowres: each method's rate is chosen on validation from
its grid, per setting, with the first seed; the other seeds train at the chosen rate."""

import math

import pytest

from surm.experiments import lowres, nlp, selection, vision
from surm.harness.methods import parse
from surm.harness.runs import Runner, RunStore

EXPERIMENTS = {"nlp": nlp, "vision": vision, "lowres": lowres}


def _fair_smoke(name):
    smoke = EXPERIMENTS[name].PRESETS["smoke"]
    surm = next(m for m in (smoke.methods["rotten_tomatoes"] if name == "nlp" else smoke.methods) if m.kind == "surm")
    return smoke.replace(seeds=(0, 1), lr_factors=(0.5, 2.0), at_default=(surm,)), surm


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_rates_are_chosen_on_validation_for_each_setting(tmp_path, name):
    config, surm = _fair_smoke(name)
    outcome = EXPERIMENTS[name].run(config, tmp_path / name, Runner(RunStore(tmp_path / "runs"), progress=False))
    payload = outcome.payload
    group = "train_fraction" if name == "lowres" else "dataset"
    sweep = payload["lr_grid_runs"]
    assert payload["lr_chosen"]
    for choice in payload["lr_chosen"]:
        mine = [r for r in sweep if getattr(r.spec, group) == choice[group] and r.method.name == choice["method"]]
        assert sorted(r.lr for r in mine) == sorted(selection.grid(choice["default"], config.lr_factors))
        assert all(r.spec.seed == 0 for r in mine)
        best = max(r.validation["accuracy"] for r in mine)
        winners = [r.lr for r in mine if r.validation["accuracy"] == best]
        assert choice["lr"] == min(winners, key=lambda lr: abs(math.log(lr / choice["default"])))
    # every seed of every setting trained at its chosen rate (seed 0's run is the grid's, from the store)
    chosen = {(c[group], c["method"]): c["lr"] for c in payload["lr_chosen"]}
    final = [r for r in payload["runs"] if r.lr == chosen[(getattr(r.spec, group), r.method.name)]]
    assert {r.spec.seed for r in final} == {0, 1}
    assert {(getattr(r.spec, group), r.method.name) for r in final} == set(chosen)
    # the documented default is reported on every seed at its default rate, as a separate row
    at_default = [row for row in payload["rows"] if row.label.endswith(selection.AT_DEFAULT)]
    assert [row.method for row in at_default] == [surm] * len(at_default) and at_default
    assert all(row.seeds == [0, 1] for row in at_default)
    assert "chosen on the validation split" in outcome.markdown and "(the chosen rate in bold)" in outcome.markdown
    assert (tmp_path / name / f"{name}_lr.png").is_file()


def test_a_grid_is_the_default_times_each_factor():
    assert selection.grid(3e-2, (1 / 3, 1.0, 3.0)) == (0.01, 0.03, 0.09)


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_fixed_rate_and_grid_together_are_refused(name):
    smoke = EXPERIMENTS[name].PRESETS["smoke"]
    with pytest.raises(ValueError, match="lr and lr_factors: give one"):
        smoke.replace(lr=1e-3, lr_factors=(1.0, 3.0))


def test_full_presets_choose_rates_on_validation_with_the_same_grid():
    for module in EXPERIMENTS.values():
        full = module.PRESETS["full"]
        assert full.lr_factors == nlp.FAIR_FACTORS and len(full.seeds) == 3
        assert {parse("surm:circulant"), parse("surm:toeplitz")} <= set(full.at_default)


def test_a_method_that_does_not_fit_the_model_fails_before_any_run_trains(tmp_path):
    from surm.harness.runs import RunSpec

    store = RunStore(tmp_path / "runs")
    good = RunSpec(dataset="rotten_tomatoes", method="head", model="tiny-bert", train_fraction=0.002, n_eval=8)
    bad = good.replace(method="c3a:5")  # 5 divides none of tiny-bert's layer widths
    with pytest.raises(ValueError, match=r"cannot start: c3a:5 on tiny-bert: .*block size"):
        Runner(store, progress=False).run_all([good, bad], "test")
    assert not list(store.root.glob("*.json"))  # nothing trained, nothing stored
    image = RunSpec(dataset="digits", method="c3a:4", model="efficientnet", train_fraction=0.01, n_eval=8)
    with pytest.raises(ValueError, match="PEFT's C3A adapts Linear layers only"):
        Runner(store, progress=False).run_all([image], "test")
