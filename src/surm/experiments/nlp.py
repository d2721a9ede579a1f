"""Text classification with MiniLM (the paper's Table 5 analog, scaled to a 2-core CPU).

all-MiniLM-L6-v2 fine-tuned on Rotten Tomatoes, the 2016 election tweets and Reuters R8 with
full fine-tuning, head only, BitFit, LoRA r = 1/4/8, Houlsby and Pfeiffer bottleneck adapters,
SURM parallel (every family) and SURM serial adapters; mean ± std over seeds; test accuracy
(and macro-F1, which matters on the imbalanced R8) against trainable parameters.

Presets:

* ``smoke``: a random 2-layer BERT, a few dozen examples; seconds (tests).
* ``quick``: MiniLM on Rotten Tomatoes, head only / LoRA r=8 / SURM circulant / SURM
  Toeplitz, one seed (the default of ``surm reproduce nlp``; a few minutes).
* ``full``: every method on Rotten Tomatoes (20 % of the training set: 2,040 sentences, 128
  steps at batch 16) and a core subset on the tweets (20 %) and R8 (25 %), 3 seeds, up to
  1,000 test examples (see docs/results.md for the run time). Its Rotten Tomatoes seed-0 runs
  of head only, LoRA r=8 and SURM circulant / Toeplitz are the ``quick`` preset's runs.

Writes ``nlp.json`` (settings, aggregated rows, every run record), ``nlp.md`` (tables) and
``nlp.png`` (accuracy against trainable parameters, one panel per data set; with R8 also
``nlp_r8_f1.png``, its macro-F1).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from surm.harness.methods import Method, parse
from surm.harness.models import catalog
from surm.harness.runs import Runner, RunRecord, RunSpec

from . import plots, report, selection
from .presets import Preset, lr_for, setting

DATASET_NAMES = {"rotten_tomatoes": "Rotten Tomatoes", "election_tweets": "election tweets", "r8": "R8"}

ALL_METHODS = (
    "full", "head", "bitfit", "lora:1", "lora:4", "lora:8", "houlsby:32", "pfeiffer:24",
    "surm:circulant", "surm:skew_circulant", "surm:toeplitz", "surm:symmetric_toeplitz", "surm:kronecker",
    "surm:ldr:rank=1", "surm:circulant:serial", "surm:toeplitz:serial",
)
CORE_METHODS = ("full", "head", "lora:8", "surm:circulant", "surm:toeplitz")
#: The fair re-run: every method's rate chosen on validation from the same-size grid.
#: SURM at its defaults (every linear map of each block, scaled, surm.recommended_lr) against
#: LoRA r=8 at its usual setup (query+value) and LoRA r=1 on SURM's maps (matched modules and
#: about SURM Toeplitz's parameters), PEFT's structured methods at SURM circulant's
#: parameter count on the same maps (C3A block 384, FourierFT 768 frequencies and VeRA rank 192
#: exactly; LoKr r=8 28,416), the paper's other baselines, and the small end below LoRA r=1 (SURM on query+value).
FAIR_RT = (
    "head", "bitfit", "lntuning", "lora:8", "lora:1:targets=all", "lorafix:8", "houlsby:32", "adapterdrop:32",
    "c3a:384:targets=all", "fourierft:768:targets=all", "vera:192:targets=all", "lokr:8:targets=all",
    "surm:circulant", "surm:toeplitz", "surm:kronecker", "surm:ldr", "surm:circulant:targets=qv",
)
FAIR_CORE = ("lora:8", "lora:1:targets=all", "c3a:384:targets=all", "surm:circulant", "surm:toeplitz")
FAIR_FACTORS = (1 / 3, 1.0, 3.0)
#: SURM's documented defaults, also reported at surm.recommended_lr on every seed
FAIR_DEFAULTS = ("surm:circulant", "surm:toeplitz")
#: kinds whose merged query/value changes are saved (parallel placement only) for the CKA experiment
DELTA_KINDS = ("full", "lora", "surm")
LORA_8 = parse("lora:8")  # the reference of the "vs LoRA r=8" column


@dataclass(frozen=True, kw_only=True)
class NlpPreset(Preset):
    """The text experiment's settings (see the module docstring for the presets)."""

    model: str = setting("minilm", "minilm, tiny-bert (random 2-layer BERT, for tests) or a transformers folder")
    methods: dict[str, tuple[Method, ...]] = setting(
        {"rotten_tomatoes": ("head", "lora:8")}, "data set -> method strings, e.g. {'r8': ['head', 'lora:8']}")
    seeds: tuple[int, ...] = setting((0,), "training seeds (mean ± std over them)")
    train_fraction: dict[str, float] = setting({"rotten_tomatoes": 0.2}, "data set -> fraction of its training set")
    n_eval: int | None = setting(1000, "cap validation and test at this many examples (None: all)")
    epochs: float = setting(1.0, "training epochs")
    batch_size: int = setting(16, "batch size (the default learning rates assume 16)")
    lr: float | dict[Method, float] | None = setting(
        None, "learning rate: one for every method, {method: lr}, or None for each method's default")
    lr_factors: tuple[float, ...] | None = setting(
        None, "choose each method's rate on validation (first seed) from default * factor for each factor, e.g. "
              "(1/3, 1, 3); None: train at lr / the default")
    at_default: tuple[Method, ...] = setting(
        (), "with lr_factors: methods also reported on every seed at their default rate")
    threads: int | None = setting(None, "torch threads (None: torch's default)")

    def __post_init__(self) -> None:
        super().__post_init__()
        for dataset, methods in self.methods.items():
            if dataset not in self.train_fraction:
                raise ValueError(f"train_fraction: give one for {dataset} (it has methods)")
            if not methods:
                raise ValueError(f"methods: {dataset} has none")
        if self.lr_factors is not None and self.lr is not None:
            raise ValueError("lr and lr_factors: give one (lr_factors chooses the rates on validation)")


PRESETS: dict[str, NlpPreset] = {
    "smoke": NlpPreset(
        name="smoke", model="tiny-bert",
        methods={"rotten_tomatoes": ("head", "lora:2", "surm:circulant", "surm:toeplitz:serial")},
        seeds=(0,), train_fraction={"rotten_tomatoes": 0.005}, n_eval=32, threads=1,
    ),
    "quick": NlpPreset(
        name="quick", methods={"rotten_tomatoes": ("head", "lora:8", "surm:circulant", "surm:toeplitz")},
        seeds=(0,), train_fraction={"rotten_tomatoes": 0.2},
    ),
    "full": NlpPreset(
        name="full", methods={"rotten_tomatoes": FAIR_RT, "election_tweets": FAIR_CORE, "r8": FAIR_CORE},
        seeds=(0, 1, 2), train_fraction={"rotten_tomatoes": 0.2, "election_tweets": 0.2, "r8": 0.25},
        lr_factors=FAIR_FACTORS, at_default=FAIR_DEFAULTS,
    ),
    "epochs3": NlpPreset(
        name="epochs3",
        methods={"rotten_tomatoes": ("lora:8", "lora:1:targets=all", "surm:circulant", "surm:toeplitz")},
        seeds=(0, 1, 2), train_fraction={"rotten_tomatoes": 0.2}, epochs=3.0,
        lr_factors=FAIR_FACTORS, at_default=FAIR_DEFAULTS,
    ),
    "every_family": NlpPreset(
        name="every_family", methods={"rotten_tomatoes": ALL_METHODS, "election_tweets": CORE_METHODS,
                                      "r8": CORE_METHODS},
        seeds=(0, 1, 2), train_fraction={"rotten_tomatoes": 0.2, "election_tweets": 0.2, "r8": 0.25},
    ),
}


def base_spec(config: NlpPreset, dataset: str) -> RunSpec:
    """The run spec shared by every method and seed of ``dataset`` under ``config`` (scored on
    validation too when the rates are chosen there)."""
    splits = ("validation", "test") if config.lr_factors is not None else ("test",)
    return RunSpec(
        dataset=dataset, method=parse("head"), model=config.model, train_fraction=config.train_fraction[dataset],
        n_eval=config.n_eval, epochs=config.epochs, batch_size=config.batch_size, eval_splits=splits,
    )


def specs(config: NlpPreset) -> list[RunSpec]:
    """Every run of the experiment, data set by data set, method by method, seed by seed."""
    out = []
    for dataset, methods in config.methods.items():
        base = base_spec(config, dataset)
        for method in methods:
            save = (method.kind in DELTA_KINDS and method.placement == "parallel" and dataset == "rotten_tomatoes"
                    and catalog.entry(config.model, "text").pretrained)
            out += [base.replace(method=method, seed=seed, lr=lr_for(config.lr, method), save_deltas=save)
                    for seed in config.seeds]
    return out


def run(config: NlpPreset, out_dir: Path, runner: Runner) -> report.Outcome:
    """Run the text experiment into ``out_dir``."""
    chosen = None
    if config.lr_factors is None:
        records, wall = runner.run_all(specs(config), "nlp", config.threads)
        rows = report.aggregate(records)
    else:
        bases = [base_spec(config, d).replace(method=m) for d, methods in config.methods.items() for m in methods]
        chosen = selection.run_selected(runner, bases, config.lr_factors, config.seeds, "nlp", config.threads,
                                        at_default=[m.name for m in config.at_default])
        records, wall = chosen.final + chosen.at_default, chosen.wall_seconds
        rows = selection.rows(chosen)
    markdown = tables(rows, config, wall, records, chosen)
    out_dir.mkdir(parents=True, exist_ok=True)
    panels = {_panel_title(rows, d): [r for r in rows if r.dataset == d] for d in config.methods}
    figures = [plots.accuracy_vs_params(
        panels, out_dir / "nlp.png",
        title=f"{catalog.entry(config.model, 'text').title} fine-tuned for text classification ({config.name} preset): "
              f"test accuracy against trainable parameters")]
    if "r8" in config.methods:
        figures.append(plots.accuracy_vs_params(
            {_panel_title(rows, "r8"): panels[_panel_title(rows, "r8")]}, out_dir / "nlp_r8_f1.png", metric="macro_f1",
            title="R8 (eight imbalanced topics): test macro-F1 against trainable parameters"))
    payload = {"experiment": "nlp", "preset": config.name, "config": config, "wall_seconds": wall,
               "run_seconds": sum(r.seconds for r in records), "rows": rows, "runs": records}
    if chosen is not None:
        figures.append(selection.sensitivity_plot(
            chosen, {d: DATASET_NAMES.get(d, d) for d in config.methods},
            f"Learning-rate sensitivity, seed {config.seeds[0]} ({config.name} preset)", out_dir / "nlp_lr.png"))
        payload.update(chosen.payload())
    return report.write(out_dir, "nlp", payload, markdown, figures)


def _panel_title(rows: list[report.Row], dataset: str) -> str:
    n_train = next(r.n_train for r in rows if r.dataset == dataset)
    return f"{DATASET_NAMES.get(dataset, dataset)} ({n_train:,} training examples)"


def tables(rows: list[report.Row], config: NlpPreset, wall: float, records: list[RunRecord],
           chosen: selection.Selection | None = None) -> str:
    """Markdown: one table per data set (methods by parameters), the learning-rate grids when
    the rates were chosen on validation, and the run sizes."""
    lines = [f"# MiniLM text classification ({config.name} preset)\n"]
    if chosen is not None:
        lines.append(
            f"\nEvery method's learning rate was chosen on the validation split from the same-size grid "
            f"default × {', '.join(f'{f:.3g}' for f in config.lr_factors)} with seed {config.seeds[0]}; the other "
            f"seeds trained at the chosen rate. Test accuracy played no part in the choice.\n")
    for dataset in config.methods:
        drows = [r for r in rows if r.dataset == dataset]
        lora8 = next((r.adapter_params for r in drows if r.method == LORA_8), None)
        r0 = drows[0]
        lines.append(
            f"\n## {DATASET_NAMES.get(dataset, dataset)}: {r0.n_train} training examples, "
            f"{r0.n_test} test, seeds {r0.seeds}\n"
        )
        header = ["method", "params (no head)", "vs LoRA r=8", "lr", "test accuracy %", "macro-F1 %", "train s"]
        table = []
        std = len(r0.seeds) > 1
        for r in drows:
            ratio = f"{r.adapter_params / lora8:.3f}x" if lora8 and r.adapter_params else "—"
            table.append([r.label + report.stored_mark(r.stored, len(r.seeds)), report.fmt_params(r.adapter_params),
                          ratio, report.fmt_lr(r.lr, r.head_lr), report.fmt_pct(r.accuracy, std),
                          report.fmt_pct(r.macro_f1, std), f"{r.train_seconds[0]:.0f}"])
        lines.append(report.markdown_table(header, table))
        plain = [r for r in drows if not r.label.endswith(selection.AT_DEFAULT)]
        lines += [f"\n- {line}" for line in report.versus(plain, LORA_8)]
        matched = next((r.method for r in plain if r.method.kind == "lora" and r.method != LORA_8
                        and r.method.knob("targets") == "all"), None)
        if matched is not None:
            lines += [f"\n- {line}" for line in report.versus(plain, matched)]
        lines.append("\n" if lora8 else "")
        if chosen is not None:
            lines.append(selection.grid_table(chosen, dataset, config.seeds[0]))
    lines.append(
        f"\nTest accuracy: mean ± sample std over seeds (the mean alone for one seed). Parameters exclude the "
        f"classification head, which every method "
        f"trains{_head_note(records)}. {len(records)} runs; wall time {report.fmt_duration(wall)} "
        f"(sum of the runs' own times {report.fmt_duration(sum(r.seconds for r in records))}; the wall time is "
        f"less when runs came from the store). Max sequence length 64, batch {config.batch_size}, "
        f"{config.epochs:g} epoch(s), AdamW, "
        f"linear schedule with 6 % warm-up, weight decay 0.01.\n"
    )
    lines.append(report.stored_note(records))
    return "".join(lines)


def _head_note(records: list[RunRecord]) -> str:
    """`` (Rotten Tomatoes head 770; ...)`` from the head-only runs, or nothing without them."""
    sizes = _head_sizes(records)
    return f" ({'; '.join(sizes)})" if sizes else ""


def _head_sizes(records: list[RunRecord]) -> list[str]:
    sizes = {r.spec.dataset: r.trainable_params for r in records if r.method.kind == "head"}
    return [f"{DATASET_NAMES.get(d, d)} head {n:,}" for d, n in sizes.items()]
