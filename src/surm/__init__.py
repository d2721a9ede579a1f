"""surm: structured unrestricted-rank matrices for parameter-efficient fine-tuning.

``import surm`` registers SURM with Hugging Face PEFT, so that ``peft.get_peft_model(model,
surm.SurmConfig(...))`` and ``peft.PeftModel.from_pretrained`` work. It does so without
importing PEFT or torch itself: the registration happens when PEFT is imported (at once, if it
already is), and ``surm.SurmConfig``, ``surm.SurmModel``, ``surm.plan`` (the planner,
:func:`surm.analysis.plan.plan`), ``surm.recommended_lr`` (:mod:`surm.peft.recommend`) and
``surm.structured`` are imported on first use. So
``import surm`` (and ``surm --help``) stays instant.
"""

from _surm_peft_hook import register_when_peft_is_imported

from ._version import __version__

__all__ = ["SurmConfig", "SurmModel", "__version__", "plan", "recommended_lr", "structured"]

register_when_peft_is_imported()


def __getattr__(name: str):
    import importlib

    if name in ("SurmConfig", "SurmModel"):
        return getattr(importlib.import_module("surm.peft"), name)
    if name == "recommended_lr":
        return importlib.import_module("surm.peft.recommend").recommended_lr
    if name == "plan":
        return importlib.import_module("surm.analysis.plan").plan
    if name in ("peft", "structured"):
        return importlib.import_module(f"surm.{name}")
    raise AttributeError(f"module 'surm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__, "peft"})
