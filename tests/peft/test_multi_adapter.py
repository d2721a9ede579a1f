"""Several adapters on one model: each alone, several summed, deleting one."""

import copy

import peft
import pytest
import torch

import surm
from surm.peft import SurmLayer

from .test_lifecycle import train_steps
from .tiny_models import mlp


def _two_adapters(placement_b="parallel"):
    torch.manual_seed(0)
    base, _, run = mlp()
    pristine = copy.deepcopy(base)
    model = peft.get_peft_model(base, surm.SurmConfig(structure="circulant", target_modules=["fc1", "fc2"]),
                                adapter_name="a")
    train_steps(model, run)
    model.add_adapter("b", surm.SurmConfig(structure="toeplitz", target_modules=["fc1", "fc2"], placement=placement_b))
    model.set_adapter("b")
    train_steps(model, run)
    return model, pristine, run


@pytest.mark.parametrize("placement_b", ["parallel", "serial"])
def test_each_alone_and_both_summed(placement_b):
    model, pristine, run = _two_adapters(placement_b)
    base_out = run(pristine)
    with torch.no_grad():
        model.set_adapter("a")
        only_a = run(model)
        model.set_adapter("b")
        only_b = run(model)
        model.base_model.set_adapter(["a", "b"])
        both = run(model)
    assert not torch.allclose(only_a, only_b)

    # on a single linear layer the two parallel updates add up; check it layer by layer
    layer = model.base_model.model.fc1
    x = torch.randn(3, 10, dtype=torch.float64)
    with torch.no_grad():
        base_y = layer.base_layer(x)
        a = layer.surm_alpha["a"] * layer.surm_matrix["a"](x)
        h = base_y + a
        if placement_b == "parallel":
            expected = h + layer.surm_alpha["b"] * layer.surm_matrix["b"](x)
        else:  # serial adapters see the base output plus every parallel adapter
            expected = (h + torch.nn.functional.gelu(layer.surm_alpha["b"] * layer.surm_matrix["b"](h))
                        + layer.surm_bias_scale["b"] * layer.surm_bias["b"])
        torch.testing.assert_close(layer(x), expected)
    assert both.shape == base_out.shape


def test_both_active_merge_equals_unmerged():
    model, _, run = _two_adapters("parallel")
    model.base_model.set_adapter(["a", "b"])
    with torch.no_grad():
        both = run(model)
        merged = model.merge_and_unload(adapter_names=["a", "b"])
        torch.testing.assert_close(run(merged), both, rtol=1e-10, atol=1e-10)


def test_only_the_active_adapter_is_trainable():
    model, _, _ = _two_adapters()
    model.set_adapter("a")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".a." in n for n in trainable)


def test_delete_adapter():
    model, pristine, run = _two_adapters()
    with torch.no_grad():
        model.set_adapter("a")
        only_a = run(model)
        model.delete_adapter("b")
        assert all("b" not in m.surm_matrix for m in model.modules() if isinstance(m, SurmLayer))
        model.set_adapter("a")
        torch.testing.assert_close(run(model), only_a)
        model.delete_adapter("a")  # no adapter left: the wrapped model computes the base model
        torch.testing.assert_close(run(model.base_model.model), run(pristine))


def test_save_and_load_two_adapters(tmp_path):
    model, pristine, run = _two_adapters()
    with torch.no_grad():
        model.set_adapter("b")
        only_b = run(model)
    model.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(pristine), tmp_path / "b", adapter_name="b")
    with torch.no_grad():
        torch.testing.assert_close(run(loaded), only_b, rtol=0, atol=0)
    loaded.load_adapter(tmp_path / "a", adapter_name="a")
    loaded.set_adapter("a")
    model.set_adapter("a")
    with torch.no_grad():
        torch.testing.assert_close(run(loaded), run(model), rtol=0, atol=0)
