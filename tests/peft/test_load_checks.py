"""Loading a saved adapter: what the tensors are is checked against the config, and a failed
load leaves the model exactly as it was."""

import copy
import json

import peft
import pytest
import torch

import surm
from surm.peft import SurmLayer

from .test_lifecycle import train_steps
from .tiny_models import mlp


def _saved(tmp_path, **config):
    torch.manual_seed(0)
    base, _, run = mlp()
    model = peft.get_peft_model(base, surm.SurmConfig(target_modules=["fc1", "fc2"], **config))
    train_steps(model, run, steps=2)
    model.save_pretrained(tmp_path)
    return tmp_path


def _edit_config(path, **changes):
    file = path / "adapter_config.json"
    config = json.loads(file.read_text())
    config.update(changes)
    file.write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("saved", "edited", "saved_as", "built_as"),
    [
        ({"structure": "circulant"}, {"structure": "skew_circulant"},
         r"circulant\(block_size=None\)", r"skew_circulant\(block_size=None\)"),
        ({"structure": "skew_circulant"}, {"structure": "circulant"},
         r"skew_circulant\(block_size=None\)", r"circulant\(block_size=None\)"),
        ({"structure": "symmetric_toeplitz"}, {"structure": "circulant"}, "symmetric_toeplitz", "circulant"),
        ({"placement": "serial", "structure": "ldr"}, {"placement": "parallel"},
         r"ldr\(rank=1\) with placement='serial'", r"ldr\(rank=1\) with placement='parallel'"),
    ],
)
def test_config_naming_another_family_with_same_shapes_is_refused(tmp_path, saved, edited, saved_as, built_as):
    path = _saved(tmp_path, **saved)
    _edit_config(path, **edited)
    base = mlp()[0]
    with pytest.raises(ValueError, match=rf"fc1 were saved as {saved_as}.*config builds {built_as}"):
        peft.PeftModel.from_pretrained(base, path)
    assert not any(isinstance(m, SurmLayer) for m in base.modules())


def test_matching_config_still_loads_bit_identical(tmp_path):
    path = _saved(tmp_path, structure="kronecker", terms=2)
    torch.manual_seed(0)
    reference = peft.PeftModel.from_pretrained(mlp()[0], path)
    again = peft.PeftModel.from_pretrained(mlp()[0], path)
    adapter = {n: p for n, p in reference.named_parameters() if "surm_" in n}
    assert len(adapter) == 4  # kronecker A and B on two layers
    for name, p in again.named_parameters():
        if "surm_" in name:
            assert torch.equal(p, adapter[name]), name


def _snapshot(model):
    return {
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
        "types": {n: type(m) for n, m in model.named_modules()},
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "attributes": set(vars(model)),
    }


class _Wider(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(10, 16)
        self.fc2 = torch.nn.Linear(16, 9, bias=False)
        self.head = torch.nn.Linear(9, 3)


@pytest.mark.parametrize("failure", ["structure", "other base"])
def test_failed_load_leaves_the_model_exactly_as_it_was(tmp_path, failure):
    path = _saved(tmp_path, structure="circulant")
    if failure == "structure":
        _edit_config(path, structure="skew_circulant")
    base = (mlp()[0] if failure == "structure" else _Wider().double()).train()
    base.fc2.weight.requires_grad_(False)  # a user's own choice, to be kept
    before = _snapshot(base)
    with pytest.raises(ValueError, match="surm: the adapter"):
        peft.PeftModel.from_pretrained(base, path, is_trainable=True)
    after = _snapshot(base)
    assert after["requires_grad"] == before["requires_grad"]
    assert after["training"] == before["training"]
    assert after["types"] == before["types"]
    assert after["attributes"] == before["attributes"]
    assert all(torch.equal(v, before["state"][k]) for k, v in after["state"].items())
    assert after["state"].keys() == before["state"].keys()


def test_failed_load_of_a_second_adapter_keeps_the_first(tmp_path):
    path = _saved(tmp_path / "a", structure="circulant")
    _saved(tmp_path / "b", structure="toeplitz")
    _edit_config(tmp_path / "b", structure="circulant")
    model = peft.PeftModel.from_pretrained(mlp()[0], path)
    with pytest.raises(ValueError, match="saved as toeplitz"):
        model.load_adapter(tmp_path / "b", adapter_name="other")
    assert list(model.peft_config) == ["default"]
    assert all("other" not in n for n, _ in model.named_parameters())


def test_adapter_saved_without_signatures_loads_quietly_and_identically(tmp_path):
    import warnings

    from safetensors.torch import load_file, save_file

    path = _saved(tmp_path, structure="toeplitz")
    file = path / "adapter_model.safetensors"
    tensors = {k: v for k, v in load_file(file).items() if not k.endswith("surm_signature")}
    save_file(tensors, file, metadata={"format": "pt"})  # as adapters were saved before signatures
    torch.manual_seed(1)
    base = mlp()[0]
    x = torch.randn(3, 10, dtype=torch.float64)
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(base), _saved(tmp_path / "again", structure="toeplitz"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PEFT warns "Found missing adapter keys" for a missing tensor
        model = peft.PeftModel.from_pretrained(copy.deepcopy(base), path)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)


def test_config_with_another_alpha_than_the_weights_is_refused(tmp_path):
    path = _saved(tmp_path, structure="circulant", alpha=2.0)
    _edit_config(path, alpha=0.5)
    base = mlp()[0]
    with pytest.raises(ValueError, match=r"saved as circulant\(block_size=None\) with placement='parallel' and "
                                         r"alpha=2.0.*config builds .* and alpha=0.5"):
        peft.PeftModel.from_pretrained(base, path)
    assert not any(isinstance(m, SurmLayer) for m in base.modules())


def test_signature_saved_without_alpha_loads_at_the_configs_alpha(tmp_path):
    """Files saved before alpha was recorded: nothing to compare alpha with, so it loads."""
    from safetensors.torch import load_file, save_file

    from surm.peft.layer import decode_signature, encode_signature

    path = _saved(tmp_path, structure="circulant", alpha=2.0)
    weights = path / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    for key in [k for k in tensors if k.endswith("surm_signature")]:
        old = {k: v for k, v in decode_signature(tensors[key]).items() if k != "alpha"}
        tensors[key] = encode_signature(old)
    save_file(tensors, str(weights))
    model = peft.PeftModel.from_pretrained(mlp()[0], path)
    assert model.peft_config["default"].alpha == 2.0
