"""Make SURM a PEFT method: the one place that touches PEFT's registries.

PEFT (0.21) finds a method through four dicts keyed by the PEFT type: config class, tuner
class, state-dict prefix (and mixed-model class, unused here). ``peft.utils.register_peft_method``
only accepts members of the ``PeftType`` enum, which cannot be extended, so we fill the dicts
directly with the string-like tag ``SURM`` (see :class:`surm.peft.config.SurmPeftType`).
Saved configs carry ``"peft_type": "SURM"``; PEFT looks that string up in the same dicts, so
``PeftConfig.from_pretrained`` and ``PeftModel.from_pretrained`` work after ``import surm``.
"""

from __future__ import annotations

from .config import SURM, SurmConfig
from .model import SurmModel


def register() -> None:
    """Register SURM with PEFT (idempotent)."""
    from peft import mapping

    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[SURM] = SurmConfig
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[SURM] = SurmModel
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[SURM] = SurmModel.prefix


def is_registered() -> bool:
    from peft import mapping

    return mapping.PEFT_TYPE_TO_TUNER_MAPPING.get(SURM) is SurmModel
