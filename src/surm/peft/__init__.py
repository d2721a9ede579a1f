"""SURM as a Hugging Face PEFT method (registered with PEFT on import)."""

from .config import ACTIVATIONS, PLACEMENTS, SURM, SurmConfig
from .distributed import adapter_tensors, broadcast_adapter_init
from .layer import SurmLayer
from .many_adapters import load_adapters
from .model import SurmModel
from .recommend import recommended_lr
from .registration import is_registered, register
from .scaling import SCALINGS, update_scale
from .targets import PARALLEL_TARGETS, SERIAL_TARGETS, default_targets

register()

__all__ = [
    "ACTIVATIONS",
    "PARALLEL_TARGETS",
    "PLACEMENTS",
    "SCALINGS",
    "SERIAL_TARGETS",
    "SURM",
    "SurmConfig",
    "SurmLayer",
    "SurmModel",
    "adapter_tensors",
    "broadcast_adapter_init",
    "default_targets",
    "is_registered",
    "load_adapters",
    "recommended_lr",
    "register",
    "update_scale",
]
