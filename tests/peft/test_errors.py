"""Bad input: a clear error, raised before the model is changed."""

import copy

import peft
import pytest
import torch
from torch import nn

import surm
from surm.peft import SurmLayer

from .tiny_models import bert, mlp


def _unchanged(model):
    return not any(isinstance(m, SurmLayer) for m in model.modules())


def test_no_target_matches_lists_the_names_that_exist():
    model = mlp()[0]
    with pytest.raises(ValueError, match=r"target_modules=\['q_proj'\] matched no module.*fc1, fc2, head"):
        peft.get_peft_model(model, surm.SurmConfig(target_modules=["q_proj"]))
    assert _unchanged(model)


def test_knob_that_does_not_fit_names_the_layer_and_shape():
    model = bert()[0]
    before = copy.deepcopy(model.state_dict())
    config = surm.SurmConfig(block_size=5, target_modules=["query", "intermediate.dense"])
    with pytest.raises(ValueError, match=r"cannot adapt bert\.encoder\.layer\.0\.attention\.self\.query "
                                         r"\(Linear 24->24.*block_size=5 must divide"):
        peft.get_peft_model(model, config)
    assert _unchanged(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_knob_failing_on_a_later_layer_changes_nothing():
    model = bert()[0]
    config = surm.SurmConfig(block_size=8, target_modules=["query", "intermediate.dense"],
                             knob_pattern={"intermediate.dense": {"block_size": 7}})
    with pytest.raises(ValueError, match=r"intermediate\.dense \(Linear 24->48.*block_size=7"):
        peft.get_peft_model(model, config)
    assert _unchanged(model)


def test_unsupported_layer_type():
    model = bert()[0]
    with pytest.raises(TypeError, match=r"cannot adapt bert\.embeddings\.word_embeddings: "
                                        r"Embedding layers are not supported"):
        peft.get_peft_model(model, surm.SurmConfig(target_modules=["word_embeddings"]))
    assert _unchanged(model)


def test_non_pointwise_conv():
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(TypeError, match=r"cannot adapt 0: Conv2d\(kernel_size=\(3, 3\).*not a pointwise convolution"):
        peft.get_peft_model(model, surm.SurmConfig(target_modules=["0"]))


def test_unknown_structure_and_bad_fields():
    with pytest.raises(ValueError, match="unknown structure 'circulent'; known structures: circulant"):
        surm.SurmConfig(structure="circulent")
    with pytest.raises(ValueError, match="'rank' is not a knob of structure 'circulant'; its knobs: block_size"):
        surm.SurmConfig(structure="circulant", rank=4)
    with pytest.raises(ValueError, match=r"'block_size' in knob_pattern\['fc1'\] is not a knob of structure 'ldr'"):
        surm.SurmConfig(structure="ldr", knob_pattern={"fc1": {"block_size": 4}})
    with pytest.raises(ValueError, match="placement must be one of"):
        surm.SurmConfig(placement="sequential")
    with pytest.raises(ValueError, match="activation must be one of"):
        surm.SurmConfig(activation="sigmoid")
    with pytest.raises(ValueError, match="dropout must be in"):
        surm.SurmConfig(dropout=1.5)


def test_loading_an_adapter_saved_for_another_base(tmp_path):
    torch.manual_seed(0)
    small, _, run = mlp()
    model = peft.get_peft_model(small, surm.SurmConfig(target_modules=["fc1", "fc2"]))
    model.save_pretrained(tmp_path)

    class Wider(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(10, 16)
            self.fc2 = nn.Linear(16, 9, bias=False)
            self.head = nn.Linear(9, 3)

    other = Wider().double()
    with pytest.raises(ValueError, match=r"does not fit this base model: checkpoint tensor "
                                         r"'base_model\.model\.fc1\.surm_matrix\.weight' "
                                         r"has shape \(1, 1, 12\).*\(1, 1, 16\)"):
        peft.PeftModel.from_pretrained(other, tmp_path)
    assert _unchanged(other)
