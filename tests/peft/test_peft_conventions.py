"""PEFT's conventions, held against LoRA where PEFT has one: adapter dtype, merge order,
safe-merge wording, model status, and config validation before the model is touched."""

import copy

import peft
import pytest
import torch
from torch import nn

import surm
from surm.peft import SurmLayer

from .test_lifecycle import train_steps
from .tiny_models import bert, mlp


def _surm_layers(model):
    return [m for m in model.modules() if isinstance(m, SurmLayer)]


# -- adapter dtype on a half-precision base ------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("autocast", [True, False])
@pytest.mark.parametrize("structure", ["circulant", "ldr", "low_rank"])
def test_autocast_adapter_dtype_follows_peft(dtype, autocast, structure):
    base = mlp()[0].to(dtype)
    model = peft.get_peft_model(
        copy.deepcopy(base), surm.SurmConfig(structure=structure, target_modules=["fc1", "fc2"]),
        autocast_adapter_dtype=autocast,
    )
    lora = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=["fc1", "fc2"]),
                               autocast_adapter_dtype=autocast)
    expected = torch.float32 if autocast else dtype
    assert {p.dtype for n, p in model.named_parameters() if "surm_" in n} == {expected}
    assert {p.dtype for n, p in lora.named_parameters() if "lora_" in n} == {expected}  # PEFT's own rule
    x = torch.randn(3, 10, dtype=dtype)
    y = model(x)
    assert y.dtype == dtype and torch.isfinite(y).all()
    y.float().sum().backward()
    grads = [p.grad for n, p in model.named_parameters() if "surm_" in n]
    assert all(g is not None and g.dtype == expected for g in grads)


def test_autocast_false_adapters_still_compute_in_a_float32_island():
    torch.manual_seed(0)
    base = mlp()[0].float()
    config = surm.SurmConfig(structure="skew_circulant", init="random", target_modules=["fc1"])
    ref = peft.get_peft_model(copy.deepcopy(base), config)
    half = peft.get_peft_model(copy.deepcopy(base).to(torch.bfloat16), copy.deepcopy(config),
                               autocast_adapter_dtype=False)
    half.load_state_dict({k: v.to(torch.bfloat16) for k, v in ref.state_dict().items()})
    x = torch.randn(4, 10)
    torch.testing.assert_close(half(x.bfloat16()).float(), ref(x), rtol=5e-2, atol=5e-2)


# -- serial merges: one at a time == all at once ---------------------------------------------------
def _two_serial_adapters(bias=True):
    torch.manual_seed(0)
    base, _, run = mlp()
    if not bias:
        base.fc1.bias = None
    config = dict(placement="serial", activation="identity", target_modules=["fc1", "fc2"])
    model = peft.get_peft_model(base, surm.SurmConfig(**config), adapter_name="a1")
    model.add_adapter("a2", surm.SurmConfig(structure="toeplitz", **config))
    model.add_adapter("p", surm.SurmConfig(structure="ldr", target_modules=["fc1", "fc2"]))
    for name in ("a1", "a2", "p"):
        model.set_adapter(name)
        train_steps(model, run, steps=2)
    model.base_model.set_adapter(["a1", "a2", "p"])
    return model, run


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "base_layer" in k}


@pytest.mark.parametrize("bias", [True, False])
def test_serial_adapters_merged_one_at_a_time_equal_one_batch_merge(bias):
    model, run = _two_serial_adapters(bias)
    original = _weights(model)
    with torch.no_grad():
        before = run(model)
        model.merge_adapter(["a1", "a2", "p"])
        batch = _weights(model)
        torch.testing.assert_close(run(model), before, rtol=1e-10, atol=1e-10)
        model.unmerge_adapter()
        assert {k: v.shape for k, v in _weights(model).items()} == {k: v.shape for k, v in original.items()}
        assert all(torch.equal(v, original[k]) for k, v in _weights(model).items())
        for order in (["a1", "a2", "p"], ["p", "a2", "a1"], ["a2", "p", "a1"]):
            for name in order:
                model.merge_adapter([name])
            assert all(torch.equal(v, batch[k]) for k, v in _weights(model).items()), order
            torch.testing.assert_close(run(model), before, rtol=1e-10, atol=1e-10)
            model.unmerge_adapter()
            assert all(torch.equal(v, original[k]) for k, v in _weights(model).items()), order


# -- safe merge: PEFT's wording --------------------------------------------------------------------
@pytest.mark.parametrize("placement", ["parallel", "serial"])
def test_safe_merge_uses_peft_wording_and_names_the_broken_adapter(placement):
    torch.manual_seed(0)
    base, _, run = mlp()
    config = dict(placement=placement, activation="identity", target_modules=["fc1"])
    model = peft.get_peft_model(base, surm.SurmConfig(**config), adapter_name="good")
    model.add_adapter("bad", surm.SurmConfig(**config))
    model.base_model.set_adapter(["good", "bad"])
    with torch.no_grad():
        model.base_model.model.fc1.surm_matrix["bad"].weight.fill_(float("nan"))
    weight = model.base_model.model.fc1.base_layer.weight.clone()
    message = "NaNs detected in the merged weights. The adapter bad seems to be broken"
    with pytest.raises(ValueError, match=message):
        model.merge_adapter(["good", "bad"], safe_merge=True)
    assert torch.equal(model.base_model.model.fc1.base_layer.weight, weight)
    lora = peft.get_peft_model(mlp()[0], peft.LoraConfig(target_modules=["fc1"], init_lora_weights=False),
                               adapter_name="bad")
    with torch.no_grad():
        lora.base_model.model.fc1.lora_A["bad"].weight.fill_(float("nan"))
    with pytest.raises(ValueError, match=message):  # the same words from LoRA
        lora.merge_adapter(safe_merge=True)


# -- model status --------------------------------------------------------------------------------
def test_model_and_layer_status_name_surm():
    model = peft.get_peft_model(mlp()[0], surm.SurmConfig(target_modules=["fc1"]))
    assert model.get_model_status().peft_types == {"default": "SURM"}
    assert model.peft_config["default"].peft_type == "SURM"
    assert model.peft_config["default"].to_dict()["peft_type"] == "SURM"
    assert f"{model.peft_config['default'].peft_type}" == "SURM"


# -- config validation -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fused": "false"}, r"fused must be True, False or None.*got 'false' \(str\)"),
        ({"alpha": "1.0"}, r"alpha must be a finite number.*got '1.0' \(str\)"),
        ({"alpha": None}, r"alpha must be a finite number.*got None"),
        ({"alpha": float("inf")}, r"alpha must be a finite number, got inf"),
        ({"dropout": "0.1"}, r"dropout must be a number in \[0, 1\).*got '0.1' \(str\)"),
        ({"structure": "kronecker", "factors": ((2, 4.5), (3, 2))},
         r"factors must be \(\(a1, a2\), \(b1, b2\)\) of positive integers.*4\.5"),
        ({"structure": "ldr", "rank": 2.0}, r"rank must be a positive integer or None; got 2.0 \(float\)"),
        ({"block_size": True}, r"block_size must be a positive integer or None; got True \(bool\)"),
        ({"knob_pattern": ["fc1"]}, r"knob_pattern must be a dict of module-name pattern -> dict of knobs"),
        ({"knob_pattern": {"fc1": 8}}, r"knob_pattern\['fc1'\] must be a dict of knobs, got 8; for example"),
        ({"knob_pattern": {"fc1": {"block_size": "4"}}},
         r"knob_pattern\['fc1'\]\['block_size'\] must be a positive integer"),
        ({"target_modules": 3}, r"target_modules must be a list of module names, a regex string or 'all-linear'"),
        ({"modules_to_save": "head"}, r"modules_to_save must be a list of module names"),
        ({"layers_to_transform": [0, "1"]}, r"layers_to_transform must be a layer index or a list of layer indices"),
        ({"structure": 3}, r"structure must be a string, one of \['circulant'"),
    ],
)
def test_config_rejects_wrong_types_naming_field_value_and_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        surm.SurmConfig(**kwargs)


def test_config_accepts_json_shaped_values():
    config = surm.SurmConfig(structure="kronecker", factors=[[2, 5], [6, 2]], alpha=2, dropout=0)
    assert config.knobs() == {"factors": [[2, 5], [6, 2]]}
    assert surm.SurmConfig(layers_to_transform=[0, 1], layers_pattern="layer", target_modules=["query"])


@pytest.mark.parametrize(
    ("filters", "blamed"),
    [
        ({"layers_to_transform": [5], "layers_pattern": "layer"}, r"layers_to_transform=\[5\].*removed all 4"),
        ({"exclude_modules": ["query", "value"]}, r"exclude_modules=\['query', 'value'\] removed all 4"),
    ],
)
def test_filters_that_remove_every_target_are_blamed_not_target_modules(filters, blamed):
    model = bert()[0]
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=blamed) as err:
        peft.get_peft_model(model, surm.SurmConfig(target_modules=["query", "value"], **filters))
    assert "matched no module" not in str(err.value)
    assert not _surm_layers(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# -- target_modules="all-linear" -------------------------------------------------------------------
@pytest.mark.parametrize(("factory", "task_type"),
                         [("llama", None), ("gpt2", None), ("bert", "SEQ_CLS"), ("mlp", None)])
def test_all_linear_expands_as_peft_does_for_lora(factory, task_type):
    from . import tiny_models

    model, _, run = getattr(tiny_models, factory)()
    lora = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(target_modules="all-linear", task_type=task_type))
    surm_model = peft.get_peft_model(copy.deepcopy(model),
                                     surm.SurmConfig(target_modules="all-linear", task_type=task_type))
    expected = set(lora.peft_config["default"].target_modules)
    assert set(surm_model.peft_config["default"].target_modules) == expected
    wrapped = {name.removeprefix("base_model.model.")
               for name, m in surm_model.named_modules() if isinstance(m, SurmLayer)}
    assert wrapped == expected and len(wrapped) > 1
    assert not any(name.endswith(("lm_head", "classifier")) for name in wrapped)
    with torch.no_grad():
        torch.testing.assert_close(run(surm_model), run(model))  # zero init: the base model's outputs


# -- empty batches through the PEFT layer ----------------------------------------------------------
@pytest.mark.parametrize("placement", ["parallel", "serial"])
@pytest.mark.parametrize("structure", ["circulant", "skew_circulant", "toeplitz", "symmetric_toeplitz",
                                       "kronecker", "ldr", "low_rank"])
def test_empty_batch_like_nn_linear_and_lora(structure, placement):
    base = nn.Sequential(nn.Linear(10, 12), nn.ReLU(), nn.Linear(12, 3))
    config = surm.SurmConfig(structure=structure, placement=placement, target_modules=["0", "2"])
    model = peft.get_peft_model(copy.deepcopy(base), config)
    lora = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=["0", "2"]))
    for x in (torch.randn(0, 10, requires_grad=True), torch.randn(2, 0, 10, requires_grad=True)):
        y = model(x)
        assert y.shape == lora(x).shape == base(x).shape
        y.sum().backward()
        assert x.grad.shape == x.shape
        grads = [p.grad for n, p in model.named_parameters() if "surm_" in n]
        assert grads and all(g is not None and not g.any() for g in grads)
        model.zero_grad()


def test_unmerge_after_the_model_was_cast_restores_weights_in_the_new_dtype():
    torch.manual_seed(0)
    base = mlp()[0].float()
    config = surm.SurmConfig(placement="serial", activation="identity", target_modules=["fc1"])
    model = peft.get_peft_model(base, config)
    x = torch.randn(4, 10)
    train_steps(model, lambda m: m(x), steps=1)
    original = model.base_model.model.fc1.base_layer.weight.detach().clone()
    model.merge_adapter()
    model.double()
    model.unmerge_adapter()
    weight = model.base_model.model.fc1.base_layer.weight
    assert weight.dtype == torch.float64
    assert torch.equal(weight, original.double())
    model(torch.randn(3, 10, dtype=torch.float64))  # runs: weights and input agree
