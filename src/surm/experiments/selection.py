"""Learning rates chosen on validation, the same way for every method.

Each method gets a grid of the same size around its default rate (``default * factor`` for
each factor), trained with the first seed; the rate with the best *validation* accuracy wins
(ties: the one nearest the default), and the other seeds train at that rate. The test split
plays no part in the choice. Methods named in ``at_default`` are also trained on every seed at
their default rate, to report the documented defaults as a user gets them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .runs import RunRecord, RunSpec
from .store import Runner

__all__ = ["Selection", "grid", "run_selected"]


def grid(default: float, factors: Sequence[float]) -> tuple[float, ...]:
    """``default * factor`` for each factor, to three significant digits (``3e-2 / 3`` is 0.01)."""
    return tuple(float(f"{default * f:.3g}") for f in factors)


@dataclass
class Selection:
    """``chosen``: ``{(dataset, method name): rate}``; ``sweep``: the first seed's runs over each
    grid; ``final``: every seed at the chosen rate; ``at_default``: every seed at the default rate
    (for the methods asked for)."""

    chosen: dict[tuple[str, str], float]
    defaults: dict[tuple[str, str], float]
    sweep: list[RunRecord]
    final: list[RunRecord]
    at_default: list[RunRecord]
    wall_seconds: float


def run_selected(runner: Runner, bases: Sequence[RunSpec], factors: Sequence[float], seeds: Sequence[int],
                 desc: str, threads: int | None = None, at_default: Sequence[str] = ()) -> Selection:
    """Choose each base spec's rate on validation over its grid, then train every seed at it.

    ``bases``: one spec per (data set, method) with ``lr=None`` and validation among its
    ``eval_splits``; ``at_default``: method names also trained on every seed at the default rate.
    """
    for b in bases:
        if b.lr is not None or "validation" not in b.eval_splits:
            raise ValueError(f"{b.slug}: a base spec takes lr=None and evaluates the validation split")
    sweep_specs = [b.replace(seed=seeds[0], lr=lr) for b in bases for lr in grid(b.effective_lr, factors)]
    sweep, wall_sweep = runner.run_all(sweep_specs, f"{desc} lr grid", threads)
    chosen, defaults = {}, {}
    for b in bases:
        key = (b.dataset, b.method.name)
        default = b.effective_lr
        mine = [r for r, s in zip(sweep, sweep_specs) if (s.dataset, s.method.name) == key]
        best = max(mine, key=lambda r: (r.validation["accuracy"], -abs(math.log(r.lr / default))))
        chosen[key], defaults[key] = best.lr, default
    final_specs = [b.replace(seed=s, lr=chosen[(b.dataset, b.method.name)]) for b in bases for s in seeds]
    default_specs = [b.replace(seed=s) for b in bases if b.method.name in at_default for s in seeds]
    records, wall_final = runner.run_all(final_specs + default_specs, f"{desc} seeds", threads)
    return Selection(chosen, defaults, sweep, records[: len(final_specs)], records[len(final_specs):],
                     wall_sweep + wall_final)
