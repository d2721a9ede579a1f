"""Mixed-adapter batches: ``adapter_names=[...]``, each row through its own adapter.

The reference is each adapter run alone (``set_adapter``) on its rows, in float64."""

import peft
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import surm
from surm import structured
from surm.peft import SurmLayer

from .tiny_models import llama, mlp

NAMES = ["a", "b", "c"]


class OneLayer(nn.Module):
    """One adaptable layer of each supported kind, 24 -> 16 features (rectangular)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.layer = {"linear": nn.Linear(24, 16), "conv1d": Conv1D(16, 24), "conv2d": nn.Conv2d(24, 16, 1)}[kind]

    def forward(self, x):
        return self.layer(x)

    def example(self, rows: int) -> torch.Tensor:
        shape = (rows, 24, 3, 2) if self.kind == "conv2d" else (rows, 5, 24)
        return torch.randn(shape, dtype=torch.float64)


def _randomize(model: nn.Module) -> None:
    """Every adapter tensor (matrices and serial biases) drawn at random: a zero init would hide
    a wrong gather."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "surm_" in name:
                p.normal_(0, 0.3)


def _with_adapters(base: nn.Module, configs: dict) -> peft.PeftModel:
    names = list(configs)
    model = peft.get_peft_model(base, configs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, configs[name])
    _randomize(model)
    return model.eval()


def _each_alone(model: peft.PeftModel, run, adapter_names: list[str], rows_of) -> torch.Tensor:
    """Row b of the output with adapter ``adapter_names[b]`` set active alone (the base model for
    ``"__base__"``)."""
    out = []
    for row, name in enumerate(adapter_names):
        if name == "__base__":
            with model.disable_adapter():
                out.append(run(rows_of(row)))
        else:
            model.set_adapter(name)
            out.append(run(rows_of(row)))
    return torch.cat(out)


def _assert_mixed_equals_alone(model: peft.PeftModel, x: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
    """``model(x, adapter_names=...)`` equals each row run alone through its adapter (float64)."""
    with torch.no_grad():
        mixed = model(x, adapter_names=adapter_names)
        alone = _each_alone(model, model, adapter_names, lambda row: x[row : row + 1])
    torch.testing.assert_close(mixed, alone, rtol=1e-10, atol=1e-10)
    return alone


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d"])
@pytest.mark.parametrize("placement", ["parallel", "serial"])
@pytest.mark.parametrize("family", structured.names())
def test_mixed_batch_equals_each_adapter_alone(family, placement, kind):
    torch.manual_seed(0)
    config = dict(structure=family, target_modules=["layer"], placement=placement)
    if placement == "serial":
        config["activation"] = "tanh"
    model = _with_adapters(OneLayer(kind).double(), {n: surm.SurmConfig(**config) for n in NAMES})
    x = model.base_model.model.example(6)
    adapter_names = ["b", "a", "__base__", "c", "b", "a"]
    alone = _assert_mixed_equals_alone(model, x, adapter_names)
    assert not torch.allclose(alone[0], alone[1])  # the adapters differ: a wrong gather would show


def test_mixed_families_and_placements_in_one_layer():
    """Adapters of different families and placements share a batch: one gathered pass per layout."""
    torch.manual_seed(1)
    configs = {
        "circ": surm.SurmConfig(structure="circulant", target_modules=["layer"]),
        "toep": surm.SurmConfig(structure="toeplitz", target_modules=["layer"], placement="serial"),
        "lowr": surm.SurmConfig(structure="low_rank", rank=2, target_modules=["layer"], placement="serial"),
        "kron": surm.SurmConfig(structure="kronecker", target_modules=["layer"]),
    }
    model = _with_adapters(OneLayer("linear").double(), configs)
    x = model.base_model.model.example(5)
    adapter_names = ["lowr", "circ", "kron", "toep", "circ"]
    _assert_mixed_equals_alone(model, x, adapter_names)


def test_many_distinct_adapters_one_batch():
    torch.manual_seed(2)
    names = [f"user{i}" for i in range(9)]
    config = surm.SurmConfig(structure="circulant", block_size=8, target_modules=["layer"])
    model = _with_adapters(OneLayer("linear").double(), {n: config for n in names})
    x = model.base_model.model.example(12)
    adapter_names = [names[i % 9] for i in (3, 0, 8, 5, 5, 1, 2, 7, 6, 4, 0, 3)]
    _assert_mixed_equals_alone(model, x, adapter_names)


def _llama_with_adapters():
    torch.manual_seed(3)
    base, inputs, _ = llama()
    configs = {
        "a": surm.SurmConfig(structure="circulant", task_type="CAUSAL_LM"),
        "b": surm.SurmConfig(structure="toeplitz", placement="serial", task_type="CAUSAL_LM"),
        "c": surm.SurmConfig(structure="low_rank", rank=2, target_modules=["q_proj", "v_proj", "down_proj"],
                             task_type="CAUSAL_LM"),
    }
    return _with_adapters(base, configs), inputs


def test_causal_lm_forward_and_generate():
    model, _ = _llama_with_adapters()
    ids = torch.randint(0, 64, (4, 6))
    adapter_names = ["c", "__base__", "a", "b"]
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=adapter_names).logits
        alone = _each_alone(model, lambda i: model(input_ids=i).logits, adapter_names, lambda row: ids[row : row + 1])
        torch.testing.assert_close(mixed, alone, rtol=1e-9, atol=1e-9)
        kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
        generated = model.generate(input_ids=ids, adapter_names=adapter_names, **kwargs)
        one_by_one = _each_alone(
            model, lambda i: model.generate(input_ids=i, **kwargs), adapter_names, lambda row: ids[row : row + 1]
        )
    assert torch.equal(generated, one_by_one)
    assert not torch.equal(one_by_one[0], one_by_one[1]) or not torch.equal(one_by_one[2], one_by_one[3])


def test_generate_with_beam_search_repeats_names_per_beam():
    model, _ = _llama_with_adapters()
    ids = torch.randint(0, 64, (2, 5))
    adapter_names = ["b", "a"]
    kwargs = dict(max_new_tokens=3, do_sample=False, num_beams=2, pad_token_id=0)
    with torch.no_grad():
        generated = model.generate(input_ids=ids, adapter_names=adapter_names, **kwargs)
        one_by_one = _each_alone(
            model, lambda i: model.generate(input_ids=i, **kwargs), adapter_names, lambda row: ids[row : row + 1]
        )
    assert torch.equal(generated, one_by_one)


def test_modules_to_save_follow_the_rows():
    torch.manual_seed(4)
    base, _, _ = mlp()
    configs = {n: surm.SurmConfig(structure="circulant", target_modules=["fc1", "fc2"], modules_to_save=["head"])
               for n in NAMES}
    model = _with_adapters(base, configs)
    for i, name in enumerate(NAMES):  # a different head per adapter
        with torch.no_grad():
            model.base_model.model.head.modules_to_save[name].weight.add_(float(i + 1))
    x = torch.randn(4, 10, dtype=torch.float64)
    adapter_names = ["c", "a", "__base__", "b"]
    _assert_mixed_equals_alone(model, x, adapter_names)


def test_an_adapter_on_fewer_layers_leaves_the_others_to_the_base():
    torch.manual_seed(5)
    base, _, _ = mlp()
    configs = {"both": surm.SurmConfig(structure="toeplitz", target_modules=["fc1", "fc2"]),
               "fc1": surm.SurmConfig(structure="circulant", target_modules=["fc1"])}
    model = _with_adapters(base, configs)
    x = torch.randn(3, 10, dtype=torch.float64)
    adapter_names = ["fc1", "both", "fc1"]
    _assert_mixed_equals_alone(model, x, adapter_names)


@pytest.fixture
def two_adapter_mlp():
    torch.manual_seed(6)
    base, _, _ = mlp()
    config = surm.SurmConfig(structure="circulant", target_modules=["fc1", "fc2"])
    return _with_adapters(base, {"a": config, "b": config}), torch.randn(3, 10, dtype=torch.float64)


def test_unknown_adapter_names_are_refused(two_adapter_mlp):
    model, x = two_adapter_mlp
    with pytest.raises(ValueError, match="Trying to infer with non-existing adapter\\(s\\): nope, zz"):
        model(x, adapter_names=["a", "zz", "nope"])


def test_wrong_length_is_refused(two_adapter_mlp):
    model, x = two_adapter_mlp
    message = "Length of `adapter_names` should be the same as the number of inputs, but got 2 and 3"
    with pytest.raises(ValueError, match=message):
        model(x, adapter_names=["a", "b"])


def test_training_mode_is_refused(two_adapter_mlp):
    model, x = two_adapter_mlp
    model.train()
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when the model is in training mode"):
        model(x, adapter_names=["a", "b", "a"])


def test_merged_adapters_are_refused(two_adapter_mlp):
    model, x = two_adapter_mlp
    model.merge_adapter()
    with pytest.raises(ValueError, match="please call `unmerge_adapter` first"):
        model(x, adapter_names=["a", "b", "a"])
    model.unmerge_adapter()
    model(x, adapter_names=["a", "b", "a"])


def test_a_string_is_not_a_list_of_names(two_adapter_mlp):
    model, x = two_adapter_mlp
    with pytest.raises(TypeError, match="list of adapter names"):
        model(x, adapter_names="abc")


def test_hooks_are_removed_after_the_call(two_adapter_mlp):
    model, x = two_adapter_mlp
    with torch.no_grad():
        model(x, adapter_names=["b", "b", "b"])
        model.set_adapter("a")
        after = model(x)
        model.set_adapter("b")
        only_b = model(x)
    layers = [m for m in model.modules() if isinstance(m, SurmLayer)]
    assert all(not m._forward_pre_hooks for m in layers)
    assert not torch.allclose(after, only_b)  # the active adapter runs again, not the last mix


def test_disabled_adapters_give_the_base_output(two_adapter_mlp):
    model, x = two_adapter_mlp
    with torch.no_grad(), model.disable_adapter():
        base = model(x)
    layer = model.base_model.model.fc1
    with torch.no_grad():
        layer.enable_adapters(False)
        out = layer(x, adapter_names=["a", "b", "a"])
        layer.enable_adapters(True)
    torch.testing.assert_close(out, layer.base_layer(x))
    assert base.shape == (3, 3)


def test_weights_changed_between_calls_are_seen(two_adapter_mlp):
    """Gathered tensors live for one call only: a second call after an edit uses the new weights."""
    model, x = two_adapter_mlp
    adapter_names = ["a", "b", "a"]
    names_list = list(adapter_names)
    with torch.no_grad():
        first = model(x, adapter_names=names_list)
        for name, p in model.named_parameters():
            if "surm_matrix.b" in name:
                p.mul_(-2.0)
        second = model(x, adapter_names=names_list)
        alone = _each_alone(model, model, adapter_names, lambda row: x[row : row + 1])
    torch.testing.assert_close(second, alone, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(first[1], second[1])
    layer = model.base_model.model.fc1
    with torch.no_grad():
        direct = layer(x, adapter_names=names_list)
        for name, p in layer.named_parameters():
            if "surm_matrix.a" in name:
                p.mul_(3.0)
        again = layer(x, adapter_names=names_list)
    assert not torch.allclose(direct[0], again[0])
