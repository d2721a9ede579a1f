"""Register SURM with PEFT as soon as PEFT is imported, without importing PEFT ourselves.

``import surm`` promises that ``peft.PeftModel.from_pretrained`` knows SURM afterwards, but
importing PEFT (and with it torch and transformers) takes seconds, which the command line
(``surm --help``) must not pay. So ``import surm`` imports :mod:`surm.peft` (which registers
SURM) right away only when PEFT is already imported; otherwise it puts a finder on
``sys.meta_path`` that imports :mod:`surm.peft` right after PEFT's own ``__init__`` has run.
Whoever uses PEFT has imported it, so the registration is always in place when it is needed.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any


def register_when_peft_is_imported() -> None:
    """Import :mod:`surm.peft` now if ``peft`` is imported, else right after it is."""
    if "peft" in sys.modules:
        _register()
    elif not any(isinstance(finder, _AfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport("peft", lambda _module: _register_from_hook()))


def _register() -> None:
    importlib.import_module("surm.peft")  # registers SURM with PEFT on import


def _register_from_hook() -> None:
    """Registration run from inside the user's ``import peft``: a failure (an unsupported PEFT
    version, say) must not break that import; it is reported as a warning instead."""
    try:
        _register()
    except Exception as err:  # noqa: BLE001 - anything, so as not to break the user's import
        import warnings

        warnings.warn(f"surm could not register SURM with PEFT: {err!r}; `import surm.peft` shows why", stacklevel=2)


class _AfterImport:
    """Runs ``callback(module)`` once, right after module ``name`` has been executed; finds
    nothing itself (the other finders on ``sys.meta_path`` do) and then removes itself.
    A meta path finder by protocol (``find_spec``); ``importlib.abc`` costs an import."""

    def __init__(self, name: str, callback: Callable[[ModuleType], Any]):
        self.name = name
        self.callback = callback

    def find_spec(self, fullname: str, path: Any = None, target: ModuleType | None = None):
        if fullname != self.name:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _ThenCall(spec.loader, self)
        return spec


class _ThenCall:
    """A loader that executes the module with ``loader`` and then calls ``after.callback``."""

    def __init__(self, loader: Any, after: _AfterImport):
        self.loader = loader
        self.after = after

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        # the module keeps its own loader (importlib.resources and reloads ask it)
        module.__loader__ = module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        if self.after in sys.meta_path:
            sys.meta_path.remove(self.after)
        self.after.callback(module)

    def __getattr__(self, name: str) -> Any:  # get_resource_reader, is_package, ...
        return getattr(self.loader, name)
