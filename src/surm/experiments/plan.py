"""The planner against the alternatives at equal budgets: MiniLM text classification.

For each data set, seed and budget (the parameters of LoRA r=1 and r=8 on query and value:
9,216 and 73,728 on MiniLM) four adapters are trained and tested:

* ``planned``: :func:`surm.analysis.plan.make_plan` on a few of that seed's training batches,
  every family but LDR (the default), every linear layer but the head (as ``surm plan
  --target-modules all-linear``);
* ``planned, structured only``: the same with the structured families alone (circulant,
  skew-circulant, Toeplitz, symmetric Toeplitz, Kronecker): with every family the planner
  mostly picks low rank;
* ``single family``: the best single family at about the budget from docs/results.md (Toeplitz
  on query and value, 9,204 parameters; circulant with ``block_size=24`` on query and value,
  73,728);
* ``LoRA``: ``lora:1`` / ``lora:8`` on query and value.

Learning rates: with ``lr_factors`` (the ``full`` preset) each variant's rate is chosen on
validation, per data set and budget, from the same-size grid around its default (the first
seed's runs; the other seeds train at the chosen rate, each with its own plan), as in the other
experiments; without, the methods' defaults (:func:`surm.harness.methods.default_lr`), and a planned
config trains at ``surm.recommended_lr``'s parallel rate whatever families it mixes. The
planner's wall time (gradients, projections, knapsack; the model's loading apart) is recorded
for each plan.

Presets:

* ``smoke``: a random 2-layer BERT, a few dozen examples; seconds (tests).
* ``quick``: MiniLM on Rotten Tomatoes, one seed, both budgets (8 runs).
* ``full``: Rotten Tomatoes, the election tweets and R8, seeds 0-2, both budgets, rates chosen
  on validation (120 runs); its Rotten Tomatoes seed-0 runs include the ``quick`` preset's.

Writes ``plan.json`` (settings, every plan's choices and times, aggregated rows, every run
record), ``plan.md`` (one table per data set and budget) and ``plan.png`` (test accuracy
against trainable parameters, one panel per data set).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from surm.harness.methods import Method, parse
from surm.harness.models import catalog
from surm.harness.runs import Runner, RunRecord, RunSpec, adapter_json, planning_batches
from surm.harness.threads import torch_threads
from surm.peft.recommend import WIDTH_SCALED_LR

from . import nlp, plots, report, selection
from .presets import Preset, lr_for, setting

#: The families of ``planned, structured only``.
STRUCTURED = ("circulant", "skew_circulant", "toeplitz", "symmetric_toeplitz", "kronecker")
#: variant -> the families the planner chooses from (None: its default, every family but LDR)
PLANNED = {"planned": None, "planned, structured only": STRUCTURED}
VARIANTS = (*PLANNED, "single family", "LoRA")
STYLES = {"planned": ("tab:purple", "*"), "planned, structured only": ("tab:red", "o"),
          "single family": ("tab:green", "D"), "LoRA": ("tab:blue", "s")}


@dataclass(frozen=True, kw_only=True)
class PlanPreset(Preset):
    """The planner experiment's settings (see the module docstring for the presets)."""

    model: str = setting("minilm", "minilm, tiny-bert (random 2-layer BERT, for tests) or a transformers folder")
    datasets: tuple[str, ...] = setting(("rotten_tomatoes",), "text data sets")
    train_fraction: dict[str, float] = setting({"rotten_tomatoes": 0.2}, "data set -> fraction of its training set")
    seeds: tuple[int, ...] = setting((0,), "training seeds (each plans on its own batches)")
    budgets: dict[str, Method] = setting(
        {"lora:1": "surm:toeplitz:targets=qv", "lora:8": "surm:circulant:block_size=24:targets=qv"},
        "budget lora:R (LoRA r=R's parameters on query and value) -> the single-family method at about it")
    plan_batches: int = setting(4, "training batches the planner's gradient is averaged over")
    plan_batch_size: int = setting(16, "examples per planning batch")
    n_eval: int | None = setting(1000, "cap validation and test at this many examples (None: all)")
    epochs: float = setting(1.0, "training epochs")
    batch_size: int = setting(16, "batch size (the default learning rates assume 16)")
    lr: float | dict[Method, float] | None = setting(
        None, "learning rate of the single-family and LoRA runs: one, {method: lr}, or None for the defaults")
    planned_lr: float = setting(WIDTH_SCALED_LR, "learning rate of the planned configs (surm.recommended_lr)")
    lr_factors: tuple[float, ...] | None = setting(
        None, "choose each variant's rate on validation (first seed), per data set and budget, from "
              "default * factor for each factor; None: train at the defaults")
    threads: int | None = setting(None, "torch threads, for planning and training (None: torch's default)")

    def __post_init__(self) -> None:
        super().__post_init__()
        for dataset in self.datasets:
            if dataset not in self.train_fraction:
                raise ValueError(f"train_fraction: give one for {dataset}")
        for budget in self.budgets:
            kind, _, rank = budget.partition(":")
            if kind != "lora" or not rank.isdigit() or int(rank) < 1:
                raise ValueError(f"budgets: keys are lora:R with R >= 1, got {budget!r}")


PRESETS: dict[str, PlanPreset] = {
    "smoke": PlanPreset(
        name="smoke", model="tiny-bert", train_fraction={"rotten_tomatoes": 0.005}, n_eval=32,
        budgets={"lora:1": "surm:toeplitz:targets=qv", "lora:8": "surm:circulant:block_size=2:targets=qv"},
        plan_batches=2, plan_batch_size=8, threads=1,
    ),
    "quick": PlanPreset(name="quick"),
    "full": PlanPreset(
        name="full", datasets=("rotten_tomatoes", "election_tweets", "r8"), seeds=(0, 1, 2),
        train_fraction={"rotten_tomatoes": 0.2, "election_tweets": 0.2, "r8": 0.25}, lr_factors=nlp.FAIR_FACTORS,
    ),
}


@dataclass
class Planned:
    """One plan: its inputs, the config as a run carries it, its size, families and time."""

    dataset: str
    seed: int
    budget: str
    variant: str
    budget_params: int
    params: int
    families: dict[str, int]
    seconds: dict[str, float]
    load_seconds: float
    adapter: str
    energy_share: float

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def make_plans(config: PlanPreset, progress: bool = False) -> list[Planned]:
    """Every plan: per data set and seed one model and set of batches, then each budget and
    variant of :data:`PLANNED` (each plan recomputes the gradients: its time is a user's);
    ``progress``: a line per plan on stderr (off a terminal)."""
    from surm.analysis.plan import make_plan
    from surm.harness import progress as shown

    out = []
    with torch_threads(config.threads):
        for dataset in config.datasets:
            for seed in config.seeds:
                spec = base_spec(config, dataset).replace(seed=seed)
                start = time.perf_counter()
                model, batches, loss_fn = planning_batches(spec, config.plan_batches, config.plan_batch_size)
                load = time.perf_counter() - start
                head = spec.profile.head
                for budget in config.budgets:
                    for variant, structures in PLANNED.items():
                        shown.note(f"plan: planning {dataset} seed {seed} budget {budget} ({variant})", progress)
                        result = make_plan(model, batches, budget, target_modules="all-linear",
                                           exclude_modules=[head] if head else None, structures=structures,
                                           loss_fn=loss_fn)
                        families = Counter(layer.choice.structure for layer in result.layers if layer.choice)
                        out.append(Planned(
                            dataset=dataset, seed=seed, budget=budget, variant=variant, budget_params=result.budget,
                            params=result.params, families=dict(families.most_common()), seconds=result.seconds,
                            load_seconds=load, adapter=adapter_json(result.config),
                            energy_share=result.energy / result.grad_energy if result.grad_energy else 0.0,
                        ))
    return out


def base_spec(config: PlanPreset, dataset: str) -> RunSpec:
    """The run spec shared by every run on ``dataset`` (validation and test evaluated)."""
    return RunSpec(
        dataset=dataset, method=parse("head"), model=config.model, train_fraction=config.train_fraction[dataset],
        n_eval=config.n_eval, epochs=config.epochs, batch_size=config.batch_size, eval_splits=("validation", "test"),
    )


def specs(config: PlanPreset, plans: list[Planned]) -> list[tuple[str, str, RunSpec]]:
    """``(budget, variant, spec)`` of every run: data set by data set, budget by budget,
    variant by variant (:data:`VARIANTS`), seed by seed."""
    by_key = {(p.dataset, p.seed, p.budget, p.variant): p for p in plans}
    out = []
    for dataset in config.datasets:
        base = base_spec(config, dataset)
        for budget, single in config.budgets.items():
            for variant in VARIANTS:
                for seed in config.seeds:
                    if variant in PLANNED:
                        adapter = by_key[(dataset, seed, budget, variant)].adapter
                        spec = base.replace(method=parse("surm:" + _most_common(adapter)), seed=seed,
                                            lr=config.planned_lr, adapter=adapter)
                    else:
                        method = single if variant == "single family" else parse(budget)
                        spec = base.replace(method=method, seed=seed, lr=lr_for(config.lr, method))
                    out.append((budget, variant, spec))
    return out


def _most_common(adapter: str) -> str:
    import json

    return json.loads(adapter).get("structure", "circulant")  # the planner names the most common family


@dataclass
class Entry:
    """One variant on one data set and budget, over seeds: ``(mean, sample std)`` pairs."""

    dataset: str
    budget: str
    variant: str
    label: str
    params: tuple[float, float]
    lr: float
    seeds: list[int]
    n_train: int
    n_test: int
    accuracy: tuple[float, float]
    validation_accuracy: tuple[float, float]
    macro_f1: tuple[float, float]
    train_seconds: tuple[float, float]
    stored: int
    families: dict[str, int] = field(default_factory=dict)
    plan_seconds: tuple[float, float] | None = None
    energy_share: tuple[float, float] | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def entries(runs: list[tuple[str, str, RunSpec]], records: list[RunRecord], plans: list[Planned]) -> list[Entry]:
    """The runs grouped by data set, budget and variant (first-seen order), averaged over seeds."""
    groups: dict[tuple[str, str, str], list[RunRecord]] = {}
    for (budget, variant, spec), record in zip(runs, records):
        groups.setdefault((spec.dataset, budget, variant), []).append(record)
    out = []
    for (dataset, budget, variant), rs in groups.items():
        mine = [p for p in plans if (p.dataset, p.budget, p.variant) == (dataset, budget, variant)]
        families = sum((Counter(p.families) for p in mine), Counter())
        first = rs[0]
        out.append(Entry(
            dataset=dataset, budget=budget, variant=variant,
            label=variant if variant in PLANNED else first.label, params=report.mean_std(r.adapter_params for r in rs),
            lr=first.lr, seeds=[r.spec.seed for r in rs], n_train=first.sizes["train"], n_test=first.sizes["test"],
            accuracy=report.mean_std(r.test["accuracy"] for r in rs),
            validation_accuracy=report.mean_std(r.validation["accuracy"] for r in rs),
            macro_f1=report.mean_std(r.test["macro_f1"] for r in rs),
            train_seconds=report.mean_std(r.train_seconds for r in rs), stored=sum(r.from_store for r in rs),
            families=dict(families.most_common()),
            plan_seconds=report.mean_std(p.seconds["total"] for p in mine) if mine else None,
            energy_share=report.mean_std(p.energy_share for p in mine) if mine else None,
        ))
    return out


def run(config: PlanPreset, out_dir: Path, runner: Runner) -> report.Outcome:
    """Plan, train and test every run of the experiment into ``out_dir``."""
    start = time.perf_counter()
    plans = make_plans(config, runner.progress)
    plan_wall = time.perf_counter() - start
    runs = specs(config, plans)
    grids: list[Grid] = []
    if config.lr_factors is None:
        records, wall = runner.run_all([spec for *_, spec in runs], "plan", config.threads)
    else:
        runs, records, wall, grids = choose_rates(config, runs, runner)
    rows = entries(runs, records, plans)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = plot(rows, config, out_dir / "plan.png")
    payload = {"experiment": "plan", "preset": config.name, "config": config, "plan_wall_seconds": plan_wall,
               "wall_seconds": wall, "run_seconds": sum(r.seconds for r in records), "plans": plans, "rows": rows,
               "runs": records, "lr_grids": grids}
    return report.write(out_dir, "plan", payload, tables(rows, config, plans, plan_wall, wall, records, grids), [png])


@dataclass
class Grid:
    """One variant's learning-rate grid on one data set and budget: the first seed's validation
    accuracy at each rate, and the rate chosen."""

    dataset: str
    budget: str
    variant: str
    label: str
    default: float
    rates: list[float]
    validation_accuracy: list[float]
    chosen: float

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def choose_rates(config: PlanPreset, runs: list[tuple[str, str, RunSpec]], runner: Runner
                 ) -> tuple[list[tuple[str, str, RunSpec]], list[RunRecord], float, list[Grid]]:
    """Each (data set, budget, variant)'s rate chosen on validation over its grid with the first
    seed (:func:`.selection.choose`); then every seed at the chosen rate, each with its own plan.
    Returns the final runs, their records, the wall time and the grids."""
    settings: dict[tuple, list[RunSpec]] = {}
    for budget, variant, spec in runs:
        settings.setdefault((spec.dataset, budget, variant), []).append(spec)
    chosen = selection.choose(runner, settings, config.lr_factors, "plan", config.threads)
    grids = []
    for (dataset, budget, variant), lr in chosen.chosen.items():
        records = chosen.grid_runs((dataset, budget, variant))
        grids.append(Grid(dataset=dataset, budget=budget, variant=variant,
                          label=variant if variant in PLANNED else records[0].label,
                          default=chosen.defaults[(dataset, budget, variant)], rates=[r.lr for r in records],
                          validation_accuracy=[r.validation["accuracy"] for r in records], chosen=lr))
    final = [(budget, variant, spec.replace(lr=chosen.chosen[(spec.dataset, budget, variant)]))
             for budget, variant, spec in runs]
    return final, chosen.final, chosen.wall_seconds, grids


def tables(rows: list[Entry], config: PlanPreset, plans: list[Planned], plan_wall: float, wall: float,
           records: list[RunRecord], grids: list[Grid] = ()) -> str:
    """Markdown: per data set and budget, the four variants; then the sizes and times."""
    lines = [f"# The planner against single families and LoRA at equal budgets ({config.name} preset)\n"]
    std = len(config.seeds) > 1
    for dataset in config.datasets:
        for budget in config.budgets:
            drows = [r for r in rows if (r.dataset, r.budget) == (dataset, budget)]
            budget_params = next((p.budget_params for p in plans if (p.dataset, p.budget) == (dataset, budget)), None)
            r0 = drows[0]
            lines.append(f"\n## {nlp.DATASET_NAMES.get(dataset, dataset)}, budget {budget} "
                         f"({budget_params:,} parameters): {r0.n_train} training examples, {r0.n_test} test, "
                         f"seeds {r0.seeds}\n\n")
            header = ["method", "params (no head)", "lr", "test accuracy %", "validation accuracy %",
                      "families chosen (all seeds)", "planner s", "captured ‖G‖² %"]
            table = []
            for r in drows:
                params = f"{r.params[0]:,.0f}" + (f" ± {r.params[1]:,.0f}" if r.params[1] else "")
                families = ", ".join(f"{name} ×{n}" for name, n in r.families.items()) or "—"
                seconds = f"{r.plan_seconds[0]:.1f}" if r.plan_seconds else "—"
                share = f"{100 * r.energy_share[0]:.1f}" if r.energy_share else "—"
                table.append([r.label + report.stored_mark(r.stored, len(r.seeds)), params, report.fmt_lr(r.lr),
                              report.fmt_pct(r.accuracy, std), report.fmt_pct(r.validation_accuracy, std),
                              families, seconds, share])
            lines.append(report.markdown_table(header, table, "lrrrrlrr"))
            mine = [g for g in grids if (g.dataset, g.budget) == (dataset, budget)]
            if mine:
                grid_rows = [[g.label, f"{g.default:g}",
                              *[(f"**{100 * a:.1f}**" if lr == g.chosen else f"{100 * a:.1f}")
                                for lr, a in zip(g.rates, g.validation_accuracy)]] for g in mine]
                lines.append(f"\nValidation accuracy (%) over each variant's learning-rate grid, seed "
                             f"{config.seeds[0]} (the chosen rate in bold):\n\n" + report.markdown_table(
                                 ["method", "default lr", *[f"× {f:.3g}" for f in config.lr_factors]], grid_rows))
    totals = [p.seconds["total"] for p in plans]
    lines.append(
        f"\nTest and validation accuracy: mean ± sample std over seeds (the mean alone for one seed). Parameters "
        f"exclude the classification head, which every method trains. The planner chose among all linear layers "
        f"but the head ({config.plan_batches} batches of {config.plan_batch_size} training examples of the run's "
        f"seed); `planned` from every family but LDR, `planned, structured only` from {', '.join(STRUCTURED)}. "
        f"Families chosen: layers, summed over seeds. Planner s: its own time per plan (gradients, projections, "
        f"knapsack), mean over seeds; the {len(plans)} plans took {report.fmt_duration(sum(totals))} "
        f"({min(totals):.1f}-{max(totals):.1f} s each), {report.fmt_duration(plan_wall)} with loading the model "
        f"and batches. Captured ‖G‖²: the chosen adapters' share of the gradient's energy. Learning rates: "
        + (f"chosen on validation from the same-size grid default × {', '.join(f'{f:.3g}' for f in config.lr_factors)} "
           f"for every variant, with seed {config.seeds[0]}; test accuracy played no part. " if grids else
           "the methods' defaults, the SURM parallel rate for the planned configs (not swept for them). ")
        + f"{len(records)} runs; wall time {report.fmt_duration(wall)} (sum of the runs' own times "
        f"{report.fmt_duration(sum(r.seconds for r in records))}). Max sequence length 64, batch "
        f"{config.batch_size}, {config.epochs:g} epoch(s), AdamW, linear schedule with 6 % warm-up, weight decay "
        f"0.01; torch threads {config.threads or 'default'}.\n"
    )
    lines.append(report.stored_note(records))
    return "".join(lines)


def plot(rows: list[Entry], config: PlanPreset, path: Path) -> Path:
    """Test accuracy (mean ± std) against trainable parameters without the head, one panel per
    data set, one colour and marker per variant (both budgets in each panel)."""
    plt = plots.pyplot()
    fig, axes = plt.subplots(1, len(config.datasets), figsize=(5.0 * len(config.datasets), 4.4), squeeze=False)
    handles = {}
    for ax, dataset in zip(axes[0], config.datasets):
        drows = [r for r in rows if r.dataset == dataset]
        for x, r in zip(plots.dodge([max(r.params[0], 1) for r in drows]), drows):
            colour, marker = STYLES[r.variant]
            handle = ax.errorbar(x, 100 * r.accuracy[0], yerr=100 * r.accuracy[1], fmt=marker, color=colour,
                                 capsize=3, ms=8, lw=1, mec="black", mew=0.5)
            handles.setdefault(r.variant, handle)
        plots.log_axis(ax)
        ax.margins(x=0.15)
        ax.set_xlabel("trainable parameters without the head (log scale)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{nlp.DATASET_NAMES.get(dataset, dataset)} ({drows[0].n_train:,} training examples)")
        ax.grid(alpha=0.3)
    model = catalog.entry(config.model, "text").title
    fig.suptitle(f"{model}: planned adapters against single families and LoRA at the budgets "
                 f"{', '.join(config.budgets)} ({config.name} preset)")
    fig.tight_layout()
    fig.legend(handles.values(), handles.keys(), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8,
               title="method", frameon=False)
    return plots.save(fig, path)
