"""The learning-rate sweep behind the method kinds' default rates (:data:`surm.harness.methods.KINDS`;
recorded in docs/lr_sweep.md).

Each method is trained at a few learning rates on a data subset and scored on the
*validation* split (never test), with seed 100 (the reported runs use seeds 0-2). Text
(``full`` preset): MiniLM on 10 % of Rotten Tomatoes, batch 16, one epoch (the ``nlp`` full
preset's Rotten Tomatoes setting); images (``vision`` preset): EfficientNet-Lite0 on digits
(the ``vision`` experiment's setting).

Writes ``lr_sweep.json`` and ``lr_sweep.md`` (a method x learning-rate table of validation
accuracy with the best per row in bold) and ``lr_sweep.png``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from surm.harness.methods import Method, parse
from surm.harness.runs import Runner, RunRecord, RunSpec
from surm.peft.recommend import WIDTH_SCALED_LR, WIDTH_SCALED_SERIAL_LR

from . import plots, report
from .presets import Preset, setting

#: A coarse grid (factors of about 3), refined around the best values of a first pass: with
#: 64 steps the useful window is narrow, with majority-class plateaus below it and collapses
#: above it.
TEXT_GRID = {
    "full": [5e-5, 1e-4, 3e-4, 1e-3],
    "head": [3e-3, 1e-2, 3e-2, 1e-1],
    "bitfit": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1],  # biases; the head at head-only's 1e-1
    "lora:8": [1e-3, 2e-3, 3e-3, 5e-3, 1e-2],
    "houlsby:32": [3e-4, 1e-3, 3e-3, 1e-2],
    "surm:circulant": [3e-3, 5e-3, 1e-2, 2e-2, 3e-2],
    "surm:toeplitz": [3e-3, 5e-3, 1e-2, 2e-2, 3e-2],
    "surm:kronecker": [1e-3, 3e-3, 1e-2, 2e-2, 3e-2],
    "surm:ldr:rank=1": [1e-3, 2e-3, 3e-3, 5e-3, 1e-2],
    "surm:circulant:serial": [1e-3, 3e-3, 1e-2, 2e-2, 3e-2],
}
IMAGE_GRID = {
    "full": [1e-4, 3e-4, 1e-3, 3e-3],
    "head": [3e-3, 1e-2, 3e-2],
    "lora:4": [1e-3, 3e-3, 1e-2],
    "surm:circulant": [3e-4, 1e-3, 3e-3, 1e-2, 3e-2],
    "surm:toeplitz": [3e-4, 1e-3, 3e-3, 1e-2, 3e-2],
}
#: The window of the width-scaled SURM adapters: every family (and the serial placement) at
#: surm.recommended_lr times 1/10, 1/3, 1, 3 and 10, on the settings of TEXT_GRID's sweep
#: (which ran before the scale, alpha alone, on query and value).
SCALE_FACTORS = (0.1, 1 / 3, 1.0, 3.0, 10.0)
SCALE_GRID = {
    method: tuple(float(f"{rate * f:.3g}") for f in SCALE_FACTORS)
    for method, rate in (
        *((m, WIDTH_SCALED_LR) for m in ("surm:circulant", "surm:skew_circulant", "surm:toeplitz",
                                         "surm:symmetric_toeplitz", "surm:kronecker", "surm:ldr")),
        ("surm:circulant:serial", WIDTH_SCALED_SERIAL_LR),
    )
}
#: seeds of the sweep, disjoint from the reported seeds 0-2
SWEEP_SEEDS = (100,)


@dataclass(frozen=True, kw_only=True)
class SweepPreset(Preset):
    """The sweep's settings: a grid of learning rates per method on one data subset."""

    model: str = setting("minilm", "minilm, tiny-bert, efficientnet (image data) or a transformers folder")
    dataset: str = setting("rotten_tomatoes", "the data set (scored on its validation split)")
    grid: dict[Method, tuple[float, ...]] = setting(
        {"lora:8": (1e-3, 3e-3), "surm:circulant": (3e-3, 1e-2)}, "method -> learning rates to try")
    train_fraction: float = setting(0.1, "fraction of the training set")
    n_eval: int | None = setting(500, "cap validation at this many examples (None: all)")
    seeds: tuple[int, ...] = setting(SWEEP_SEEDS, "seeds, disjoint from the reported ones")
    batch_size: int = setting(16, "batch size")
    epochs: float = setting(1.0, "training epochs")
    threads: int | None = setting(None, "torch threads (None: torch's default)")


PRESETS: dict[str, SweepPreset] = {
    "smoke": SweepPreset(name="smoke", model="tiny-bert", grid={"head": (1e-3, 1e-2), "surm:circulant": (1e-2,)},
                         train_fraction=0.005, n_eval=32, seeds=(0,), threads=1),
    "quick": SweepPreset(name="quick"),
    "full": SweepPreset(name="full", grid=TEXT_GRID),
    "scale": SweepPreset(name="scale", grid=SCALE_GRID),
    "vision": SweepPreset(name="vision", model="efficientnet", dataset="digits", grid=IMAGE_GRID, train_fraction=1.0,
                          batch_size=32),
}


def specs(config: SweepPreset) -> list[RunSpec]:
    """Every method at every rate of its grid, seed by seed; scored on validation."""
    base = RunSpec(dataset=config.dataset, method=parse("head"), model=config.model,
                   train_fraction=config.train_fraction, n_eval=config.n_eval, epochs=config.epochs,
                   batch_size=config.batch_size, eval_splits=("validation",))
    return [base.replace(method=m, lr=lr, seed=s) for m, lrs in config.grid.items() for lr in lrs for s in config.seeds]


def run(config: SweepPreset, out_dir: Path, runner: Runner) -> report.Outcome:
    """Run the sweep into ``out_dir``; the payload's ``best`` is each method's best rate."""
    records, wall = runner.run_all(specs(config), "lr sweep", config.threads)
    scores: dict[Method, dict[float, list[float]]] = {}
    for r in records:
        scores.setdefault(r.method, {}).setdefault(r.lr, []).append(r.validation["accuracy"])
    best = {m: max(by_lr, key=lambda lr: sum(by_lr[lr]) / len(by_lr[lr])) for m, by_lr in scores.items()}
    markdown = tables(scores, best, config, wall, records)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = plot(scores, records, out_dir / "lr_sweep.png",
               f"Validation accuracy against learning rate: {config.model} on {config.dataset} ({config.name} preset)")
    payload = {"experiment": "lr_sweep", "preset": config.name, "config": config, "wall_seconds": wall,
               "scores": {m.name: {str(lr): v for lr, v in s.items()} for m, s in scores.items()},
               "best": {m.name: lr for m, lr in best.items()}, "runs": records}
    return report.write(out_dir, "lr_sweep", payload, markdown, [png])


def tables(scores: dict[Method, dict[float, list[float]]], best: dict[Method, float], config: SweepPreset,
           wall: float, records: list[RunRecord]) -> str:
    """Markdown: methods by learning rates, the best of each row in bold."""
    lrs = sorted({lr for s in scores.values() for lr in s})
    labels = {r.method: r.label for r in records}
    rows = []
    for method, by_lr in scores.items():
        cells = []
        for lr in lrs:
            if lr not in by_lr:
                cells.append("")
                continue
            text = f"{100 * sum(by_lr[lr]) / len(by_lr[lr]):.1f}"
            cells.append(f"**{text}**" if lr == best[method] else text)
        mine = [r for r in records if r.method == method]
        rows.append([labels[method] + report.stored_mark(sum(r.from_store for r in mine), len(mine)), *cells])
    sizes = records[0].sizes
    return (
        f"# Learning-rate sweep ({config.name} preset): {config.model} on {config.dataset}\n\n"
        f"Validation accuracy (%), {sizes['train']} training examples, {sizes['validation']} validation "
        f"examples, seeds {list(config.seeds)}, batch {config.batch_size}, {config.epochs:g} epoch(s). "
        f"Best per method in bold.\n\n"
        + report.markdown_table(["method", *[f"{lr:g}" for lr in lrs]], rows)
        + f"\n{len(records)} runs, wall time {report.fmt_duration(wall)}.\n"
        + report.stored_note(records)
    )


def plot(scores: dict[Method, dict[float, list[float]]], records: list[RunRecord], path: Path, title: str) -> Path:
    """Mean validation accuracy against the learning rate, one line per method."""
    plt = plots.pyplot()
    labels = {r.method: r.label for r in records}
    styles = plots.method_styles(scores)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for method, by_lr in scores.items():
        lrs = sorted(by_lr)
        ax.plot(lrs, [100 * sum(by_lr[lr]) / len(by_lr[lr]) for lr in lrs], label=labels[method], alpha=0.9,
                mec="black", mew=0.5, **styles[method])
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, title="method", loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    return plots.save(fig, path)
