"""surm.recommended_lr: one rate for every width-scaled config; the swept rates without the scale."""

import pytest

import surm
from surm import structured
from surm.peft.recommend import UNSCALED_LR, WIDTH_SCALED_LR, WIDTH_SCALED_SERIAL_LR


@pytest.mark.parametrize("structure", structured.names())
@pytest.mark.parametrize("placement", ["parallel", "serial"])
def test_one_rate_per_placement_for_every_width_scaled_config(structure, placement):
    rate = WIDTH_SCALED_SERIAL_LR if placement == "serial" else WIDTH_SCALED_LR
    assert surm.recommended_lr(surm.SurmConfig(structure=structure, placement=placement)) == rate
    assert surm.recommended_lr(surm.SurmConfig(structure=structure, placement=placement, alpha=4.0)) == rate


def test_unscaled_configs_keep_the_rates_swept_for_them():
    assert surm.recommended_lr(surm.SurmConfig(structure="toeplitz", scaling="none")) == UNSCALED_LR["parallel"]
    assert surm.recommended_lr(surm.SurmConfig(placement="serial", scaling="none")) == UNSCALED_LR["serial"]
    for structure in ("kronecker", "ldr", "circulant_product", "toeplitz_product"):
        with pytest.raises(ValueError, match="unit variance"):
            surm.recommended_lr(surm.SurmConfig(structure=structure, scaling="none"))


def test_other_configs_are_refused_with_a_pointer():
    import peft

    with pytest.raises(TypeError, match="surm.harness.methods.default_lr"):
        surm.recommended_lr(peft.LoraConfig(r=8))
