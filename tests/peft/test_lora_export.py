"""Exporting parallel SURM adapters to LoRA with PEFT's convert_to_lora / save_as_lora."""

import copy
import warnings

import peft
import pytest
import torch
from peft.tuners.lora.conversion import convert_to_lora, save_as_lora

import surm
from surm.peft import SurmLayer, lora_export

from .test_lifecycle import STRUCTURES
from .tiny_models import MODELS

# PEFT factorises dW with a float32 SVD, so "exact" means float32 precision even in float64
EXPORT_TOL = 1e-5


def _random_adapter(model_name, structure="circulant", knobs=None, placement="parallel", **extra):
    """A float64 tiny model with a SURM adapter whose parameters are all random (dW != 0)."""
    factory, par, ser, mts = MODELS[model_name]
    torch.manual_seed(0)
    base, _, run = factory()
    pristine = copy.deepcopy(base)
    targets = ser if placement == "serial" else par
    config = surm.SurmConfig(structure=structure, placement=placement, target_modules=targets, modules_to_save=mts,
                             init="random", **(knobs or {}), **extra)
    model = peft.get_peft_model(base, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "surm_" in name:
                p.normal_(0.0, 0.3)
    return model, pristine, run


def _relative_gap(lora, model, pristine, run):
    """|lora output - SURM output| relative to the SURM adapter's effect on the output."""
    with torch.no_grad():
        y, y0, y_lora = run(model), run(pristine), run(lora)
    return float((y_lora - y).norm() / (y - y0).norm())


@pytest.mark.parametrize("structure,knobs", STRUCTURES, ids=[s for s, _ in STRUCTURES])
def test_exact_at_full_rank_every_family(structure, knobs, tmp_path):
    """BERT's query/value are 24x24: rank 24 is full in every layer. The LoRA checkpoint,
    loaded on the pristine model (with the trained classifier of modules_to_save), gives the
    SURM model's logits."""
    model, pristine, run = _random_adapter("bert", structure, knobs)
    assert model.supports_lora_conversion()
    save_as_lora(tmp_path, model, rank=24)
    lora = peft.PeftModel.from_pretrained(copy.deepcopy(pristine), tmp_path)
    assert isinstance(lora.base_model, peft.LoraModel) and lora.peft_config["default"].r == 24
    assert _relative_gap(lora, model, pristine, run) < EXPORT_TOL


def test_exact_on_conv1d_layers(tmp_path):
    """GPT-2's c_attn is a Conv1D 24 -> 72 whose weight is stored transposed (in, out)."""
    model, pristine, run = _random_adapter("gpt2", "toeplitz")
    save_as_lora(tmp_path, model, rank=24)
    lora = peft.PeftModel.from_pretrained(copy.deepcopy(pristine), tmp_path)
    assert _relative_gap(lora, model, pristine, run) < EXPORT_TOL


def test_energy_threshold_rank(tmp_path):
    """A float rank keeps that share of the energy per layer: 1.0 is exact here (layers of
    different shapes, 12x10 and 9x12, where no single integer rank is full for both)."""
    model, pristine, run = _random_adapter("mlp", "toeplitz")
    save_as_lora(tmp_path / "full", model, rank=1.0)
    lora = peft.PeftModel.from_pretrained(copy.deepcopy(pristine), tmp_path / "full")
    assert lora.peft_config["default"].rank_pattern == {"fc1": 10, "fc2": 9}
    assert _relative_gap(lora, model, pristine, run) < EXPORT_TOL
    config, _ = lora_export.convert_to_lora(model, 0.5)
    assert all(r < 9 for r in config.rank_pattern.values())
    assert max(lora_export.export_errors(model, 0.5).values()) > 0.1


def test_error_decreases_with_rank():
    model, _, _ = _random_adapter("bert", "circulant")
    errors = []
    for rank in (1, 4, 8, 16, 24):
        per_layer = lora_export.export_errors(model, rank)
        assert len(per_layer) == 12  # the six maps of 2 blocks
        errors.append(max(per_layer.values()))
    assert errors[0] > 0.5  # a rank-1 LoRA cannot hold a full-rank circulant
    assert all(a > b for a, b in zip(errors, errors[1:]))
    assert errors[-1] < EXPORT_TOL


def test_low_rank_adapter_is_exact_at_its_own_rank():
    model, _, _ = _random_adapter("bert", "low_rank", {"rank": 3})
    assert max(lora_export.export_errors(model, 3).values()) < EXPORT_TOL
    assert min(lora_export.export_errors(model, 2).values()) > 0.01


def test_convert_to_lora_state_dict_keys_and_shapes():
    model, _, _ = _random_adapter("gpt2", "circulant")
    config, state_dict = convert_to_lora(model, 5)
    assert isinstance(config, peft.LoraConfig) and config.r == 5 and config.lora_alpha == 5
    A = state_dict["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"]
    B = state_dict["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
    assert A.shape == (5, 24) and B.shape == (72, 5)  # Linear orientation, as LoRA stores Conv1D
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    assert layer.get_delta_weight("default").shape == (24, 72)  # Conv1D layout (in, out)


def test_serial_adapters_are_refused_with_the_reason():
    model, _, _ = _random_adapter("mlp", placement="serial", activation="identity")
    with pytest.warns(UserWarning, match="serial"):
        assert not model.supports_lora_conversion()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(TypeError, match="do not support LoRA conversion"):
            convert_to_lora(model, 4)
    assert any("is serial" in str(w.message) and "cannot be converted to LoRA" in str(w.message) for w in caught)
    with pytest.raises(ValueError, match=r"fc1: surm: adapter 'default' is serial") as err:
        lora_export.convert_to_lora(model, 4)
    assert "fc2" in str(err.value) and "Only parallel adapters convert" in str(err.value)


def test_mixed_parallel_and_serial_adapters():
    """The parallel adapter of a model that also holds a serial one converts on its own."""
    model, pristine, run = _random_adapter("mlp")
    model.add_adapter("ser", surm.SurmConfig(structure="circulant", placement="serial", target_modules=["fc1", "fc2"]))
    _, state_dict = lora_export.convert_to_lora(model, 1.0, adapter_name="default")
    assert any(k.endswith("fc1.lora_A.weight") for k in state_dict)
    with pytest.raises(ValueError, match="'ser' is serial"):
        lora_export.convert_to_lora(model, 1.0, adapter_name="ser")


def test_conv2d_layers_are_refused():
    model, _, _ = _random_adapter("cnn")
    with pytest.raises(ValueError, match="1x1 Conv2d"):
        lora_export.save_as_lora("unused", model, 4)
    with pytest.warns(UserWarning, match="Conv2d"), pytest.raises(TypeError):
        convert_to_lora(model, 4)


def test_adapter_missing_from_a_layer_is_refused():
    model, _, _ = _random_adapter("mlp")
    model.add_adapter("only_fc1", surm.SurmConfig(structure="circulant", target_modules=["fc1"]))
    with pytest.raises(ValueError, match=r"fc2: surm: this layer has no adapter 'only_fc1'"):
        lora_export.convert_to_lora(model, 2, adapter_name="only_fc1")


def test_delta_weight_layout_matches_the_base_weight():
    for model_name in ("mlp", "gpt2", "cnn"):
        model, _, _ = _random_adapter(model_name)
        for layer in (m for m in model.modules() if isinstance(m, SurmLayer)):
            delta = layer.get_delta_weight("default")
            weight = layer.get_base_layer().weight
            assert delta.shape == weight.shape and delta.dtype == weight.dtype


@pytest.mark.parametrize("bias", ["all", "surm_only"])
def test_trained_biases_are_refused_before_peft_is_called(bias):
    model, _, _ = _random_adapter("mlp", bias=bias)
    with pytest.raises(ValueError, match=rf"bias='{bias}'.*a LoRA adapter cannot hold them"):
        lora_export.convert_to_lora(model, 4)
