"""A saved adapter is checked against the model before any module is replaced: a file that
cannot fit is refused with no SurmLayer built, and when a later step fails the model (module
tree, state dict, requires_grad) is put back exactly, for a first adapter and for one more."""

import json

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import surm
from surm.peft import SurmLayer, SurmModel

from .tiny_models import mlp


def _saved(path, **config):
    torch.manual_seed(0)
    model = peft.get_peft_model(mlp()[0], surm.SurmConfig(**{"target_modules": ["fc1", "fc2"], **config}))
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p)  # not the zero start: a load that did not happen would show
    model.save_pretrained(path)
    return path


def _edit_config(path, **changes):
    file = path / "adapter_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


def _edit_weights(path, edit):
    file = path / "adapter_model.safetensors"
    save_file(edit(load_file(file)), file)


def _snapshot(model):
    return {
        "modules": [(name, type(m)) for name, m in model.named_modules()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "requires_grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "attributes": set(vars(model)),
    }


def _assert_unchanged(model, before):
    after = _snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(v, before["state"][k]) for k, v in after["state"].items())
    assert after["requires_grad"] == before["requires_grad"]
    assert after["attributes"] == before["attributes"]


@pytest.fixture
def replacements(monkeypatch):
    """Counts the modules PEFT asks SURM to wrap or extend."""
    calls = []
    original = SurmModel._create_and_replace

    def counting(self, *args, **kwargs):
        calls.append(kwargs.get("current_key"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SurmModel, "_create_and_replace", counting)
    return calls


class _WiderHead(nn.Module):
    """The MLP with a head of 5 outputs instead of 3 (fc1 and fc2 as in the MLP)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(10, 12), nn.Linear(12, 9, bias=False), nn.Linear(9, 5)


def _wider_fc1():
    model = mlp()[0]
    model.fc1 = nn.Linear(10, 16, dtype=torch.float64)
    model.fc2 = nn.Linear(16, 9, bias=False, dtype=torch.float64)
    return model


def _plain():
    return mlp()[0]


def _no_weights(path):
    (path / "adapter_model.safetensors").unlink()


def _truncated(path):
    file = path / "adapter_model.safetensors"
    file.write_bytes(file.read_bytes()[:-9])


def _matrix_as_int(path):
    _edit_weights(path, lambda sd: {k: v.long() if "surm_matrix" in k else v for k, v in sd.items()})


def _tensor_dropped(path):
    _edit_weights(path, lambda sd: {k: v for k, v in sd.items() if not k.startswith("base_model.model.fc2.surm_m")})


FILE_CASES = {
    "structure edited": (lambda p: _edit_config(p, structure="skew_circulant"), _plain,
                         r"fc1 were saved as circulant\(block_size=None\).*config builds skew_circulant"),
    "alpha edited": (lambda p: _edit_config(p, alpha=3.0), _plain, r"saved as .*alpha=1.0.*config builds .*alpha=3.0"),
    "other base": (lambda p: None, _wider_fc1, r"fc1.surm_matrix.weight' has shape \(1, 1, 12\) but the config "
                                               r"builds \(1, 1, 16\)"),
    "fewer targets": (lambda p: _edit_config(p, target_modules=["fc1"]), _plain,
                      r"fc2.surm_matrix.weight' has no counterpart in this model"),
    "more targets": (lambda p: _edit_config(p, target_modules=["fc1", "fc2", "head"], modules_to_save=None), _plain,
                     r"config builds 'base_model.model.head.surm_matrix.weight', which the file does not hold"),
    "tensor dropped": (_tensor_dropped, _plain, r"fc2.surm_matrix.weight', which the file does not hold"),
    "no weights file": (_no_weights, _plain, r"has adapter_config.json but no adapter_model.safetensors"),
    "truncated file": (_truncated, _plain, r"is not a readable safetensors file .*truncated"),
    "integer matrix": (_matrix_as_int, _plain, r"fc1.surm_matrix.weight' is stored as torch.int64.*floating point"),
    "head of another size": (lambda p: None, lambda: _WiderHead().double(),
                             r"head.bias' has shape \(3,\) but the model's head.bias has shape \(5,\)"),
}


@pytest.mark.parametrize("case", FILE_CASES)
def test_a_file_that_cannot_fit_is_refused_before_any_module_is_replaced(tmp_path, replacements, case):
    edit, make_base, message = FILE_CASES[case]
    path = _saved(tmp_path, modules_to_save=["head"])
    edit(path)
    replacements.clear()
    base = make_base()
    before = _snapshot(base)
    with pytest.raises(ValueError, match=message):
        peft.PeftModel.from_pretrained(base, path)
    assert replacements == []
    _assert_unchanged(base, before)


def test_the_same_file_loads_when_nothing_was_edited(tmp_path, replacements):
    path = _saved(tmp_path, modules_to_save=["head"])
    replacements.clear()
    model = peft.PeftModel.from_pretrained(mlp()[0], path)
    saved = load_file(path / "adapter_model.safetensors")
    assert replacements == ["fc1", "fc2"]
    assert torch.equal(model.base_model.model.fc1.surm_matrix["default"].weight,
                       saved["base_model.model.fc1.surm_matrix.weight"])


def test_the_load_restores_the_model_when_the_file_is_not_checked_first(tmp_path):
    """A config passed in (not read from the folder) skips the file check: the load's own check
    refuses the weights after the layers were wrapped, and the model is put back."""
    path = _saved(tmp_path)
    base = mlp()[0].train()
    base.fc2.weight.requires_grad_(False)
    before = _snapshot(base)
    config = surm.SurmConfig(target_modules=["fc1", "fc2"], structure="skew_circulant")
    with pytest.raises(ValueError, match="saved as circulant"):
        peft.PeftModel.from_pretrained(base, path, config=config, is_trainable=True)
    _assert_unchanged(base, before)


def test_a_config_read_from_a_folder_starts_a_new_adapter_on_another_model(tmp_path):
    """get_peft_model with a saved config is a new adapter, not a load: its folder is not checked."""
    path = _saved(tmp_path)
    config = surm.SurmConfig.from_pretrained(path)
    model = peft.get_peft_model(_wider_fc1(), config)
    assert model.base_model.model.fc1.surm_matrix["default"].weight.shape == (1, 1, 16)


# -- a second adapter that targets other modules ------------------------------------------------------------------
def _two_adapters(tmp_path, edit):
    first = _saved(tmp_path / "a")
    second = _saved(tmp_path / "b", target_modules=["fc1", "head"], structure="toeplitz")
    edit(second)
    model = peft.PeftModel.from_pretrained(mlp()[0], first)
    return model, second


@pytest.mark.parametrize(("edit", "message"), [
    (lambda p: _edit_config(p, structure="circulant"), "saved as toeplitz"),
    (_truncated, "not a readable safetensors file"),
])
def test_a_failing_second_adapter_leaves_no_wrapper_behind(tmp_path, edit, message):
    model, second = _two_adapters(tmp_path, edit)
    before = _snapshot(model)
    with pytest.raises(ValueError, match=message):
        model.load_adapter(second, adapter_name="b")
    _assert_unchanged(model, before)
    assert type(model.base_model.model.head) is nn.Linear
    assert list(model.peft_config) == ["default"]


def test_a_second_adapter_failing_after_injection_is_taken_out_entirely(tmp_path):
    """Added first (nothing to check it against), then loaded from a file it does not fit: the
    load's own check fails after head was wrapped, and the wrapper goes again."""
    model, second = _two_adapters(tmp_path, lambda p: None)
    before = _snapshot(model)
    model.add_adapter("b", surm.SurmConfig(target_modules=["fc1", "head"], structure="circulant"))
    assert isinstance(model.base_model.model.head, SurmLayer)
    with pytest.raises(ValueError, match="saved as toeplitz"):
        model.load_adapter(second, adapter_name="b")
    _assert_unchanged(model, before)
    assert list(model.peft_config) == ["default"]


def test_an_injection_that_fails_halfway_is_undone(tmp_path, monkeypatch):
    model, _ = _two_adapters(tmp_path, lambda p: None)
    before = _snapshot(model)
    original = SurmLayer.__init__

    def fails_on_head(self, base_layer, *args, **kwargs):
        if base_layer.out_features == 3:
            raise RuntimeError("simulated failure while wrapping head")
        original(self, base_layer, *args, **kwargs)

    monkeypatch.setattr(SurmLayer, "__init__", fails_on_head)
    with pytest.raises(RuntimeError, match="simulated failure"):
        model.add_adapter("b", surm.SurmConfig(target_modules=["fc1", "head"]))
    _assert_unchanged(model, before)
    assert all("b" not in m.surm_matrix for m in model.modules() if isinstance(m, SurmLayer))


@pytest.mark.parametrize("name", ["../x", "a/b", "", "a.b", "__base__"])
def test_a_path_like_adapter_name_is_refused(tmp_path, name):
    path = _saved(tmp_path)
    base = mlp()[0]
    before = _snapshot(base)
    with pytest.raises(ValueError, match=r"adapter name .* cannot be used.*non-empty string without '\.', '/'"):
        peft.PeftModel.from_pretrained(base, path, adapter_name=name)
    _assert_unchanged(base, before)
    model = peft.PeftModel.from_pretrained(base, path)
    before = _snapshot(model)
    with pytest.raises(ValueError, match="cannot be used"):
        model.load_adapter(path, adapter_name=name)
    with pytest.raises(ValueError, match="cannot be used"):
        surm.peft.load_adapters(model, {name: path})
    _assert_unchanged(model, before)


def test_a_config_read_from_one_folder_and_given_to_the_load_of_another_is_not_checked_against_the_first(tmp_path):
    """config= read from folder a (whose weights are truncated), weights from folder b: the load
    reads b, so a's file is not what is checked."""
    good = _saved(tmp_path / "b")
    other = _saved(tmp_path / "a")
    _truncated(other)
    model = peft.PeftModel.from_pretrained(mlp()[0], good, config=surm.SurmConfig.from_pretrained(other))
    saved = load_file(good / "adapter_model.safetensors")
    assert torch.equal(model.base_model.model.fc1.surm_matrix["default"].weight,
                       saved["base_model.model.fc1.surm_matrix.weight"])


def test_a_subfolder_is_checked_before_any_module_is_replaced(tmp_path, replacements):
    _saved(tmp_path / "adapters" / "one")
    _edit_config(tmp_path / "adapters" / "one", structure="toeplitz")
    replacements.clear()
    base = mlp()[0]
    with pytest.raises(ValueError, match="saved as circulant"):
        peft.PeftModel.from_pretrained(base, tmp_path / "adapters", subfolder="one")
    assert replacements == []


def test_a_second_adapter_with_modules_to_save_failing_after_injection_leaves_the_first_s_head(tmp_path):
    first = _saved(tmp_path / "a", modules_to_save=["head"])
    second = _saved(tmp_path / "b", modules_to_save=["head"], structure="toeplitz")
    model = peft.PeftModel.from_pretrained(mlp()[0], first)
    before = _snapshot(model)
    model.add_adapter("b", surm.SurmConfig(target_modules=["fc1", "fc2"], modules_to_save=["head"]))
    assert "b" in model.base_model.model.head.modules_to_save
    with pytest.raises(ValueError, match="saved as toeplitz"):
        model.load_adapter(second, adapter_name="b")
    _assert_unchanged(model, before)
    assert list(model.base_model.model.head.modules_to_save) == ["default"]
