"""The planner: known answers by construction, the budget, the knapsack against brute force, a
model left exactly as it was, and a config that builds exactly the plan."""

import copy
import itertools
import math
import re

import numpy as np
import peft
import pytest
import torch
from torch import nn

import surm
from surm import structured
from surm.analysis import plan as planner
from surm.peft import SurmLayer

from ..peft.tiny_models import bert

# --------------------------------------------------------------------------- a model with known gradients


class Probe(nn.Module):
    """Independent frozen linear layers, each fed the identity: the loss
    ``batch * sum_l <W_l, M_l>`` has gradient exactly ``batch * M_l`` at layer l."""

    def __init__(self, targets: dict[str, torch.Tensor]):
        super().__init__()
        self.targets = targets
        self.layers = nn.ModuleDict({n: nn.Linear(M.shape[1], M.shape[0], bias=False) for n, M in targets.items()})
        self.to(torch.float64).requires_grad_(False)

    def loss(self, batch: float) -> torch.Tensor:
        total = 0.0
        for name, M in self.targets.items():
            n = M.shape[1]
            out = self.layers[name](torch.eye(n, dtype=torch.float64))  # (n, m) = W^T
            total = total + (out * M.T).sum()
        return batch * total


def _toeplitz(m, n, g):
    t = torch.randn(m + n - 1, generator=g, dtype=torch.float64)
    return t[torch.arange(m)[:, None] - torch.arange(n)[None, :] + n - 1]


def _circulant(n, g):
    c = torch.randn(n, generator=g, dtype=torch.float64)
    return c[(torch.arange(n)[:, None] - torch.arange(n)[None, :]) % n]


def _symmetric_toeplitz(n, g):
    s = torch.randn(n, generator=g, dtype=torch.float64)
    return s[(torch.arange(n)[:, None] - torch.arange(n)[None, :]).abs()]


def _low_rank(m, n, r, g):
    return torch.randn(m, r, generator=g, dtype=torch.float64) @ torch.randn(r, n, generator=g, dtype=torch.float64)


def _kronecker(m, n, g):
    (a1, a2), (b1, b2) = structured.auto_factors(m, n)
    return torch.kron(torch.randn(a1, a2, generator=g, dtype=torch.float64),
                      torch.randn(b1, b2, generator=g, dtype=torch.float64))


def _known():
    g = torch.Generator().manual_seed(0)
    return {
        "toeplitz": (_toeplitz(12, 8, g), "toeplitz", 19),  # rectangular
        "circulant": (_circulant(16, g), "circulant", 16),
        "symmetric": (_symmetric_toeplitz(10, g), "symmetric_toeplitz", 10),
        "low_rank": (_low_rank(10, 14, 1, g), "low_rank", 24),
        "kronecker": (_kronecker(12, 16, g), "kronecker", None),
        "zero": (torch.zeros(8, 8, dtype=torch.float64), None, 0),
    }


def _probe_plan(budget, **kwargs):
    known = _known()
    model = Probe({name: M for name, (M, _, _) in known.items()})
    result = planner.make_plan(model, [1.0, 3.0], budget, target_modules=list(known),
                               loss_fn=lambda model, batch: model.loss(batch), **kwargs)
    return model, known, result


# --------------------------------------------------------------------------- known answers


def test_the_planner_picks_the_family_the_gradient_has():
    known = _known()
    kron_params = structured.make("kronecker", 12, 16, device="meta").num_params
    exact = sum(p for _, _, p in known.values() if p) + kron_params
    model, known, result = _probe_plan(exact)
    choices = {layer.name.rsplit(".", 1)[-1]: layer for layer in result.layers}
    for name, (M, family, _) in known.items():
        layer = choices[name]
        assert layer.grad_energy == pytest.approx(4 * float((M * M).sum()))  # the mean of 1 M and 3 M
        if family is None:
            assert layer.choice is None  # a zero gradient buys nothing
            continue
        assert layer.choice.structure == family, (name, layer.choice)
        assert layer.fraction(layer.choice) == pytest.approx(1.0)
    assert choices["kronecker"].choice.knobs["terms"] == 1
    assert result.params == exact
    assert result.energy == pytest.approx(result.grad_energy)


def test_a_smaller_budget_is_never_exceeded_and_the_plan_is_the_best_by_brute_force():
    model, known, result = _probe_plan(60, structures=["toeplitz", "low_rank"])
    assert result.params <= 60
    assert {layer.name.rsplit(".", 1)[-1]: layer.choice for layer in result.layers}["zero"] is None
    groups = [[(c.params, c.energy) for c in layer.candidates] for layer in result.layers]
    assert result.energy == pytest.approx(_brute_force(groups, 60))


def test_structures_restrict_the_choice():
    _, _, result = _probe_plan(400, structures=["low_rank", "toeplitz"])
    assert {layer.choice.structure for layer in result.layers if layer.choice} <= {"low_rank", "toeplitz"}
    chosen = {layer.name.rsplit(".", 1)[-1]: layer.choice for layer in result.layers}
    assert chosen["circulant"].structure == "toeplitz"  # a circulant is Toeplitz: 31 parameters capture it all
    circulant = next(layer for layer in result.layers if layer.name.endswith("circulant"))
    assert circulant.fraction(circulant.choice) == pytest.approx(1.0)


def test_captured_energy_is_the_best_approximations_energy():
    g = torch.Generator().manual_seed(1)
    G = torch.randn(12, 8, generator=g, dtype=torch.float64)
    s = torch.linalg.svdvals(G)
    assert planner.captured_energy(G, "low_rank", {"rank": 2}) == pytest.approx(float((s[:2] ** 2).sum()))
    for family, knobs in [("circulant", {}), ("circulant", {"block_size": 4}), ("toeplitz", {}),
                          ("symmetric_toeplitz", {}), ("skew_circulant", {"block_size": 2})]:
        P = structured.get(family).project(G, **knobs).dense()
        assert planner.captured_energy(G, family, knobs) == pytest.approx(float((P * P).sum()))
        assert float((P * P).sum()) <= float((G * G).sum())
    assert planner.captured_energy(torch.zeros(4, 4, dtype=torch.float64), "toeplitz", {}) == 0.0


def test_candidates_cover_the_grid_and_count_parameters_with_the_families():
    cands = planner.candidates(384, 1536)
    names = {c.structure for c in cands}
    assert names == set(planner.DEFAULT_STRUCTURES)  # ldr only when asked for
    blocks = sorted(c.knobs.get("block_size") or 0 for c in cands if c.structure == "circulant")
    assert blocks[0] == 0 and all(384 * 1536 // b <= 16 * (384 + 1536) for b in blocks[1:])
    assert 128 in blocks and 16 not in blocks  # 36,864 parameters > LoRA r=16's 30,720
    assert sorted(c.knobs["rank"] for c in cands if c.structure == "low_rank") == [1, 2, 4, 8]
    assert sorted(c.knobs["terms"] for c in cands if c.structure == "kronecker") == [1, 2, 4]
    for c in cands:
        assert c.params == structured.make(c.structure, 384, 1536, device="meta", **c.knobs).num_params
    square = planner.candidates(8, 8, ["circulant"])
    assert [c.knobs for c in square].count({}) == 1 and {"block_size": 8} not in [c.knobs for c in square]
    assert [c.knobs for c in planner.candidates(8, 8, ["ldr"])] == [{"rank": 1}, {"rank": 2}]


def test_ldr_when_asked_for_never_loses_to_the_circulant_it_starts_from():
    g = torch.Generator().manual_seed(2)
    G = torch.randn(10, 10, generator=g, dtype=torch.float64)
    circulant = planner.captured_energy(G, "circulant", {})
    assert planner.captured_energy(G, "ldr", {"rank": 1}) >= circulant * (1 - 1e-9)


# --------------------------------------------------------------------------- the knapsack


def _brute_force(groups, budget):
    best = 0.0
    for pick in itertools.product(*[[None, *range(len(items))] for items in groups]):
        cost = sum(groups[i][k][0] for i, k in enumerate(pick) if k is not None)
        value = sum(groups[i][k][1] for i, k in enumerate(pick) if k is not None)
        if cost <= budget:
            best = max(best, value)
    return best


@pytest.mark.parametrize("seed", range(30))
def test_the_knapsack_is_optimal_on_small_random_instances(seed):
    rng = np.random.default_rng(seed)
    groups = [
        [(int(rng.integers(0, 12)), float(rng.choice([rng.random(), 0.5, 0.0]))) for _ in range(rng.integers(0, 5))]
        for _ in range(rng.integers(1, 5))
    ]
    budget = int(rng.integers(0, 30))
    choices, value = planner.knapsack(groups, budget)
    assert len(choices) == len(groups)
    cost = sum(groups[i][k][0] for i, k in enumerate(choices) if k is not None)
    picked = sum(groups[i][k][1] for i, k in enumerate(choices) if k is not None)
    assert cost <= budget
    assert picked == pytest.approx(value)
    assert value == pytest.approx(_brute_force(groups, budget))


def test_the_knapsack_prefers_the_cheaper_of_equal_values_and_refuses_bad_budgets():
    assert planner.knapsack([[(5, 1.0), (3, 1.0)], [(4, 0.0)]], 10) == ([1, None], 1.0)
    assert planner.knapsack([[(5, 1.0)]], 4) == ([None], 0.0)
    with pytest.raises(ValueError, match="budget must be an integer >= 0"):
        planner.knapsack([], -1)


# --------------------------------------------------------------------------- real models


def _batches(n=2, labels=3):
    torch.manual_seed(5)
    return [{"input_ids": torch.randint(0, 64, (4, 7)), "attention_mask": torch.ones(4, 7, dtype=torch.long),
             "labels": torch.randint(0, labels, (4,))} for _ in range(n)]


def test_the_model_is_left_exactly_as_it_was():
    torch.manual_seed(0)
    model, _, _ = bert()
    model.train()
    model.bert.encoder.layer[0].eval()  # a mix of modes
    model.bert.encoder.layer[1].attention.self.query.weight.requires_grad_(False)
    model.classifier.weight.grad = torch.full_like(model.classifier.weight, 7.0)
    grads = {n: p.grad for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    state = copy.deepcopy(model.state_dict())
    batches = _batches()
    rng = torch.get_rng_state()
    planner.plan(model, batches, "lora:1")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is grads[n] for n, p in model.named_parameters())
    assert torch.equal(model.classifier.weight.grad, torch.full_like(model.classifier.weight, 7.0))
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert torch.equal(torch.get_rng_state(), rng)


def test_frozen_weights_give_the_same_gradient_as_trainable_ones():
    torch.manual_seed(0)
    model, _, _ = bert()
    layers = planner.target_layers(model)
    frozen, _ = planner.gradients(model, _batches(1), layers)
    model.zero_grad()
    model.eval()
    model(**_batches(1)[0]).loss.backward()
    for name, layer in layers:
        torch.testing.assert_close(frozen[name], layer.weight.grad.double())


@pytest.mark.parametrize("budget", [0, 100, "lora:1", 700, "lora:4"])
def test_the_config_builds_exactly_the_plan_within_the_budget(budget, tmp_path):
    torch.manual_seed(0)
    model, _, run = bert()
    pristine = copy.deepcopy(model)
    try:
        result = planner.make_plan(model, _batches(), budget, target_modules="all-linear",
                                   exclude_modules=["classifier"], structures=["circulant", "toeplitz", "kronecker",
                                                                               "low_rank", "symmetric_toeplitz"])
    except ValueError as err:
        assert budget == 0 and "below the cheapest candidate" in str(err)
        return
    limit = planner.resolve_budget(budget, model)
    assert result.params <= limit and result.budget == limit
    config = result.config
    config.save_pretrained(tmp_path)
    loaded = peft.PeftConfig.from_pretrained(tmp_path)  # JSON round trip: the same plan
    for cfg in (config, loaded):
        adapted = peft.get_peft_model(copy.deepcopy(pristine), copy.deepcopy(cfg))
        built = {name.removeprefix("base_model.model."): m.surm_matrix["default"]
                 for name, m in adapted.named_modules() if isinstance(m, SurmLayer)}
        planned = {layer.name: layer.choice for layer in result.layers if layer.choice is not None}
        assert set(built) == set(planned)
        for name, choice in planned.items():
            S = built[name]
            assert S.name == choice.structure and S.num_params == choice.params
            assert {k: v for k, v in S.knobs().items() if k in choice.knobs} == {
                k: tuple(map(tuple, v)) if k == "factors" else v for k, v in choice.knobs.items()}
        assert adapted.get_nb_trainable_parameters()[0] == result.params


def test_lora_budgets_count_r_times_out_plus_in_on_the_default_lora_targets():
    model, _, _ = bert()
    assert planner.resolve_budget("lora:1", model) == 4 * (24 + 24)  # query and value of 2 layers
    assert planner.resolve_budget("lora:8", model) == 8 * 4 * 48
    assert planner.resolve_budget(9216, model) == planner.resolve_budget("9216", model) == 9216
    assert planner.lora_budget(model, 2, ["intermediate.dense"]) == 2 * 2 * (48 + 24)


def test_surm_plan_is_the_planner_and_returns_a_config():
    model, _, _ = bert()
    config = surm.plan(model, iter(_batches(3)), "lora:1", max_batches=2)
    assert isinstance(config, surm.SurmConfig) and config.placement == "parallel"
    assert all(re.escape(name) in config.structure_pattern for name in config.target_modules)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("budget, match", [
    ("lora:x", r"budget must be a parameter count .* or 'lora:R'"),
    (-5, "budget must be a parameter count"),
    (True, "budget must be a parameter count"),
    (1.5, "budget must be a parameter count"),
])
def test_bad_budgets(budget, match):
    model, _, _ = bert()
    with pytest.raises(ValueError, match=match):
        planner.plan(model, _batches(1), budget)


def test_other_errors_say_what_to_do():
    model, _, _ = bert()
    with pytest.raises(ValueError, match=r"below the cheapest candidate \(24\)"):
        planner.plan(model, _batches(1), 10)
    with pytest.raises(ValueError, match=r"loss is None: the batches hold no labels"):
        planner.plan(model, [{"input_ids": torch.randint(0, 64, (2, 5))}], 500)
    with pytest.raises(TypeError, match="a batch must be a dict"):
        planner.plan(model, [torch.zeros(2, 5)], 500)
    with pytest.raises(ValueError, match="no batches"):
        planner.plan(model, [], 500)
    with pytest.raises(ValueError, match="the loss must be a scalar tensor; got a tensor of shape \\(2,\\)"):
        planner.plan(model, _batches(1), 500, loss_fn=lambda m, b: torch.ones(2, requires_grad=True))
    with pytest.raises(ValueError, match="the loss does not depend on the weight of any target layer"):
        planner.plan(model, _batches(1), 500, loss_fn=lambda m, b: torch.tensor(1.0))
    with pytest.raises(ValueError, match="unknown structure 'circulent'"):
        planner.plan(model, _batches(1), 500, structures=["circulent"])
    with pytest.raises(ValueError, match="matched no module"):
        planner.plan(model, _batches(1), 500, target_modules=["nope"])
    probe = Probe({"a": torch.ones(4, 4, dtype=torch.float64)})
    with pytest.raises(ValueError, match="no default target modules for model type None"):
        planner.plan(probe, [1.0], "lora:1", loss_fn=lambda m, b: m.loss(b))
    with pytest.raises(ValueError, match="the loss gradient is zero at every target layer"):
        planner.plan(probe, [0.0], 100, target_modules=["a"], loss_fn=lambda m, b: m.loss(b))
    assert math.isfinite(planner.captured_energy(torch.ones(3, 3), "low_rank", {"rank": 1}))
