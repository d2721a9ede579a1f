"""The PEFT life cycle on every kind of model: identity at init, training only SURM parameters,
merge/unmerge, save/load."""

import copy

import peft
import pytest
import torch
from transformers.pytorch_utils import Conv1D

import surm
from surm.peft import SurmLayer

from .tiny_models import MODELS

STRUCTURES = [
    ("circulant", {}),
    ("toeplitz", {}),
    ("kronecker", {}),
    ("ldr", {"rank": 2}),
    ("low_rank", {"rank": 2}),
    ("symmetric_toeplitz", {}),
    ("skew_circulant", {}),
]


def make(model_name, placement, structure="circulant", knobs=None, **extra):
    factory, par, ser, mts = MODELS[model_name]
    torch.manual_seed(0)
    base, inputs, run = factory()
    targets = ser if placement == "serial" else par
    config = surm.SurmConfig(
        structure=structure, placement=placement, target_modules=targets, modules_to_save=mts,
        **(knobs or {}), **extra
    )
    return base, run, config


def train_steps(model, run, steps=3, lr=0.05):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        out = run(model)
        out.pow(2).mean().backward() if out.dtype.is_floating_point else None
        opt.step()
    model.eval()


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("placement", ["parallel", "serial"])
@pytest.mark.parametrize("structure,knobs", STRUCTURES[:5], ids=[s for s, _ in STRUCTURES[:5]])
def test_identity_at_init(model_name, placement, structure, knobs):
    base, run, config = make(model_name, placement, structure, knobs)
    expected = run(base)
    model = peft.get_peft_model(base, config)
    assert any(isinstance(m, SurmLayer) for m in model.modules())
    assert torch.equal(run(model), expected)


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("placement", ["parallel", "serial"])
def test_train_merge_unmerge_save_load(model_name, placement, tmp_path):
    structure = "circulant"
    base, run, config = make(model_name, placement, structure, activation="identity")
    pristine = copy.deepcopy(base)
    model = peft.get_peft_model(base, config)

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(("surm_" in n) or ("modules_to_save" in n) for n in trainable)
    train_steps(model, run)
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "surm_matrix" in n)

    with torch.no_grad():
        unmerged = run(model)
        assert not torch.allclose(unmerged, run(pristine))
        model.merge_adapter()
        torch.testing.assert_close(run(model), unmerged, rtol=1e-10, atol=1e-10)
        model.unmerge_adapter()
        torch.testing.assert_close(run(model), unmerged, rtol=1e-10, atol=1e-10)

    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists()
    fresh = peft.PeftModel.from_pretrained(copy.deepcopy(pristine), tmp_path)
    with torch.no_grad():
        assert torch.equal(run(fresh), unmerged)
        merged = fresh.merge_and_unload()
        assert not any(isinstance(m, SurmLayer) for m in merged.modules())
        torch.testing.assert_close(run(merged), unmerged, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("structure,knobs", STRUCTURES, ids=[s for s, _ in STRUCTURES])
@pytest.mark.parametrize("placement", ["parallel", "serial"])
def test_every_structure_merges_on_rectangular_layers(structure, knobs, placement):
    base, run, config = make("mlp", placement, structure, knobs, activation="identity")
    model = peft.get_peft_model(base, config)
    train_steps(model, run)
    with torch.no_grad():
        unmerged = run(model)
        merged = model.merge_and_unload()
        torch.testing.assert_close(run(merged), unmerged, rtol=1e-10, atol=1e-10)


def test_unload_and_disable_adapter_give_the_base_model():
    base, run, config = make("bert", "parallel")
    expected = run(copy.deepcopy(base))
    model = peft.get_peft_model(base, config)
    train_steps(model, run)
    with torch.no_grad():
        assert not torch.allclose(run(model), expected)
        with model.disable_adapter():
            torch.testing.assert_close(run(model), expected, rtol=0, atol=0)
        assert not torch.allclose(run(model), expected)
        model.merge_adapter()
        with model.disable_adapter():  # a merged adapter is unmerged when disabled
            torch.testing.assert_close(run(model), expected, rtol=1e-10, atol=1e-10)
    unloaded = model.unload()
    assert not any(isinstance(m, SurmLayer) for m in unloaded.modules())


def expected_trainable(model, config):
    """SURM parameters from the families' formulas, summed over the adapted layers."""
    from tests.structured.test_params_and_init import expected_params

    total = 0
    for module in model.modules():
        if isinstance(module, SurmLayer):
            m, n = module.adapter_shape(config.placement)
            total += expected_params(config.structure, m, n, config.knobs())
            if config.placement == "serial":
                total += m + (config.rank if config.structure == "low_rank" else 0)
    return total


@pytest.mark.parametrize("model_name", ["bert", "gpt2", "cnn"])
@pytest.mark.parametrize("placement", ["parallel", "serial"])
@pytest.mark.parametrize("structure,knobs", [("circulant", {}), ("low_rank", {"rank": 4}), ("toeplitz", {})])
def test_print_trainable_parameters_matches_formula(model_name, placement, structure, knobs, capsys):
    base, run, config = make(model_name, placement, structure, knobs)
    config.modules_to_save = None
    model = peft.get_peft_model(base, config)
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == expected_trainable(model, config)
    model.print_trainable_parameters()
    assert f"trainable params: {trainable:,}" in capsys.readouterr().out


def test_modules_to_save_are_trained_and_saved(tmp_path):
    base, run, config = make("bert", "parallel")
    model = peft.get_peft_model(base, config)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("classifier.modules_to_save" in n for n in names)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert any("classifier" in k for k in keys) and any("surm_matrix" in k for k in keys)
    assert not any("base_layer" in k for k in keys)


def test_layers_to_transform_and_exclude_modules():
    base, run, config = make("bert", "parallel")
    config.layers_to_transform = [1]
    model = peft.get_peft_model(base, config)
    adapted = [n for n, m in model.named_modules() if isinstance(m, SurmLayer)]
    assert adapted and all(".layer.1." in n for n in adapted)

    base, run, config = make("bert", "parallel")
    config.exclude_modules = ["bert.encoder.layer.0.attention.self.query"]
    model = peft.get_peft_model(base, config)
    adapted = [n for n, m in model.named_modules() if isinstance(m, SurmLayer)]
    # the default targets: six maps in each of 2 blocks, less the one excluded
    assert len(adapted) == 11 and not any("layer.0.attention.self.query" in n for n in adapted)


def test_knob_pattern_overrides_per_module():
    base, run, config = make("mlp", "parallel", "circulant", {"block_size": 2}, knob_pattern={"fc2": {"block_size": 3}})
    model = peft.get_peft_model(base, config)
    layers = {n.rsplit(".", 1)[-1]: m for n, m in model.named_modules() if isinstance(m, SurmLayer)}
    assert layers["fc1"].surm_matrix["default"].block_size == 2
    assert layers["fc2"].surm_matrix["default"].block_size == 3


def test_default_targets_per_model_type():
    # parallel: every linear map of each block (the last two parts of the name say which)
    every_map = [
        ("bert", {"self.query", "self.key", "self.value", "output.dense", "intermediate.dense"}),
        ("gpt2", {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}),
        ("llama", {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                   "mlp.up_proj", "mlp.down_proj"}),
        ("vit", {"attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj", "mlp.fc1", "mlp.fc2"}),
    ]
    for name, expected in every_map:
        factory = MODELS[name][0]
        base = factory()[0]
        n_linear = sum(isinstance(m, (torch.nn.Linear, Conv1D)) for m in base.modules())
        model = peft.get_peft_model(base, surm.SurmConfig())
        layers = [n for n, m in model.named_modules() if isinstance(m, SurmLayer)]
        assert {".".join(n.split(".")[-2:]) for n in layers} == expected, name
        per_block = {"bert": 6, "gpt2": 4, "llama": 7, "vit": 6}[name]  # BERT's two output.dense maps
        assert len(layers) == per_block * 2 < n_linear, name  # 2 blocks; heads and poolers stay
    model = peft.get_peft_model(MODELS["bert"][0]()[0], surm.SurmConfig(placement="serial"))
    adapted = sorted(n.split("encoder.")[1] for n, m in model.named_modules() if isinstance(m, SurmLayer))
    assert adapted == ["layer.0.attention.output.dense", "layer.0.output.dense",
                       "layer.1.attention.output.dense", "layer.1.output.dense"]
