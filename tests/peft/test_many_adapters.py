"""``load_adapters``: many saved adapters onto one base in one pass, equal to PEFT's own load."""

import json

import peft
import pytest
import torch

import surm
from surm.peft import SurmLayer, load_adapters

from .tiny_models import llama

IDS = torch.randint(0, 64, (3, 6), generator=torch.Generator().manual_seed(0))


def _save(folder, config, seed):
    torch.manual_seed(seed)
    base, _, _ = llama()
    model = peft.get_peft_model(base, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "surm_" in name:
                p.normal_(0, 0.3)
    model.save_pretrained(folder)
    return folder


@pytest.fixture
def saved(tmp_path):
    circ = surm.SurmConfig(structure="circulant", task_type="CAUSAL_LM")
    folders = {f"user{i}": _save(tmp_path / f"user{i}", circ, seed=i) for i in range(4)}
    folders["serial"] = _save(tmp_path / "serial", surm.SurmConfig(structure="toeplitz", placement="serial",
                                                                    task_type="CAUSAL_LM"), seed=7)
    folders["mlp"] = _save(tmp_path / "mlp", surm.SurmConfig(structure="kronecker", target_modules=["down_proj"],
                                                              task_type="CAUSAL_LM"), seed=8)
    return folders


def _base():
    torch.manual_seed(100)
    return llama()[0]


def _logits(model, name):
    model.set_adapter(name)
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_equals_peft_load_adapter_one_by_one(saved):
    first, *rest = saved
    fast = peft.PeftModel.from_pretrained(_base(), saved[first], adapter_name=first).eval()
    assert load_adapters(fast, {name: saved[name] for name in rest}) == rest
    slow = peft.PeftModel.from_pretrained(_base(), saved[first], adapter_name=first).eval()
    for name in rest:
        slow.load_adapter(saved[name], adapter_name=name)
    assert sorted(fast.peft_config) == sorted(slow.peft_config)
    grads = {n: p.requires_grad for n, p in fast.named_parameters()}
    assert grads == {n: p.requires_grad for n, p in slow.named_parameters()}
    assert not any(grads.values())
    for name in saved:
        torch.testing.assert_close(_logits(fast, name), _logits(slow, name), rtol=0, atol=0)


def test_mixed_batch_over_loaded_adapters(saved):
    first, *rest = saved
    model = peft.PeftModel.from_pretrained(_base(), saved[first], adapter_name=first).eval()
    load_adapters(model, {name: saved[name] for name in rest})
    adapter_names = ["serial", "user3", "mlp"]
    with torch.no_grad():
        mixed = model(input_ids=IDS, adapter_names=adapter_names).logits
    alone = torch.cat([_logits(model, name)[row : row + 1] for row, name in enumerate(adapter_names)])
    torch.testing.assert_close(mixed, alone, rtol=1e-9, atol=1e-9)


def _edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("changes, message", [
    ({"structure": "skew_circulant"}, "were saved as"),
    ({"block_size": 4}, "were saved as"),
    ({"block_size": 8}, "must divide"),
])
def test_a_config_that_does_not_describe_its_weights_fails_and_changes_nothing(saved, changes, message):
    model = peft.PeftModel.from_pretrained(_base(), saved["user0"], adapter_name="user0").eval()
    load_adapters(model, {"user1": saved["user1"]})
    before = {name: _logits(model, name) for name in ("user0", "user1")}
    _edit_config(saved["user2"], **changes)
    with pytest.raises(ValueError, match=message) as err:
        load_adapters(model, {"user2": saved["user2"], "user3": saved["user3"]})
    assert "user2" in str(err.value)
    assert sorted(model.peft_config) == ["user0", "user1"]
    assert all("user2" not in m.surm_matrix for m in model.modules() if isinstance(m, SurmLayer))
    for name, logits in before.items():
        torch.testing.assert_close(_logits(model, name), logits, rtol=0, atol=0)


def test_names_already_loaded_are_refused(saved):
    model = peft.PeftModel.from_pretrained(_base(), saved["user0"], adapter_name="user0")
    with pytest.raises(ValueError, match="already has adapter"):
        load_adapters(model, {"user0": saved["user1"]})


def test_a_plain_model_is_refused(saved):
    with pytest.raises(TypeError, match="PeftModel with a SURM adapter"):
        load_adapters(_base(), {"a": saved["user0"]})


def test_deleting_one_adapter_leaves_the_others(saved):
    first, *rest = saved
    model = peft.PeftModel.from_pretrained(_base(), saved[first], adapter_name=first).eval()
    load_adapters(model, {name: saved[name] for name in rest})
    before = {name: _logits(model, name) for name in saved if name != "user2"}
    model.delete_adapter("user2")
    for name, logits in before.items():
        torch.testing.assert_close(_logits(model, name), logits, rtol=0, atol=0)


def test_a_file_without_signatures_is_checked_by_shape(saved):
    from safetensors.torch import load_file, save_file

    path = saved["user2"] / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(str(path)).items() if not k.endswith("surm_signature")}, str(path))
    model = peft.PeftModel.from_pretrained(_base(), saved["user0"], adapter_name="user0").eval()
    load_adapters(model, {"user2": saved["user2"]})  # as saved before signatures were recorded: loads
    _edit_config(saved["user2"], block_size=4)
    with pytest.raises(ValueError, match="has shape"):
        load_adapters(model, {"user2b": saved["user2"]})
    assert sorted(model.peft_config) == ["user0", "user2"]


def test_a_file_whose_signatures_lack_alpha_loads(saved):
    from safetensors.torch import load_file, save_file

    from surm.peft.layer import decode_signature, encode_signature

    path = saved["user2"] / "adapter_model.safetensors"
    tensors = load_file(str(path))
    for key in [k for k in tensors if k.endswith("surm_signature")]:
        tensors[key] = encode_signature({k: v for k, v in decode_signature(tensors[key]).items() if k != "alpha"})
    save_file(tensors, str(path))
    fast = peft.PeftModel.from_pretrained(_base(), saved["user0"], adapter_name="user0").eval()
    load_adapters(fast, {"user2": saved["user2"]})
    slow = peft.PeftModel.from_pretrained(_base(), saved["user0"], adapter_name="user0").eval()
    slow.load_adapter(saved["user2"], adapter_name="user2")
    torch.testing.assert_close(_logits(fast, "user2"), _logits(slow, "user2"), rtol=0, atol=0)
