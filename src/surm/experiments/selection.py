"""Learning rates chosen on validation, the same way for every method.

Each method gets a grid of the same size around its default rate (``default * factor`` for
each factor), trained with the first seed; the rate with the best *validation* score wins
(accuracy for classifiers, minus the loss for causal LMs; ties: the rate nearest the default),
and the other seeds train at that rate. The test split plays no part in the choice. Settings
named in ``at_default`` are also trained on every seed at their default rate, to report the
documented defaults as a user gets them.

:func:`choose` is the one entry every experiment goes through; a rate is chosen per *setting*
(:func:`run_selected`: the spec field ``group``, the data set by default or the training
fraction in the low-resource experiment, and the method; the planner experiment: data set,
budget and variant).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from surm.harness.runs import Runner, RunRecord, RunSpec

from . import plots, report

__all__ = ["AT_DEFAULT", "Selection", "choose", "grid", "grid_table", "rows", "run_selected", "sensitivity_plot",
           "validation_accuracy", "validation_loss"]

#: the label suffix of the rows trained at the default rate (``at_default``)
AT_DEFAULT = " at its default rate"


def grid(default: float, factors: Sequence[float]) -> tuple[float, ...]:
    """``default * factor`` for each factor, to three significant digits (``3e-2 / 3`` is 0.01)."""
    return tuple(float(f"{default * f:.3g}") for f in factors)


def validation_accuracy(record: RunRecord) -> float:
    """A classifier's score for the choice: its validation accuracy."""
    return record.validation["accuracy"]


def validation_loss(record: RunRecord) -> float:
    """A causal LM's score for the choice: minus its validation loss (higher is better)."""
    return -record.validation["loss"]


@dataclass
class Selection:
    """``chosen``: ``{setting: rate}``, a setting a key such as ``(data set, method name)``;
    ``defaults``: each setting's default rate; ``sweep``: the first seed's runs over each grid;
    ``final``: every seed at the chosen rate; ``at_default``: every seed at the default rate
    (for the settings asked for); ``factors``: the grid's factors over each default;
    ``owners``: the setting of each sweep run (by run key)."""

    chosen: dict[tuple, float]
    defaults: dict[tuple, float]
    sweep: list[RunRecord]
    final: list[RunRecord]
    at_default: list[RunRecord]
    wall_seconds: float
    group: str = "dataset"
    factors: tuple[float, ...] = ()
    owners: dict[str, tuple] = field(default_factory=dict)

    def key(self, spec: RunSpec) -> tuple:
        """``(group value, method name)`` of ``spec``: the setting key of :func:`run_selected`."""
        return getattr(spec, self.group), spec.method.name

    def payload(self) -> dict:
        """The JSON fields of an experiment's report: each chosen rate beside its default, and the
        grid's runs."""
        chosen = [{self.group: key[0], "method": key[1], "lr": lr, "default": self.defaults[key]}
                  if len(key) == 2 else {"setting": list(key), "lr": lr, "default": self.defaults[key]}
                  for key, lr in self.chosen.items()]
        return {"lr_chosen": chosen, "lr_grid_runs": self.sweep}

    def grid_runs(self, key: tuple) -> list[RunRecord]:
        """The first seed's runs over ``key``'s grid, by rate."""
        return sorted((r for r in self.sweep if self.owners.get(r.spec.key) == key), key=lambda r: r.lr)


def choose(runner: Runner, settings: dict[tuple, Sequence[RunSpec]], factors: Sequence[float], desc: str,
           threads: int | None = None, score: Callable[[RunRecord], float] = validation_accuracy,
           at_default: Sequence[tuple] = ()) -> Selection:
    """The one rate-selection entry: each setting's rate chosen on validation over its grid,
    then every seed trained at it.

    ``settings`` maps a setting's key to its runs, one per seed (the first seed's is the one
    swept; each spec's ``lr`` is its default, None or given); ``score`` ranks a run (higher is
    better; ties: the rate nearest the default); ``at_default``: settings also trained on every
    seed at their default rate. Every run must evaluate the validation split.
    """
    for runs in settings.values():
        for s in runs:
            if "validation" not in s.eval_splits:
                raise ValueError(f"{s.slug}: rates are chosen on validation; the run must evaluate it")
    sweep_specs, owners = [], {}
    for key, runs in settings.items():
        for lr in grid(runs[0].effective_lr, factors):
            sweep_specs.append(runs[0].replace(lr=lr))
            owners[sweep_specs[-1].key] = key
    sweep, wall_sweep = runner.run_all(sweep_specs, f"{desc} lr grid", threads)
    out = Selection({}, {}, sweep, [], [], wall_sweep, factors=tuple(factors), owners=owners)
    for key, runs in settings.items():
        default = runs[0].effective_lr
        mine = [r for r, s in zip(sweep, sweep_specs) if owners[s.key] == key]
        best = max(mine, key=lambda r: (score(r), -abs(math.log(r.lr / default))))
        out.chosen[key], out.defaults[key] = best.lr, default
    final_specs = [s.replace(lr=out.chosen[key]) for key, runs in settings.items() for s in runs]
    default_specs = [s for key in at_default for s in settings[key]]
    records, wall_final = runner.run_all(final_specs + default_specs, f"{desc} seeds", threads)
    out.final, out.at_default = records[: len(final_specs)], records[len(final_specs):]
    out.wall_seconds += wall_final
    return out


def run_selected(runner: Runner, bases: Sequence[RunSpec], factors: Sequence[float], seeds: Sequence[int],
                 desc: str, threads: int | None = None, at_default: Sequence[str] = (),
                 group: str = "dataset", score: Callable[[RunRecord], float] = validation_accuracy) -> Selection:
    """:func:`choose` with one setting per base spec, keyed ``(spec.<group>, method name)``.

    ``bases``: one spec per (setting, method) with ``lr=None`` and validation among its
    ``eval_splits``; ``at_default``: method names also trained on every seed at the default rate;
    ``group``: the spec field that tells settings apart (each gets its own choice).
    """
    for b in bases:
        if b.lr is not None or "validation" not in b.eval_splits:
            raise ValueError(f"{b.slug}: a base spec takes lr=None and evaluates the validation split")
    settings = {(getattr(b, group), b.method.name): [b.replace(seed=s) for s in seeds] for b in bases}
    defaults = [key for key in settings if key[1] in at_default]
    out = choose(runner, settings, factors, desc, threads, score, at_default=defaults)
    out.group = group
    return out


def rows(chosen: Selection, by: Sequence[str] = ("dataset", "method")) -> list[report.Row]:
    """Mean ± std rows of the runs at the chosen rates, then of the runs at the default rate
    (labelled with :data:`AT_DEFAULT`)."""
    out = report.aggregate(chosen.final, by)
    for row in report.aggregate(chosen.at_default, by):
        row.label += AT_DEFAULT
        out.append(row)
    return out


def grid_table(chosen: Selection, value, seed: int) -> str:
    """Markdown: validation accuracy of each method at each factor of its grid (first seed) for
    the setting ``value`` of the group field, the chosen rate in bold."""
    header = ["method", "default lr", *[f"× {f:.3g}" for f in chosen.factors]]
    table = []
    for key, lr in chosen.chosen.items():
        if key[0] != value:
            continue
        mine = chosen.grid_runs(key)
        cells = [(f"**{100 * r.validation['accuracy']:.1f}**" if r.lr == lr
                  else f"{100 * r.validation['accuracy']:.1f}")
                 for r in mine]
        table.append([mine[0].label, f"{chosen.defaults[key]:g}", *cells])
    return (f"\nValidation accuracy (%) over each method's learning-rate grid, seed {seed} "
            f"(the chosen rate in bold):\n\n" + report.markdown_table(header, table) + "\n")


def sensitivity_plot(chosen: Selection, panels: dict, title: str, path: Path) -> Path:
    """Validation accuracy against the rate's factor over the default, one line per method, one
    panel per setting: ``panels`` maps each value of the group field to its panel title."""
    plt = plots.pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    styles = plots.method_styles(r.method for r in chosen.sweep)
    for ax, (value, panel_title) in zip(axes[0], panels.items()):
        for key in chosen.chosen:
            if key[0] != value:
                continue
            mine, default = chosen.grid_runs(key), chosen.defaults[key]
            ax.plot([r.lr / default for r in mine], [100 * r.validation["accuracy"] for r in mine],
                    label=mine[0].label, mec="black", mew=0.5, alpha=0.9, **styles[mine[0].method])
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(list(chosen.factors), [f"×{f:.2g}" for f in chosen.factors])
        ax.set_xlabel("learning rate / the method's default (log scale)")
        ax.set_ylabel("validation accuracy (%)")
        ax.set_title(panel_title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return plots.save(fig, path)
