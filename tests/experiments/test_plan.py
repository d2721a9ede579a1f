"""The planner experiment: its planned runs stay within their budgets, runs carry their adapter
config into the key, and the single-family and LoRA references sit at the budgets on MiniLM."""

import json

import pytest
import torch

from surm.experiments import plan
from surm.harness import methods
from surm.harness.runs import RunSpec, adapter_json, make_model


@pytest.fixture(scope="module")
def smoke_plans():
    return plan.make_plans(plan.PRESETS["smoke"])


def test_planned_runs_train_at_most_their_budget(smoke_plans):
    config = plan.PRESETS["smoke"]
    assert {(p.budget, p.variant) for p in smoke_plans} == {(b, v) for b in config.budgets for v in plan.PLANNED}
    by_adapter = {p.adapter: p for p in smoke_plans}
    planned = [spec for _, variant, spec in plan.specs(config, smoke_plans) if variant in plan.PLANNED]
    assert len(planned) == len(smoke_plans)
    for spec in planned:
        model, _ = make_model(spec, 2)
        adapter = spec.adapter_config()
        adapter.modules_to_save = [spec.profile.head]
        model = methods.apply(model, adapter, spec.profile)
        trained = methods.count_trainable(model, exclude_head=spec.profile.head)
        expected = by_adapter[spec.adapter]
        assert trained == expected.params <= expected.budget_params
        assert spec.lr == config.planned_lr


def test_structured_only_plans_use_no_low_rank(smoke_plans):
    for p in smoke_plans:
        if p.variant == "planned, structured only":
            assert set(p.families) <= set(plan.STRUCTURED)


def test_a_spec_carries_its_adapter_into_the_key(smoke_plans):
    adapter = smoke_plans[0].adapter
    plain = RunSpec(dataset="rotten_tomatoes", method="surm:low_rank", model="tiny-bert")
    carried = plain.replace(adapter=adapter)
    assert "adapter" not in plain.identity() and carried.identity()["adapter"] == adapter
    assert carried.key != plain.key and carried.slug != plain.slug
    assert RunSpec.from_json(json.loads(json.dumps(carried.to_json()))).key == carried.key
    assert adapter_json(carried.adapter_config()) == adapter  # canonical: a round trip changes nothing


@pytest.mark.parametrize("budget, single, expected", [("lora:1", "surm:toeplitz:targets=qv", 9_204),
                                                      ("lora:8", "surm:circulant:block_size=24:targets=qv", 73_728)])
def test_references_sit_at_the_budgets_on_minilm(budget, single, expected):

    assert plan.PRESETS["full"].budgets[budget] == methods.parse(single)
    spec = RunSpec(dataset="rotten_tomatoes", method=single)
    rank = int(budget.split(":")[1])
    for method, count in ((single, expected), (budget, rank * 2 * (384 + 384) * 6)):
        with torch.device("meta"):
            model = methods.apply(spec.model_entry.skeleton(), method, spec.profile)
        assert methods.count_trainable(model, exclude_head=spec.profile.head) == count


def test_full_preset_contains_the_quick_settings():
    quick, full = plan.PRESETS["quick"], plan.PRESETS["full"]
    assert set(quick.datasets) <= set(full.datasets) and set(quick.seeds) <= set(full.seeds)
    assert quick.budgets == full.budgets and quick.train_fraction.items() <= full.train_fraction.items()


def test_rates_are_chosen_on_validation_per_budget_and_variant(tmp_path):
    from surm.harness.runs import Runner, RunStore

    config = plan.PRESETS["smoke"].replace(seeds=(0, 1), lr_factors=(0.5, 2.0))
    outcome = plan.run(config, tmp_path / "plan", Runner(RunStore(tmp_path / "runs"), progress=False))
    grids, runs = outcome.payload["lr_grids"], outcome.payload["runs"]
    assert len(grids) == len(config.budgets) * len(plan.VARIANTS)
    for g in grids:
        assert g.rates == sorted(g.default * f for f in config.lr_factors)
        best = max(g.validation_accuracy)
        assert g.chosen in [lr for lr, a in zip(g.rates, g.validation_accuracy) if a == best]
    chosen = {g.chosen for g in grids}
    assert {r.lr for r in runs} <= chosen and {r.spec.seed for r in runs} == {0, 1}
    # each seed trains its own plan: planned runs of different seeds carry different adapters
    planned = [r.spec for r in runs if r.spec.adapter is not None]
    assert len({s.adapter for s in planned if s.seed == 0} & {s.adapter for s in planned if s.seed == 1}) == 0
    assert "(the chosen rate in bold)" in outcome.markdown and "chosen on validation" in outcome.markdown
