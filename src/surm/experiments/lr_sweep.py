"""The learning-rate sweep behind :data:`surm.methods.DEFAULT_LR` (recorded in docs/lr_sweep.md).

Each method is trained at a few learning rates on a data subset and scored on the
*validation* split (never test), with seed 100 (the reported runs use seeds 0-2). Text
(``full`` preset): MiniLM on 10 % of Rotten Tomatoes, batch 16, one epoch (the ``nlp`` full
preset's Rotten Tomatoes setting); images (``vision`` preset): EfficientNet-Lite0 on digits
(the ``vision`` experiment's setting).

Writes ``lr_sweep.json`` and ``lr_sweep.md`` (a method x learning-rate table of validation
accuracy with the best per row in bold) and ``lr_sweep.png``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import common

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
#: seeds of the sweep, disjoint from the reported seeds 0-2
SWEEP_SEEDS = [100]

PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(model="tiny-bert", dataset="rotten_tomatoes", grid={"head": [1e-3, 1e-2], "surm:circulant": [1e-2]},
                  train_fraction=0.005, n_eval=32, seeds=[0], batch_size=16, epochs=1.0, threads=1),
    "quick": dict(model="minilm", dataset="rotten_tomatoes", grid={"lora:8": [1e-3, 3e-3], "surm:circulant": [3e-3, 1e-2]},
                  train_fraction=0.1, n_eval=500, seeds=SWEEP_SEEDS, batch_size=16, epochs=1.0, threads=None),
    "full": dict(model="minilm", dataset="rotten_tomatoes", grid=TEXT_GRID, train_fraction=0.1, n_eval=500,
                 seeds=SWEEP_SEEDS, batch_size=16, epochs=1.0, threads=None),
    "vision": dict(model="efficientnet", dataset="digits", grid=IMAGE_GRID, train_fraction=1.0, n_eval=500,
                   seeds=SWEEP_SEEDS, batch_size=32, epochs=1.0, threads=None),
}
for _config in PRESETS.values():
    _config.update(store=None, fresh=False, progress=True)


def specs(config: dict[str, Any]) -> list[common.RunSpec]:
    base = common.RunSpec(dataset=config["dataset"], method="head", model=config["model"],
                          train_fraction=config["train_fraction"], n_eval=config["n_eval"], epochs=config["epochs"],
                          batch_size=config["batch_size"], eval_splits=("validation",))
    return [base.replace(method=m, lr=lr, seed=s) for m, lrs in config["grid"].items() for lr in lrs
            for s in config["seeds"]]


def run(out_dir: Path | str, preset: str = "full", **overrides: Any) -> dict[str, Any]:
    """Run the sweep into ``out_dir``; returns ``{"best", "markdown", "files", ...}``."""
    config = common.resolve_preset("lr_sweep", PRESETS, preset, overrides)
    out_dir = Path(out_dir)
    records, wall = common.run_preset(specs(config), config, out_dir, "lr sweep")
    scores: dict[str, dict[float, list[float]]] = {}
    for r in records:
        scores.setdefault(r["method"], {}).setdefault(r["lr"], []).append(r["validation"]["accuracy"])
    best = {m: max(by_lr, key=lambda lr: sum(by_lr[lr]) / len(by_lr[lr])) for m, by_lr in scores.items()}
    markdown = report(scores, best, config, preset, wall, records)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = _plot(scores, out_dir / "lr_sweep.png", f"{config['dataset']} validation accuracy")
    payload = {"experiment": "lr_sweep", "preset": preset, "config": config, "wall_seconds": wall,
               "scores": {m: {str(lr): v for lr, v in s.items()} for m, s in scores.items()}, "best": best,
               "runs": records}
    files = common.write_outputs(out_dir, "lr_sweep", payload, markdown)
    return {"experiment": "lr_sweep", "best": best, "markdown": markdown, "wall_seconds": wall,
            "files": [*files.values(), png]}


def report(scores, best, config, preset, wall, records) -> str:
    lrs = sorted({lr for s in scores.values() for lr in s})
    rows = []
    for method, by_lr in scores.items():
        cells = []
        for lr in lrs:
            if lr not in by_lr:
                cells.append("")
                continue
            text = f"{100 * sum(by_lr[lr]) / len(by_lr[lr]):.1f}"
            cells.append(f"**{text}**" if lr == best[method] else text)
        rows.append([records[[r["method"] for r in records].index(method)]["label"], *cells])
    sizes = records[0]["sizes"]
    return (
        f"# Learning-rate sweep ({preset} preset): {config['model']} on {config['dataset']}\n\n"
        f"Validation accuracy (%), {sizes['train']} training examples, {sizes['validation']} validation "
        f"examples, seeds {config['seeds']}, batch {config['batch_size']}, {config['epochs']:g} epoch(s). "
        f"Best per method in bold.\n\n"
        + common.markdown_table(["method", *[f"{lr:g}" for lr in lrs]], rows)
        + f"\n{len(records)} runs, wall time {common.fmt_duration(wall)}.\n"
    )


def _plot(scores, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for method, by_lr in scores.items():
        lrs = sorted(by_lr)
        style = common.method_style(method)
        ax.plot(lrs, [100 * sum(by_lr[lr]) / len(by_lr[lr]) for lr in lrs], marker=style["marker"],
                label=method, alpha=0.85)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
