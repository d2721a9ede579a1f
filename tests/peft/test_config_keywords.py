"""SurmConfig refuses knobs it would ignore and names SURM's knob for LoRA keywords."""

import pytest

from surm.peft import SurmConfig


@pytest.mark.parametrize(
    "key, value, names", [("r", 8, "rank="), ("lora_alpha", 16, "alpha="), ("lora_dropout", 0.1, "dropout=")]
)
def test_lora_keyword_names_surm_knob(key, value, names):
    with pytest.raises(TypeError, match=names):
        SurmConfig(**{key: value})


@pytest.mark.parametrize("activation", ["relu", "silu", "tanh"])
def test_activation_with_parallel_placement_is_refused(activation):
    with pytest.raises(ValueError, match="only applies to placement='serial'"):
        SurmConfig(placement="parallel", activation=activation)
    assert SurmConfig(placement="serial", activation=activation).activation == activation


def test_parallel_keeps_default_and_identity():
    assert SurmConfig(placement="parallel", activation="identity").activation == "identity"


def test_defaults_still_build():
    assert SurmConfig().placement == "parallel"
    assert SurmConfig(rank=4, structure="low_rank", alpha=2.0, dropout=0.1).rank == 4
