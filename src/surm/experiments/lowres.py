"""Low-resource fine-tuning: MiniLM on 1 %, 5 %, 10 % and 25 % of Rotten Tomatoes.

The paper reports SURM about 7 points above LoRA when little training data is available
(its section 5.5). Here head only, LoRA r=8 and two SURM families are trained on nested,
stratified fractions of the training set (each seed draws its own subsample). Tiny fractions
get more epochs: every run takes at least ``min_steps`` optimizer steps (64 in the full preset,
so the 1 %, 5 % and 10 % runs all take 64 steps and the 25 % runs one epoch, 160 steps). Runs
that another experiment also made come from the shared run store.

The ``full`` preset is the fair re-run: at each fraction every method's learning rate is chosen
on validation from the same-size grid (:mod:`.selection`); SURM at its defaults against LoRA
r=8 (query+value) and LoRA r=1 on SURM's maps. The 20 % point is the ``nlp`` experiment's
Rotten Tomatoes table.

Writes ``lowres.json``, ``lowres.md`` (methods x fractions, and SURM minus LoRA) and
``lowres.png`` (test accuracy against the fraction), and with chosen rates ``lowres_lr.png``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from surm.harness import data as surm_data
from surm.harness.methods import Method, parse
from surm.harness.runs import Runner, RunRecord, RunSpec

from . import nlp, plots, report, selection
from .presets import Preset, lr_for, setting


@dataclass(frozen=True, kw_only=True)
class LowresPreset(Preset):
    """The low-resource experiment's settings."""

    model: str = setting("minilm", "minilm, tiny-bert (random 2-layer BERT, for tests) or a transformers folder")
    dataset: str = setting("rotten_tomatoes", "a text data set")
    fractions: tuple[float, ...] = setting((0.01, 0.05), "fractions of the training set, one column each")
    methods: tuple[Method, ...] = setting(("head", "lora:8", "surm:circulant"), "method strings")
    seeds: tuple[int, ...] = setting((0,), "training seeds (each draws its own subsample)")
    n_eval: int | None = setting(500, "cap validation and test at this many examples (None: all)")
    batch_size: int = setting(16, "batch size")
    epochs: float = setting(1.0, "training epochs (at least min_steps steps)")
    min_steps: int = setting(64, "optimizer steps every run takes at least")
    lr: float | dict[Method, float] | None = setting(
        None, "learning rate: one for every method, {method: lr}, or None for each method's default")
    lr_factors: tuple[float, ...] | None = setting(
        None, "choose each method's rate on validation (first seed), at each fraction, from default * factor "
              "for each factor, e.g. (1/3, 1, 3); None: train at lr / the default")
    at_default: tuple[Method, ...] = setting(
        (), "with lr_factors: methods also reported on every seed at their default rate")
    threads: int | None = setting(None, "torch threads (None: torch's default)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lr_factors is not None and self.lr is not None:
            raise ValueError("lr and lr_factors: give one (lr_factors chooses the rates on validation)")


#: The fair re-run's methods: SURM's defaults, LoRA r=8 at its usual setup and LoRA r=1 on
#: SURM's maps (about SURM Toeplitz's parameters).
FAIR_METHODS = ("head", "lora:8", "lora:1:targets=all", "surm:circulant", "surm:toeplitz")


PRESETS: dict[str, LowresPreset] = {
    "smoke": LowresPreset(name="smoke", model="tiny-bert", fractions=(0.002, 0.005),
                          methods=("head", "lora:2", "surm:circulant"), n_eval=32, min_steps=2, threads=1),
    "quick": LowresPreset(name="quick"),
    "full": LowresPreset(name="full", fractions=(0.01, 0.05, 0.1), methods=FAIR_METHODS, seeds=(0, 1, 2),
                         n_eval=1000, lr_factors=nlp.FAIR_FACTORS, at_default=nlp.FAIR_DEFAULTS),
}


def base_specs(config: LowresPreset) -> list[RunSpec]:
    """One spec per fraction, shared by every method and seed (scored on validation too when the
    rates are chosen there).

    ``min_steps`` is set only where one epoch is shorter, so that a run identical to an
    ``nlp`` run has the same key (and is shared through the store).
    """
    n_full = len(surm_data.load(config.dataset).train)
    splits = ("validation", "test") if config.lr_factors is not None else ("test",)
    out = []
    for fraction in config.fractions:
        per_epoch = math.ceil(max(1, round(fraction * n_full)) / config.batch_size)
        min_steps = config.min_steps if config.epochs * per_epoch < config.min_steps else 0
        out.append(RunSpec(dataset=config.dataset, method=parse("head"), model=config.model, train_fraction=fraction,
                           n_eval=config.n_eval, epochs=config.epochs, batch_size=config.batch_size,
                           min_steps=min_steps, eval_splits=splits))
    return out


def specs(config: LowresPreset) -> list[RunSpec]:
    """Every run: fraction by fraction, method by method, seed by seed."""
    out = []
    for base in base_specs(config):
        for method in config.methods:
            out += [base.replace(method=method, seed=seed, lr=lr_for(config.lr, method)) for seed in config.seeds]
    return out


def run(config: LowresPreset, out_dir: Path, runner: Runner) -> report.Outcome:
    """Run the low-resource experiment into ``out_dir``."""
    by = ("train_fraction", "method")
    chosen = None
    if config.lr_factors is None:
        records, wall = runner.run_all(specs(config), "lowres", config.threads)
        rows = report.aggregate(records, by=by)
    else:
        bases = [b.replace(method=m) for b in base_specs(config) for m in config.methods]
        chosen = selection.run_selected(runner, bases, config.lr_factors, config.seeds, "lowres", config.threads,
                                        at_default=[m.name for m in config.at_default], group="train_fraction")
        records, wall = chosen.final + chosen.at_default, chosen.wall_seconds
        rows = selection.rows(chosen, by=by)
    markdown = tables(rows, config, wall, records, chosen)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = [plot([r for r in rows if not r.label.endswith(selection.AT_DEFAULT)], config, out_dir / "lowres.png")]
    payload = {"experiment": "lowres", "preset": config.name, "config": config, "wall_seconds": wall,
               "run_seconds": sum(r.seconds for r in records), "rows": rows, "runs": records}
    if chosen is not None:
        figures.append(selection.sensitivity_plot(
            chosen, {f: f"{100 * f:g} % of the training set" for f in config.fractions},
            f"Low-resource learning-rate sensitivity, seed {config.seeds[0]} ({config.name} preset)",
            out_dir / "lowres_lr.png"))
        payload.update(chosen.payload())
    return report.write(out_dir, "lowres", payload, markdown, figures)


def _cell(rows: list[report.Row], fraction: float, label: str) -> report.Row:
    return next(r for r in rows if r.spec.train_fraction == fraction and r.label == label)


def tables(rows: list[report.Row], config: LowresPreset, wall: float, records: list[RunRecord],
           chosen: selection.Selection | None = None) -> str:
    """Markdown: methods by fractions, SURM minus each LoRA, then (rates chosen on validation)
    the chosen rates and the grids."""
    fractions = config.fractions
    labels = list(dict.fromkeys(r.label for r in rows))
    header = ["method", "params (no head)"] + [f"{100 * f:g} % ({_cell(rows, f, labels[0]).n_train})"
                                               for f in fractions]
    table = []
    for label in labels:
        first = _cell(rows, fractions[0], label)
        stored = sum(_cell(rows, f, label).stored for f in fractions)
        total = sum(len(_cell(rows, f, label).seeds) for f in fractions)
        table.append([label + report.stored_mark(stored, total), report.fmt_params(first.adapter_params)]
                     + [report.fmt_pct(_cell(rows, f, label).accuracy) for f in fractions])
    first = [r for r in rows if r.spec.train_fraction == fractions[0] and not r.label.endswith(selection.AT_DEFAULT)]
    loras = [r.label for r in first if r.method.kind == "lora"]
    surms = [r.label for r in first if r.method.kind == "surm"]
    for lora in loras:
        for surm in surms:
            gaps = [100 * (_cell(rows, f, surm).accuracy[0] - _cell(rows, f, lora).accuracy[0]) for f in fractions]
            table.append([f"{surm} − {lora}", "", *[f"{g:+.1f}" for g in gaps]])
    steps = {r.spec.train_fraction: r.train["steps"] for r in records}
    fair, grids = "", ""
    if chosen is not None:
        fair = (f"At each fraction, every method's learning rate was chosen on the validation split from the "
                f"same-size grid default × {', '.join(f'{f:.3g}' for f in config.lr_factors)} with seed "
                f"{config.seeds[0]}; the other seeds trained at the chosen rate. Test accuracy played no part in the "
                f"choice.\n\n")
        rates = [[_cell(rows, fractions[0], label).label] + [report.fmt_lr(_cell(rows, f, label).lr,
                                                                           _cell(rows, f, label).head_lr)
                                                              for f in fractions]
                 for label in labels if not label.endswith(selection.AT_DEFAULT)]
        columns = ["method", *[f"{100 * f:g} %" for f in fractions]]
        grids = ("\nChosen learning rates:\n\n" + report.markdown_table(columns,
                                                                       rates)
                 + "".join(f"\n### {100 * f:g} %\n" + selection.grid_table(chosen, f, config.seeds[0])
                           for f in fractions))
    return (
        f"# Low-resource fine-tuning ({config.name} preset): {config.model} on {config.dataset}\n\n"
        + fair
        + f"Test accuracy (%) on {records[0].sizes['test']} test examples, mean ± std over seeds "
        f"{list(config.seeds)}; column headers give the fraction and the number of training examples. "
        f"Optimizer steps per run: {', '.join(f'{100 * f:g} %: {steps[f]}' for f in fractions)} (batch "
        f"{config.batch_size}, at least {config.min_steps} steps). Difference rows: mean accuracy points.\n\n"
        + report.markdown_table(header, table)
        + f"\n{len(records)} runs, wall time {report.fmt_duration(wall)} (sum of the runs' own times "
        f"{report.fmt_duration(sum(r.seconds for r in records))}).\n"
        + report.stored_note(records)
        + grids
    )


def plot(rows: list[report.Row], config: LowresPreset, path: Path) -> Path:
    """Test accuracy against the fraction of the training set, one line per method."""
    plt = plots.pyplot()
    from matplotlib import ticker

    styles = plots.method_styles(r.method for r in rows)
    fig, ax = plt.subplots(figsize=(6.2, 4.4))
    for method in dict.fromkeys(r.method for r in rows):
        mrows = sorted((r for r in rows if r.method == method), key=lambda r: r.spec.train_fraction)
        ax.errorbar([100 * r.spec.train_fraction for r in mrows], [100 * r.accuracy[0] for r in mrows],
                    yerr=[100 * r.accuracy[1] for r in mrows], capsize=3, label=mrows[0].label, mec="black", mew=0.5,
                    **styles[method])
    ax.set_xscale("log")
    ax.set_xticks([100 * f for f in config.fractions], [f"{100 * f:g}" for f in config.fractions])
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    dataset = nlp.DATASET_NAMES.get(config.dataset, config.dataset)
    ax.set_xlabel(f"share of the {dataset} training set, % (log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Fine-tuning on little data ({config.name} preset)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="method")
    fig.tight_layout()
    return plots.save(fig, path)
