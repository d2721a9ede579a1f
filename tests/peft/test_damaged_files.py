"""Adapter files that are damaged or were converted by a tool: each load ends in a clear error
and leaves the base model exactly as it was (module tree, state dict, requires_grad)."""

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

import surm
from surm.peft import SurmLayer

from .tiny_models import mlp


def _saved(tmp_path, **config):
    torch.manual_seed(0)
    base = mlp()[0]
    model = peft.get_peft_model(base, surm.SurmConfig(target_modules=["fc1", "fc2"], **config))
    model.save_pretrained(tmp_path)
    return tmp_path


def _rewrite(path, edit):
    file = path / "adapter_model.safetensors"
    save_file(edit(load_file(file)), file)


def _snapshot(model):
    return (
        [(name, type(m)) for name, m in model.named_modules()],
        {k: v.clone() for k, v in model.state_dict().items()},
        {k: p.requires_grad for k, p in model.named_parameters()},
    )


def _assert_unchanged(model, before):
    modules, state, grads = _snapshot(model)
    assert modules == before[0]
    assert state.keys() == before[1].keys()
    assert all(torch.equal(state[k], before[1][k]) for k in state)
    assert grads == before[2]
    assert not any(isinstance(m, SurmLayer) for m in model.modules())


def _cast_all(sd):
    return {k: v.half() for k, v in sd.items()}


def _signatures_int64(sd):
    return {k: v.long() if k.endswith("surm_signature") else v for k, v in sd.items()}


def _signatures_garbled(sd):
    return {k: torch.full_like(v, 0xFF) if k.endswith("surm_signature") else v for k, v in sd.items()}


def _signatures_not_json(sd):
    return {k: torch.tensor(list(b"not json"), dtype=torch.uint8) if k.endswith("surm_signature") else v
            for k, v in sd.items()}


def _signatures_wrong_json(sd):
    return {k: torch.tensor(list(b"[1, 2]"), dtype=torch.uint8) if k.endswith("surm_signature") else v
            for k, v in sd.items()}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_cast_all, r"signature is a torch\.float16 tensor.*cast every tensor.*Repair"),
        (_signatures_int64, r"signature is a torch\.int64 tensor.*cast every tensor"),
        (_signatures_garbled, r"signature does not hold JSON text.*damaged"),
        (_signatures_not_json, r"signature does not hold JSON text"),
        (_signatures_wrong_json, r"signature is not a SURM signature"),
    ],
)
def test_damaged_signature_is_refused_and_the_model_is_restored(tmp_path, edit, message):
    path = _saved(tmp_path)
    _rewrite(path, edit)
    base = mlp()[0]
    before = _snapshot(base)
    with pytest.raises(ValueError, match=message):
        peft.PeftModel.from_pretrained(base, path)
    _assert_unchanged(base, before)


def test_casting_only_float_tensors_still_loads(tmp_path):
    path = _saved(tmp_path)
    _rewrite(path, lambda sd: {k: v.double() if v.is_floating_point() else v for k, v in sd.items()})
    model = peft.PeftModel.from_pretrained(mlp()[0], path)
    assert isinstance(model.base_model.model.fc1, SurmLayer)


def test_load_adapters_refuses_a_damaged_signature(tmp_path):
    good = _saved(tmp_path / "good")
    bad = _saved(tmp_path / "bad")
    _rewrite(bad, _cast_all)
    model = peft.PeftModel.from_pretrained(mlp()[0], good)
    with pytest.raises(ValueError, match="cast every tensor"):
        surm.peft.load_adapters(model, {"other": bad})
    assert list(model.peft_config) == ["default"]
