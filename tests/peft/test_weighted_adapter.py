"""add_weighted_adapter: a new adapter whose update is exactly the weighted sum of others'."""

import copy

import peft
import pytest
import torch

import surm
from surm.peft import SurmLayer

from .tiny_models import MODELS

WEIGHTS = [0.7, -1.5, 2.0]
ALPHAS = [1.0, 0.5, 3.0]
#: per family, the knobs of three adapters (the bilinear ones with different terms / ranks)
FAMILIES = {
    "circulant": [{}, {}, {}],
    "skew_circulant": [{}, {}, {}],
    "toeplitz": [{}, {}, {}],
    "symmetric_toeplitz": [{}, {}, {}],
    "kronecker": [{"terms": 1}, {"terms": 2}, {"terms": 1}],
    "ldr": [{"rank": 1}, {"rank": 2}, {"rank": 1}],
    "low_rank": [{"rank": 2}, {"rank": 3}, {"rank": 1}],
}
GROWN = {"kronecker": ("terms", 4), "ldr": ("rank", 4), "low_rank": ("rank", 6)}


def _randomize(model, adapter):
    """Random values for every tensor of ``adapter`` (including the serial biases)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "surm_" in name and f".{adapter}" in name:
                p.copy_(torch.randn_like(p) * 0.3)


def _build(model_name="mlp", structure="circulant", placement="parallel", knobs_list=None, alphas=ALPHAS,
           targets=None, **extra):
    factory, par, ser, _ = MODELS[model_name]
    torch.manual_seed(0)
    base, _, run = factory()
    pristine = copy.deepcopy(base)
    knobs_list = knobs_list or FAMILIES[structure]
    targets = targets or [ser if placement == "serial" else par] * len(knobs_list)
    model = None
    names = [f"ad{i}" for i in range(len(knobs_list))]
    for name, knobs, alpha, target in zip(names, knobs_list, alphas, targets):
        config = surm.SurmConfig(structure=structure, placement=placement, alpha=alpha, target_modules=target,
                                 **knobs, **extra)
        if model is None:
            model = peft.get_peft_model(base, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
        _randomize(model, name)
    return model, pristine, run, names


def _layer_input(layer):
    if layer.kind == "conv2d":
        return torch.randn(2, layer.in_features, 3, 3, dtype=torch.float64)
    return torch.randn(2, 5, layer.in_features, dtype=torch.float64)


def _update(model, layer, adapter, x):
    """What ``adapter`` alone adds to the layer's output (0 where the layer lacks it)."""
    model.base_model.set_adapter(adapter)
    with torch.no_grad():
        return layer(x) - layer.base_layer(x)


def _assert_weighted_sum(model, names, weights, new="mix"):
    layers = [m for m in model.modules() if isinstance(m, SurmLayer) and new in m.surm_matrix]
    assert layers
    for layer in layers:
        x = _layer_input(layer)
        expected = sum(w * _update(model, layer, a, x) for a, w in zip(names, weights))
        got = _update(model, layer, new, x)
        assert got.abs().max() > 1e-3  # a real update, not a trivially zero one
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("structure", list(FAMILIES))
@pytest.mark.parametrize("placement", ["parallel", "serial"])
def test_combined_update_is_the_weighted_sum(structure, placement):
    """Every family, both placements (serial with the identity activation), three adapters
    with different alphas (and different terms / ranks where they concatenate)."""
    model, _, _, names = _build("mlp", structure, placement, activation="identity")
    model.add_weighted_adapter(names, WEIGHTS, "mix")
    _assert_weighted_sum(model, names, WEIGHTS)
    config = model.peft_config["mix"]
    assert isinstance(config, surm.SurmConfig) and config.structure == structure and config.placement == placement
    if structure in GROWN:
        knob, total = GROWN[structure]
        for layer in (m for m in model.modules() if isinstance(m, SurmLayer)):
            assert layer.surm_matrix["mix"].knobs()[knob] == total
        assert getattr(config, knob) == total


@pytest.mark.parametrize("model_name,structure", [("bert", "circulant"), ("gpt2", "ldr"), ("cnn", "toeplitz"),
                                                  ("llama", "kronecker")])
def test_other_layer_kinds_and_the_whole_model(model_name, structure):
    """Linear, Conv1D and 1x1 Conv2d layers; and the model output with the combined adapter
    equals the base model with every weight W0 + sum_i w_i dW_i."""
    knobs = FAMILIES[structure][:2]
    model, pristine, run, names = _build(model_name, structure, knobs_list=knobs)
    weights = [1.25, -0.5]
    model.add_weighted_adapter(names, weights, "mix")
    _assert_weighted_sum(model, names, weights)
    reference = copy.deepcopy(pristine)
    with torch.no_grad():
        for name, layer in model.base_model.model.named_modules():
            if isinstance(layer, SurmLayer):
                target = reference.get_submodule(name)
                target.weight += sum(w * layer.get_delta_weight(a) for a, w in zip(names, weights))
        model.set_adapter("mix")
        torch.testing.assert_close(run(model), run(reference), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("structure", ["circulant", "low_rank"])
def test_single_adapter_and_negative_weight(structure):
    model, _, _, names = _build("mlp", structure, knobs_list=FAMILIES[structure][:1], alphas=[2.0])
    model.add_weighted_adapter(names, [-1.0], "neg")
    _assert_weighted_sum(model, names, [-1.0], new="neg")
    model.add_weighted_adapter(names, [0.25], "quarter")
    _assert_weighted_sum(model, names, [0.25], new="quarter")


def test_serial_bottleneck_folds_the_inner_bias():
    """Serial low_rank with identity: alpha B (A h + c) + beta; c is concatenated, beta summed."""
    model, _, _, names = _build("mlp", "low_rank", "serial", knobs_list=[{"rank": 2}, {"rank": 3}],
                                activation="identity")
    layer = model.base_model.model.fc1
    assert layer.surm_inner_bias["ad0"].abs().sum() > 0 and layer.surm_bias["ad1"].abs().sum() > 0
    model.add_weighted_adapter(names, [0.5, -2.0], "mix")
    assert layer.surm_inner_bias["mix"].shape == (5,)
    _assert_weighted_sum(model, names, [0.5, -2.0])


@pytest.mark.parametrize("structure", list(FAMILIES))
def test_save_and_load_round_trip(structure, tmp_path):
    model, pristine, run, names = _build("mlp", structure)
    model.add_weighted_adapter(names, WEIGHTS, "mix")
    model.set_adapter("mix")
    with torch.no_grad():
        expected = run(model)
    model.save_pretrained(tmp_path, selected_adapters=["mix"])
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(pristine), tmp_path / "mix", adapter_name="mix")
    assert loaded.peft_config["mix"].structure == structure
    with torch.no_grad():
        torch.testing.assert_close(run(loaded), expected, rtol=0, atol=0)


def test_per_module_knobs_go_to_the_config(tmp_path):
    """Adapters on different modules: fc1 gets rank 1 + 2, fc2 only rank 1; the config says so
    (knob_pattern) and loads."""
    model, pristine, run, names = _build("mlp", "ldr", knobs_list=[{"rank": 1}, {"rank": 2}],
                                         targets=[["fc1", "fc2"], ["fc1"]])
    model.add_weighted_adapter(names, [1.0, 0.5], "mix")
    _assert_weighted_sum(model, names, [1.0, 0.5])
    config = model.peft_config["mix"]
    assert config.knobs_for("fc1") == {"rank": 3} and config.knobs_for("fc2") == {"rank": 1}
    model.set_adapter("mix")
    with torch.no_grad():
        expected = run(model)
    model.save_pretrained(tmp_path, selected_adapters=["mix"])
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(pristine), tmp_path / "mix", adapter_name="mix")
    assert loaded.base_model.model.fc1.surm_matrix["mix"].rank == 3
    assert loaded.base_model.model.fc2.surm_matrix["mix"].rank == 1
    with torch.no_grad():
        torch.testing.assert_close(run(loaded), expected, rtol=0, atol=0)


def test_inherited_knob_pattern_is_overridden_where_knobs_grow():
    model, _, _, names = _build("mlp", "kronecker", knobs_list=[{"terms": 1}, {"terms": 2}],
                                knob_pattern={"fc2": {"terms": 2}})
    model.add_weighted_adapter(names, [1.0, 1.0], "mix")
    assert model.base_model.model.fc1.surm_matrix["mix"].terms == 3
    assert model.base_model.model.fc2.surm_matrix["mix"].terms == 4
    _assert_weighted_sum(model, names, [1.0, 1.0])


def test_block_size_none_on_some_modules(tmp_path):
    """fc1 holds a padded circulant (block_size=None), fc2 a block circulant (block_size=3)."""
    model, pristine, run, names = _build("mlp", "circulant", knobs_list=[{}, {"block_size": 3}],
                                         targets=[["fc1"], ["fc2"]])
    model.add_weighted_adapter(names, [2.0, -1.0], "mix")
    _assert_weighted_sum(model, names, [2.0, -1.0])
    assert model.base_model.model.fc2.surm_matrix["mix"].block_size == 3
    model.set_adapter("mix")
    with torch.no_grad():
        expected = run(model)
    model.save_pretrained(tmp_path, selected_adapters=["mix"])
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(pristine), tmp_path / "mix", adapter_name="mix")
    with torch.no_grad():
        torch.testing.assert_close(run(loaded), expected, rtol=0, atol=0)


def test_the_new_adapter_is_frozen_until_activated():
    model, _, _, names = _build("mlp", "toeplitz", knobs_list=[{}, {}])
    model.set_adapter("ad0")
    model.add_weighted_adapter(names, [1.0, 1.0], "mix")
    assert model.active_adapters == ["ad0"]
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".mix" in n)
    model.set_adapter("mix")
    assert all(p.requires_grad for n, p in model.named_parameters() if "surm_matrix.mix" in n)


def test_a_modules_to_save_copy_is_carried_over():
    factory = MODELS["bert"][0]
    torch.manual_seed(0)
    base, _, _ = factory()
    model = peft.get_peft_model(base, surm.SurmConfig(structure="toeplitz", modules_to_save=["classifier"]),
                                adapter_name="a")
    model.add_adapter("b", surm.SurmConfig(structure="toeplitz"))
    wrapper = model.base_model.model.classifier
    with torch.no_grad():
        wrapper.modules_to_save["a"].weight.normal_()
    model.add_weighted_adapter(["a", "b"], [0.5, 0.5], "mix")
    assert torch.equal(wrapper.modules_to_save["mix"].weight, wrapper.modules_to_save["a"].weight)
    model.add_adapter("c", surm.SurmConfig(structure="toeplitz", modules_to_save=["classifier"]))
    with pytest.raises(ValueError, match=r"adapters \['a', 'c'\] each hold a trained copy of .*classifier"):
        model.add_weighted_adapter(["a", "c"], [0.5, 0.5], "mix2")


# -- refusals ------------------------------------------------------------------------------
def _two(config_a, config_b, model_name="mlp"):
    factory = MODELS[model_name][0]
    torch.manual_seed(0)
    base, _, _ = factory()
    model = peft.get_peft_model(base, config_a, adapter_name="a")
    model.add_adapter("b", config_b)
    return model


def _assert_unchanged(model, name):
    assert name not in model.peft_config
    assert not any(isinstance(m, SurmLayer) and name in m.surm_matrix for m in model.modules())


@pytest.mark.parametrize(
    "config_b,match",
    [
        (dict(structure="toeplitz"),
         r"adapters 'a' \(structure='circulant'\) and 'b' \(structure='toeplitz'\).*share structure"),
        (dict(structure="circulant", placement="serial", activation="identity"),
         r"'b' \(placement='serial'\).*share placement"),
    ],
)
def test_different_structure_or_placement_is_refused(config_b, match):
    model = _two(surm.SurmConfig(structure="circulant", target_modules=["fc1", "fc2"]),
                 surm.SurmConfig(target_modules=["fc1", "fc2"], **config_b))
    with pytest.raises(ValueError, match=match):
        model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "mix")
    _assert_unchanged(model, "mix")


def test_different_layout_knobs_are_refused():
    model = _two(surm.SurmConfig(structure="circulant", block_size=8),
                 surm.SurmConfig(structure="circulant", block_size=4), "bert")
    with pytest.raises(ValueError, match=r"adapters 'a' and 'b': they differ in block_size at .*query \(8 vs 4\)"):
        model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "mix")
    _assert_unchanged(model, "mix")
    qv = ["query", "value"]  # the 24 x 24 maps these factors fit
    model = _two(surm.SurmConfig(structure="kronecker", factors=((2, 4), (12, 6)), target_modules=qv),
                 surm.SurmConfig(structure="kronecker", factors=((4, 4), (6, 6)), target_modules=qv), "bert")
    factors = r"\(\(\(2, 4\), \(12, 6\)\) vs \(\(4, 4\), \(6, 6\)\)\)"
    with pytest.raises(ValueError, match=r"differ in factors at .*" + factors):
        model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "mix")
    _assert_unchanged(model, "mix")


def test_serial_nonlinear_adapters_are_refused():
    model = _two(surm.SurmConfig(structure="circulant", placement="serial", activation="identity",
                                 target_modules=["fc1"]),
                 surm.SurmConfig(structure="circulant", placement="serial", activation="gelu", target_modules=["fc1"]))
    with pytest.raises(ValueError, match=r"serial adapter 'b': its activation 'gelu' is not linear"):
        model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "mix")
    _assert_unchanged(model, "mix")


def test_combination_type_must_fit_the_family():
    model = _two(surm.SurmConfig(structure="kronecker", target_modules=["fc1"]),
                 surm.SurmConfig(structure="kronecker", target_modules=["fc1"]))
    with pytest.raises(ValueError, match=r"'kronecker' is bilinear.*combination_type='cat'"):
        model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "mix", combination_type="linear")
    with pytest.raises(ValueError, match="combination_type must be one of"):
        model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "mix", combination_type="svd")
    model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "mix", combination_type="cat")
    assert model.base_model.model.fc1.surm_matrix["mix"].terms == 2
    model = _two(surm.SurmConfig(structure="circulant", target_modules=["fc1"]),
                 surm.SurmConfig(structure="circulant", target_modules=["fc1"]))
    with pytest.raises(ValueError, match=r"'circulant' is linear in its parameter, so use combination_type='linear'"):
        model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "mix", combination_type="cat")
    _assert_unchanged(model, "mix")


@pytest.mark.parametrize(
    "args,match",
    [
        ((["a", "zzz"], [1.0, 1.0], "mix"), r"adapter 'zzz' does not exist"),
        ((["a", "b"], [1.0], "mix"), r"one number per adapter \(2\)"),
        ((["a", "b"], [1.0, float("nan")], "mix"), "finite numbers"),
        (([], [], "mix"), "non-empty list"),
        ((["a", "b"], [1.0, 1.0], "b"), "an adapter named 'b' already exists"),
    ],
)
def test_bad_arguments_are_refused(args, match):
    model = _two(surm.SurmConfig(structure="toeplitz", target_modules=["fc1"]),
                 surm.SurmConfig(structure="toeplitz", target_modules=["fc1"]))
    with pytest.raises(ValueError, match=match):
        model.add_weighted_adapter(*args)
    assert set(model.peft_config) == {"a", "b"}


def test_product_forms_are_refused_with_a_way_out():
    for structure in ("circulant_product", "toeplitz_product"):
        model = _two(surm.SurmConfig(structure=structure, target_modules=["query", "value"]),
                     surm.SurmConfig(structure=structure, target_modules=["query", "value"]), "bert")
        with pytest.raises(ValueError, match="cannot combine .*merge_and_unload"):
            model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "mix")
        _assert_unchanged(model, "mix")
