"""The paper's experiments, scaled to a CPU, by name (``surm reproduce NAME``).

Every experiment is a module with the same three things:

* a preset type, a frozen dataclass derived from :class:`~surm.experiments.presets.Preset`
  whose fields are the settings (typed, with help text);
* ``PRESETS``: its instances by name, at least ``"smoke"`` (seconds, for tests), ``"quick"``
  (minutes; what ``surm reproduce NAME`` runs) and ``"full"`` (the documented run);
* ``run(config, out_dir, runner) -> report.Outcome``, which makes its runs through ``runner``
  (a :class:`~surm.harness.runs.Runner`: run store, retraining, progress bars) and
  writes ``<name>.json``, ``<name>.md`` and PNG plots into ``out_dir``.

The shared parts: :mod:`.runs` (one fine-tuning run), :mod:`.store` (the run store and the
runner), :mod:`.provenance` (the code version in the store's keys), :mod:`.presets`,
:mod:`.report` (means, tables, outputs) and :mod:`.plots`. Modules are imported only when
asked for (:func:`load`).
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: experiment name -> module path
EXPERIMENTS: dict[str, str] = {
    "pinwheel": "surm.experiments.pinwheel",
    "nlp": "surm.experiments.nlp",
    "vision": "surm.experiments.vision",
    "lowres": "surm.experiments.lowres",
    "cka": "surm.experiments.cka",
    "lr_sweep": "surm.experiments.lr_sweep",
    "plan": "surm.experiments.plan",
    "llm": "surm.experiments.llm",
}

__all__ = ["EXPERIMENTS", "load", "names"]


def names() -> list[str]:
    """The experiment names."""
    return list(EXPERIMENTS)


def load(name: str) -> ModuleType:
    """The module of experiment ``name``; ValueError listing the known names otherwise."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; known: {', '.join(EXPERIMENTS)}")
    return importlib.import_module(EXPERIMENTS[name])
