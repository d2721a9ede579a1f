"""The learning rate to train a SURM adapter with: :func:`recommended_lr`.

With ``scaling="width"`` (the default) one rate serves every family, knob and layer width of a
placement, because the scale makes one Adam step move every update alike
(:mod:`surm.peft.scaling`); serial adapters take a larger one than parallel ones.
It was chosen on validation splits (MiniLM on three text data
sets, AdamW, linear schedule with warm-up, batch 16; docs/results.md). Adapters with
``scaling="none"`` (alpha alone) keep the per-family rates swept before the scale existed.
"""

from __future__ import annotations

from .config import SurmConfig

#: AdamW rate of every parallel SURM adapter with scaling="width".
WIDTH_SCALED_LR = 3e-2
#: ... and of every serial one: a serial adapter sits in the residual stream behind a
#: nonlinearity, and on Rotten Tomatoes (10 %, 64 steps, validation) it wanted about 5x the
#: parallel rate (circulant: 67.6 / 75.4 / 72.4 % at 0.09 / 0.15 / 0.3; 60-63 % at 0.01-0.03).
WIDTH_SCALED_SERIAL_LR = 1e-1
#: Rates for scaling="none" (alpha alone), per placement, swept before the scale existed.
UNSCALED_LR = {"parallel": 5e-3, "serial": 3e-3}
_SWEPT_UNSCALED = ("circulant", "skew_circulant", "toeplitz", "symmetric_toeplitz", "low_rank")


def recommended_lr(config: SurmConfig) -> float:
    """The AdamW learning rate for ``config`` (batch 16 or so, a linear schedule with warm-up).

    A new classification head trained beside the adapter (``modules_to_save``) takes the same
    rate. Chosen on linear layers: on 1x1 convolutions followed by BatchNorm (EfficientNet-Lite0)
    every family did best on validation at a third of it or less, so start there on a CNN.
    ``alpha`` is a multiplier on the update, not on the rate: under Adam, doubling
    ``alpha`` doubles every step of the update, as doubling the rate would.
    """
    if not isinstance(config, SurmConfig):
        raise TypeError(f"recommended_lr takes a surm.SurmConfig, got {type(config).__name__}; "
                        f"for LoRA and the other PEFT methods see surm.harness.methods.default_lr")
    if config.scaling == "width":
        return WIDTH_SCALED_SERIAL_LR if config.placement == "serial" else WIDTH_SCALED_LR
    if config.structure not in _SWEPT_UNSCALED or config.structure_pattern:
        raise ValueError(
            f"recommended_lr: no rate for scaling='none' with {config.structure!r} or per-module structures: "
            f"the rates without the scale were swept for {', '.join(_SWEPT_UNSCALED)} (Kronecker and LDR now "
            f"start their random factor at unit variance, which that sweep did not see); use scaling='width' "
            f"(the default)")
    return UNSCALED_LR[config.placement]
