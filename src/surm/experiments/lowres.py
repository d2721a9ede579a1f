"""Low-resource fine-tuning: MiniLM on 1 %, 5 %, 10 % and 25 % of Rotten Tomatoes.

The paper reports SURM about 7 points above LoRA when little training data is available
(SPEC §5.5). Here head only, LoRA r=8 and two SURM families are trained on nested, stratified
fractions of the training set (each seed draws its own subsample). Tiny fractions get more
epochs: every run takes at least ``min_steps`` optimizer steps (64 in the full preset, so the
1 %, 5 % and 10 % runs all take 64 steps and the 25 % runs one epoch, 160 steps). Runs that
another experiment also made come from the shared run store.

Writes ``lowres.json``, ``lowres.md`` (methods x fractions, and SURM minus LoRA) and
``lowres.png`` (test accuracy against the fraction).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from surm import data as surm_data

from . import common, nlp

PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(model="tiny-bert", fractions=[0.002, 0.005], methods=["head", "lora:2", "surm:circulant"],
                  seeds=[0], n_eval=32, batch_size=16, epochs=1.0, min_steps=2, threads=1),
    "quick": dict(model="minilm", fractions=[0.01, 0.05], methods=["head", "lora:8", "surm:circulant"],
                  seeds=[0], n_eval=500, batch_size=16, epochs=1.0, min_steps=64, threads=None),
    "full": dict(model="minilm", fractions=[0.01, 0.05, 0.1, 0.25],
                 methods=["head", "lora:8", "surm:circulant", "surm:toeplitz"],
                 seeds=[0, 1, 2], n_eval=1000, batch_size=16, epochs=1.0, min_steps=64, threads=None),
}
for _config in PRESETS.values():
    _config.update(dataset="rotten_tomatoes", lr=None, store=None, fresh=False, progress=True)


def specs(config: dict[str, Any]) -> list[common.RunSpec]:
    """Every run: fraction by fraction, method by method, seed by seed.

    ``min_steps`` is set only where one epoch is shorter, so that a run identical to an
    ``nlp`` run has the same key (and is shared through the store).
    """
    n_full = len(surm_data.load(config["dataset"]).train)
    out = []
    for fraction in config["fractions"]:
        per_epoch = math.ceil(max(1, round(fraction * n_full)) / config["batch_size"])
        min_steps = config["min_steps"] if config["epochs"] * per_epoch < config["min_steps"] else 0
        base = common.RunSpec(dataset=config["dataset"], method="head", model=config["model"], train_fraction=fraction,
                              n_eval=config["n_eval"], epochs=config["epochs"], batch_size=config["batch_size"],
                              min_steps=min_steps)
        for method in config["methods"]:
            lr = common.preset_lr(config, method)
            out += [base.replace(method=method, seed=seed, lr=lr) for seed in config["seeds"]]
    return out


def run(out_dir: Path | str, preset: str = "full", **overrides: Any) -> dict[str, Any]:
    """Run the low-resource experiment into ``out_dir``; returns ``{"rows", "markdown", "files", ...}``."""
    config = common.resolve_preset("lowres", PRESETS, preset, overrides)
    out_dir = Path(out_dir)
    records, wall = common.run_preset(specs(config), config, out_dir, "lowres")
    rows = common.aggregate(records, by=("train_fraction", "method"))
    markdown = report(rows, config, preset, wall, records)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = plot(rows, config, out_dir / "lowres.png")
    payload = {"experiment": "lowres", "preset": preset, "config": config, "wall_seconds": wall,
               "run_seconds": sum(r["seconds"] for r in records), "rows": rows, "runs": records}
    files = common.write_outputs(out_dir, "lowres", payload, markdown)
    return {"experiment": "lowres", "rows": rows, "markdown": markdown, "wall_seconds": wall,
            "files": [*files.values(), png]}


def _cell(rows, fraction, method):
    return next((r for r in rows if r["train_fraction"] == fraction and r["method"] == method), None)


def report(rows, config, preset, wall, records) -> str:
    fractions = config["fractions"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    header = ["method", "params (no head)"] + [
        f"{100 * f:g} % ({_cell(rows, f, methods[0])['n_train']})" for f in fractions
    ]
    table = []
    for method in methods:
        first = _cell(rows, fractions[0], method)
        table.append([first["label"], common.fmt_params(first["adapter_params"])]
                     + [common.fmt_pct(_cell(rows, f, method)["accuracy"]) for f in fractions])
    lora = next((m for m in methods if m.startswith("lora")), None)
    for method in methods:
        if method.startswith("surm") and lora:
            gaps = [100 * (_cell(rows, f, method)["accuracy"][0] - _cell(rows, f, lora)["accuracy"][0]) for f in fractions]
            table.append([f"{_cell(rows, fractions[0], method)['label']} − {_cell(rows, fractions[0], lora)['label']}",
                          "", *[f"{g:+.1f}" for g in gaps]])
    steps = {r["spec"]["train_fraction"]: r["train"]["steps"] for r in records}
    return (
        f"# Low-resource fine-tuning ({preset} preset): {config['model']} on {config['dataset']}\n\n"
        f"Test accuracy (%) on {records[0]['sizes']['test']} test examples, mean ± std over seeds "
        f"{config['seeds']}; column headers give the fraction and the number of training examples. "
        f"Optimizer steps per run: {', '.join(f'{100 * f:g} %: {steps[f]}' for f in fractions)} (batch "
        f"{config['batch_size']}, at least {config['min_steps']} steps). Difference rows: mean accuracy points.\n\n"
        + common.markdown_table(header, table)
        + f"\n{len(records)} runs, wall time {common.fmt_duration(wall)} (sum of the runs' own times "
        f"{common.fmt_duration(sum(r['seconds'] for r in records))}).\n"
    )


def plot(rows, config, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.2, 4.4))
    for method in dict.fromkeys(r["method"] for r in rows):
        mrows = sorted((r for r in rows if r["method"] == method), key=lambda r: r["train_fraction"])
        style = common.method_style(method)
        ax.errorbar([100 * r["train_fraction"] for r in mrows], [100 * r["accuracy"][0] for r in mrows],
                    yerr=[100 * r["accuracy"][1] for r in mrows], marker=style["marker"], capsize=3,
                    label=mrows[0]["label"], linestyle="-" if method != "surm:toeplitz" else "--")
    ax.set_xscale("log")
    ax.set_xlabel(f"% of the {nlp.DATASET_NAMES.get(config['dataset'], config['dataset'])} training set (log)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Low-resource fine-tuning")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
