"""Register SURM with PEFT the moment PEFT is imported, without importing PEFT ourselves.

PEFT has no plug-in entry point: it knows a method only once something has filled its
registries (:mod:`surm.peft.registration`). Importing PEFT (and with it torch and transformers)
takes seconds, which ``import surm`` and ``surm --help`` must not pay. So this module puts a
finder on ``sys.meta_path`` that imports :mod:`surm.peft` (which registers SURM) right after
PEFT's own ``__init__`` has run, or imports it at once when PEFT is already imported.

Two things arm it:

- ``import surm`` (its ``__init__`` calls :func:`register_when_peft_is_imported`);
- the file ``surm-peft-hook.pth`` that the package installs into ``site-packages``: Python's
  ``site`` runs its one line at every interpreter start-up, so ``PeftModel.from_pretrained`` and
  ``AutoPeftModelForCausalLM.from_pretrained`` load a SURM adapter in a program that never
  imports surm. Setting the environment variable ``SURM_NO_PEFT_HOOK=1`` turns that off.

The start-up line imports nothing: it puts a finder of its own, :data:`STARTUP_FINDER`, on
``sys.meta_path`` that answers only for ``peft`` and then hands over to :func:`find_peft` here.
This module is top-level, not part of the ``surm`` package, and uses only ``sys``, so that
handing over imports neither the package nor anything else before PEFT itself.
"""

import sys

__all__ = ["STARTUP_FINDER", "find_peft", "register_when_peft_is_imported"]

#: The class name of the finder that ``surm-peft-hook.pth`` puts on ``sys.meta_path``.
STARTUP_FINDER = "SurmPeftStartupHook"


def register_when_peft_is_imported():
    """Import :mod:`surm.peft` now if ``peft`` is imported, else right after it is."""
    _remove_startup_finder()
    if "peft" in sys.modules:
        _register()
    elif not any(isinstance(finder, _AfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _after_peft())


def find_peft(fullname, path=None, target=None):
    """What the start-up finder does when ``peft`` is imported: the module spec of ``peft``,
    whose loader registers SURM right after PEFT's ``__init__`` has run (the start-up finder is
    taken off ``sys.meta_path``: it is needed once)."""
    _remove_startup_finder()
    return _after_peft().find_spec(fullname, path, target)


def _after_peft():
    return _AfterImport("peft", lambda _module: _register_from_hook())


def _remove_startup_finder():
    sys.meta_path[:] = [finder for finder in sys.meta_path if type(finder).__name__ != STARTUP_FINDER]


def _register():
    __import__("surm.peft")  # registers SURM with PEFT on import


def _register_from_hook():
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
    A meta path finder by protocol (``find_spec``); ``importlib.abc`` would cost an import."""

    def __init__(self, name, callback):
        self.name = name
        self.callback = callback

    def find_spec(self, fullname, path=None, target=None):
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

    def __init__(self, loader, after):
        self.loader = loader
        self.after = after

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        # the module keeps its own loader (importlib.resources and reloads ask it)
        module.__loader__ = module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        if self.after in sys.meta_path:
            sys.meta_path.remove(self.after)
        self.after.callback(module)

    def __getattr__(self, name):  # get_resource_reader, is_package, ...
        return getattr(self.loader, name)
