"""Adapter-style (serial) placement: the formula, merging, and the bottleneck adapter."""

import peft
import pytest
import torch
from torch import nn

import surm

from .test_lifecycle import train_steps
from .tiny_models import mlp


def _trained(structure="circulant", **kw):
    torch.manual_seed(0)
    base, _, run = mlp()
    model = peft.get_peft_model(base, surm.SurmConfig(structure=structure, placement="serial",
                                                      target_modules=["fc1"], **kw))
    train_steps(model, run)
    return model, run


@pytest.mark.parametrize("activation", ["gelu", "relu", "tanh", "silu", "identity"])
def test_serial_formula(activation):
    model, _ = _trained(activation=activation, alpha=0.7)
    layer = model.base_model.model.fc1
    act = {"gelu": nn.functional.gelu, "relu": torch.relu, "tanh": torch.tanh, "silu": nn.functional.silu,
           "identity": lambda v: v}[activation]
    x = torch.randn(5, 10, dtype=torch.float64)
    with torch.no_grad():
        h = layer.base_layer(x)
        S = layer.surm_matrix["default"].dense()
        scale = 0.7 / (12 * layer.surm_matrix["default"].update_energy()) ** 0.5  # scaling="width", S 12 x 12
        # the bias enters with the width scale alone (alpha multiplies S only)
        expected = h + act(scale * h @ S.T) + (scale / 0.7) * layer.surm_bias["default"]
        torch.testing.assert_close(layer(x), expected)


def test_serial_low_rank_is_the_houlsby_bottleneck_adapter():
    model, _ = _trained("low_rank", rank=3, activation="relu", scaling="none")
    layer = model.base_model.model.fc1
    S = layer.surm_matrix["default"]
    down, up = nn.Linear(12, 3).double(), nn.Linear(3, 12).double()
    with torch.no_grad():
        down.weight.copy_(S.A)
        down.bias.copy_(layer.surm_inner_bias["default"])
        up.weight.copy_(S.B)
        up.bias.copy_(layer.surm_bias["default"])
    x = torch.randn(4, 10, dtype=torch.float64)
    with torch.no_grad():
        h = layer.base_layer(x)
        torch.testing.assert_close(layer(x), h + up(torch.relu(down(h))))
    assert sum(p.numel() for n, p in layer.named_parameters() if "surm_" in n) == 2 * 12 * 3 + 3 + 12


def test_serial_identity_merge_includes_bottleneck_bias():
    model, run = _trained("low_rank", rank=2, activation="identity")
    with torch.no_grad():
        before = run(model)
        merged = model.merge_and_unload()
        torch.testing.assert_close(run(merged), before, rtol=1e-10, atol=1e-10)


def test_serial_merge_creates_a_bias_when_the_layer_has_none():
    torch.manual_seed(0)
    base, _, run = mlp()
    assert base.fc2.bias is None
    model = peft.get_peft_model(base, surm.SurmConfig(placement="serial", activation="identity",
                                                      target_modules=["fc2"]))
    train_steps(model, run)
    with torch.no_grad():
        before = run(model)
        model.merge_adapter()
        assert model.base_model.model.fc2.base_layer.bias is not None
        torch.testing.assert_close(run(model), before, rtol=1e-10, atol=1e-10)
        model.unmerge_adapter()
        assert model.base_model.model.fc2.base_layer.bias is None
        torch.testing.assert_close(run(model), before, rtol=1e-10, atol=1e-10)


def test_serial_merge_refuses_a_nonlinearity_and_leaves_weights_alone():
    model, run = _trained(activation="gelu")
    weight = model.base_model.model.fc1.base_layer.weight.clone()
    with pytest.raises(ValueError, match="cannot merge serial adapter 'default': its activation 'gelu' is not linear"):
        model.merge_and_unload()
    assert torch.equal(model.base_model.model.fc1.base_layer.weight, weight)


def test_safe_merge_refuses_non_finite_weights():
    model, run = _trained(activation="identity")
    with torch.no_grad():
        model.base_model.model.fc1.surm_matrix["default"].weight[0, 0, 0] = float("nan")
    weight = model.base_model.model.fc1.base_layer.weight.clone()
    with pytest.raises(ValueError, match="NaNs detected in the merged weights. The adapter default seems to be broken"):
        model.merge_adapter(safe_merge=True)
    assert torch.equal(model.base_model.model.fc1.base_layer.weight, weight)
