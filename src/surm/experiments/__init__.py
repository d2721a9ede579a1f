"""The paper's experiments, scaled to a CPU, by name (``surm reproduce NAME``).

Each module in :data:`EXPERIMENTS` exposes ``run(out_dir: Path, preset: str = "full",
**overrides) -> dict`` with the presets ``"smoke"`` (seconds, for tests), ``"quick"`` and
``"full"``, and writes ``<name>.json``, ``<name>.md`` and PNG plots into ``out_dir``. Modules
are imported only when asked for (:func:`load`).
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
