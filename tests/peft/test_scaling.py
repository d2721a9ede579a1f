"""The ``scaling`` of SURM adapters: one Adam step moves ``alpha_eff * S`` by about
``lr * sqrt(min(m, n))`` whatever the family, knob, placement and shape; the model at init is
the base model; adapters saved without the field load with ``scaling="none"``."""

import json
import math

import peft
import pytest
import torch
from torch import nn

import surm
from surm.peft.layer import SurmLayer

from .tiny_models import bert

FAMILIES = [("circulant", {}), ("circulant", {"block_size": 4}), ("skew_circulant", {}), ("toeplitz", {}),
            ("symmetric_toeplitz", {}), ("kronecker", {}), ("kronecker", {"terms": 2}), ("ldr", {"rank": 1}),
            ("ldr", {"rank": 2}), ("low_rank", {"rank": 2})]
SHAPES = [(64, 64), (32, 128), (128, 32)]


def first_step_change(structure, knobs, out_features, in_features, placement, scaling, lr=1e-3):
    """||alpha_eff (S_1 - S_0)||_F / (lr sqrt(min(m, n))) after one Adam step on a random loss."""
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(in_features, out_features))
    config = surm.SurmConfig(structure=structure, placement=placement, scaling=scaling, target_modules=["0"],
                             **knobs)
    model = peft.get_peft_model(layer, config)
    wrapped = next(m for m in model.modules() if isinstance(m, SurmLayer))
    S = wrapped.surm_matrix["default"]
    params = [p for n, p in model.named_parameters() if p.requires_grad and "surm_matrix" in n]
    before = S.dense().detach().clone()
    opt = torch.optim.Adam(params, lr=lr)
    x = torch.randn(16, in_features)
    target = torch.randn(16, out_features)
    ((model(x) - target) ** 2).sum().backward()
    opt.step()
    m, n = S.shape
    change = wrapped.surm_alpha["default"] * (S.dense().detach() - before)
    return float(change.norm()) / (lr * math.sqrt(min(m, n)))


@pytest.mark.parametrize("placement", ["parallel", "serial"])
@pytest.mark.parametrize("out_features,in_features", SHAPES)
def test_one_adam_step_moves_every_family_alike(placement, out_features, in_features):
    ratios = {f"{s}{k}": first_step_change(s, k, out_features, in_features, placement, "width")
              for s, k in FAMILIES}
    for name, ratio in ratios.items():
        assert 0.5 < ratio < 2.0, (name, ratios)


def test_the_scale_narrows_the_spread_of_steps_across_families_and_shapes():
    # the control: with alpha alone the first step's size varies about tenfold over the same cases
    spread = {}
    for scaling in ("width", "none"):
        ratios = [first_step_change(s, k, o, i, "parallel", scaling) for s, k in FAMILIES for o, i in SHAPES]
        spread[scaling] = max(ratios) / min(ratios)
    assert spread["width"] < 2 and spread["none"] > 5, spread


@pytest.mark.parametrize("scaling", ["width", "none"])
def test_alpha_stays_the_users_multiplier(scaling):
    alphas = []
    for alpha in (1.0, 2.5):
        model = peft.get_peft_model(nn.Sequential(nn.Linear(12, 20)),
                                    surm.SurmConfig(structure="toeplitz", alpha=alpha, scaling=scaling,
                                                    target_modules=["0"]))
        alphas.append(next(m for m in model.modules() if isinstance(m, SurmLayer)).surm_alpha["default"])
    assert alphas[1] == pytest.approx(2.5 * alphas[0])
    assert alphas[0] == pytest.approx(1.0 if scaling == "none" else 1 / math.sqrt(20))


def test_the_model_at_init_is_the_base_model():
    torch.manual_seed(0)
    base, _, run = bert()
    with torch.no_grad():
        expected = run(base)
    for structure in ("circulant", "toeplitz", "kronecker", "ldr"):
        model = peft.get_peft_model(_copy(base), surm.SurmConfig(structure=structure, target_modules="all-linear"))
        with torch.no_grad():
            assert torch.equal(run(model), expected), structure


def _copy(model):
    import copy

    return copy.deepcopy(model)


def test_an_adapter_saved_before_the_scale_loads_with_alpha_alone(tmp_path):
    torch.manual_seed(0)
    base, _, run = bert()
    pristine = _copy(base)
    model = peft.get_peft_model(base, surm.SurmConfig(structure="toeplitz", scaling="none", init="random"))
    with torch.no_grad():
        before = run(model)
    model.save_pretrained(tmp_path)
    config_file = tmp_path / "adapter_config.json"
    saved = json.loads(config_file.read_text())
    assert saved["scaling"] == "none"
    del saved["scaling"]  # what an adapter saved before the field existed holds
    config_file.write_text(json.dumps(saved))
    loaded = peft.PeftModel.from_pretrained(_copy(pristine), tmp_path)
    assert loaded.peft_config["default"].scaling == "none"
    with torch.no_grad():
        assert torch.equal(run(loaded), before)
    assert surm.SurmConfig.from_pretrained(tmp_path).scaling == "none"


def test_a_scaled_adapter_round_trips(tmp_path):
    torch.manual_seed(0)
    base, _, run = bert()
    pristine = _copy(base)
    model = peft.get_peft_model(base, surm.SurmConfig(structure="kronecker", init="random"))
    assert model.peft_config["default"].scaling == "width"
    with torch.no_grad():
        before = run(model)
    model.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(pristine, tmp_path)
    assert loaded.peft_config["default"].scaling == "width"
    with torch.no_grad():
        assert torch.equal(run(loaded), before)


def test_a_bad_scaling_fails_naming_the_choices():
    with pytest.raises(ValueError, match="scaling must be one of"):
        surm.SurmConfig(scaling="fan_in")
