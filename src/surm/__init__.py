"""surm: structured unrestricted-rank matrices for parameter-efficient fine-tuning.

``import surm`` registers SURM with Hugging Face PEFT, so that ``peft.get_peft_model(model,
surm.SurmConfig(...))`` and ``peft.PeftModel.from_pretrained`` work.
"""

__version__ = "0.1.0"

from . import structured  # noqa: E402
from .peft import SurmConfig, SurmModel  # noqa: E402

__all__ = ["SurmConfig", "SurmModel", "__version__", "structured"]
