"""A 2nd and 3rd target_modules="all-linear" adapter on a model that already has a SURM one."""

import torch
from peft import get_peft_model

from surm.harness.models import tiny
from surm.peft import SurmConfig, SurmLayer


def _keys(model, adapter):
    return sorted(k.replace(f".{adapter}", ".X") for k in model.state_dict() if f".{adapter}" in k and "surm" in k)


def test_second_and_third_all_linear_adapter_cover_the_same_layers():
    torch.manual_seed(0)
    model = get_peft_model(tiny.model(), SurmConfig(target_modules="all-linear"))
    first = {name for name, module in model.named_modules() if isinstance(module, SurmLayer)}
    assert first and not any("lm_head" in name for name in first)
    model.add_adapter("b", SurmConfig(target_modules="all-linear"))
    model.add_adapter("c", SurmConfig(target_modules="all-linear"))
    assert {name for name, module in model.named_modules() if isinstance(module, SurmLayer)} == first
    assert set(model.peft_config) == {"default", "b", "c"}
    default_keys = _keys(model, "default")
    assert default_keys and _keys(model, "b") == default_keys == _keys(model, "c")
    for adapter in ("b", "c"):
        assert len(model.peft_config[adapter].target_modules) == len(first)
        assert not any("lm_head" in t for t in model.peft_config[adapter].target_modules)
