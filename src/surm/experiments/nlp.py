"""Text classification with MiniLM (the paper's Table 5 analog, scaled to a 2-core CPU).

all-MiniLM-L6-v2 fine-tuned on Rotten Tomatoes, the 2016 election tweets and Reuters R8 with
full fine-tuning, head only, BitFit, LoRA r = 1/4/8, Houlsby and Pfeiffer bottleneck adapters,
SURM parallel (every family) and SURM serial adapters; mean ± std over seeds; test accuracy
(and macro-F1, which matters on the imbalanced R8) against trainable parameters.

Presets:

* ``smoke``: a random 2-layer BERT, a few dozen examples; seconds (tests).
* ``quick``: MiniLM on Rotten Tomatoes, head only / LoRA r=8 / SURM circulant / SURM
  Toeplitz, one seed (the README's main command; a few minutes).
* ``full``: every method on Rotten Tomatoes (20 % of the training set: 2,040 sentences, 128
  steps at batch 16) and a core subset on the tweets (20 %) and R8 (25 %), 3 seeds, up to
  1,000 test examples (see docs/results.md for the run time). Its Rotten Tomatoes seed-0 runs
  of head only, LoRA r=8 and SURM circulant / Toeplitz are the ``quick`` preset's runs.

Writes ``nlp.json`` (config, aggregated rows, every run record), ``nlp.md`` (tables) and
``nlp.png`` (accuracy against trainable parameters, one panel per data set).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import common

DATASET_NAMES = {"rotten_tomatoes": "Rotten Tomatoes", "election_tweets": "election tweets", "r8": "R8"}

ALL_METHODS = [
    "full", "head", "bitfit", "lora:1", "lora:4", "lora:8", "houlsby:32", "pfeiffer:24",
    "surm:circulant", "surm:skew_circulant", "surm:toeplitz", "surm:symmetric_toeplitz", "surm:kronecker",
    "surm:ldr:rank=1", "surm:circulant:serial", "surm:toeplitz:serial",
]
CORE_METHODS = ["full", "head", "lora:8", "surm:circulant", "surm:toeplitz"]
#: methods whose merged query/value changes are saved for the CKA experiment
DELTA_KINDS = ("full", "lora", "surm")

PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(
        model="tiny-bert",
        methods={"rotten_tomatoes": ["head", "lora:2", "surm:circulant", "surm:toeplitz:serial"]},
        seeds=[0], train_fraction={"rotten_tomatoes": 0.005}, n_eval=32, epochs=1.0, batch_size=16, threads=1,
    ),
    "quick": dict(
        model="minilm",
        methods={"rotten_tomatoes": ["head", "lora:8", "surm:circulant", "surm:toeplitz"]},
        seeds=[0], train_fraction={"rotten_tomatoes": 0.2}, n_eval=1000, epochs=1.0, batch_size=16, threads=None,
    ),
    "full": dict(
        model="minilm",
        methods={"rotten_tomatoes": ALL_METHODS, "election_tweets": CORE_METHODS, "r8": CORE_METHODS},
        seeds=[0, 1, 2], train_fraction={"rotten_tomatoes": 0.2, "election_tweets": 0.2, "r8": 0.25},
        n_eval=1000, epochs=1.0, batch_size=16, threads=None,
    ),
}
for _config in PRESETS.values():
    _config.update(lr=None, store=None, fresh=False, progress=True)


def base_spec(config: dict[str, Any], dataset: str) -> common.RunSpec:
    """The run spec shared by every method and seed of ``dataset`` under ``config``."""
    return common.RunSpec(
        dataset=dataset, method="head", model=config["model"], train_fraction=config["train_fraction"][dataset],
        n_eval=config["n_eval"], epochs=config["epochs"], batch_size=config["batch_size"],
    )


def specs(config: dict[str, Any]) -> list[common.RunSpec]:
    """Every run of the experiment, data set by data set, method by method, seed by seed."""
    out = []
    for dataset, methods in config["methods"].items():
        base = base_spec(config, dataset)
        for method in methods:
            lr = common.preset_lr(config, method)
            save = method.split(":")[0] in DELTA_KINDS and ":serial" not in method and dataset == "rotten_tomatoes"
            for seed in config["seeds"]:
                out.append(base.replace(method=method, seed=seed, lr=lr, save_deltas=save and config["model"] != "tiny-bert"))
    return out


def run(out_dir: Path | str, preset: str = "full", **overrides: Any) -> dict[str, Any]:
    """Run the text experiment into ``out_dir``; returns ``{"rows", "markdown", "files", ...}``.

    Overrides: any preset key, e.g. ``seeds=[0]``, ``methods={"r8": ["head", "lora:8"]}``,
    ``lr=3e-3`` or ``lr={"surm:circulant": 1e-2}``, ``store=...`` (the run cache, default
    ``<out_dir>/../runs``), ``fresh=True`` (retrain cached runs).
    """
    config = common.resolve_preset("nlp", PRESETS, preset, overrides)
    out_dir = Path(out_dir)
    records, wall = common.run_preset(specs(config), config, out_dir, "nlp")
    rows = common.aggregate(records)
    markdown = report(rows, config, preset, wall, records)
    png = out_dir / "nlp.png"
    out_dir.mkdir(parents=True, exist_ok=True)
    panels = {DATASET_NAMES.get(d, d): [r for r in rows if r["dataset"] == d] for d in config["methods"]}
    common.plot_accuracy_vs_params(panels, png, title=f"MiniLM fine-tuning ({preset} preset)")
    if "r8" in config["methods"]:
        common.plot_accuracy_vs_params({"R8": panels["R8"]}, out_dir / "nlp_r8_f1.png", metric="macro_f1")
    payload = {"experiment": "nlp", "preset": preset, "config": config, "wall_seconds": wall,
               "run_seconds": sum(r["seconds"] for r in records), "rows": rows, "runs": records}
    files = common.write_outputs(out_dir, "nlp", payload, markdown)
    return {"experiment": "nlp", "rows": rows, "markdown": markdown, "wall_seconds": wall,
            "files": [*files.values(), png]}


def report(rows: list[dict[str, Any]], config: dict[str, Any], preset: str, wall: float,
           records: list[dict[str, Any]]) -> str:
    """Markdown: one table per data set (methods by parameters) and the run sizes."""
    lines = [f"# MiniLM text classification ({preset} preset)\n"]
    for dataset in config["methods"]:
        drows = [r for r in rows if r["dataset"] == dataset]
        lora8 = next((r["adapter_params"] for r in drows if r["method"] == "lora:8"), None)
        r0 = drows[0]
        lines.append(
            f"\n## {DATASET_NAMES.get(dataset, dataset)}: {r0['n_train']} training examples, "
            f"{r0['n_test']} test, seeds {r0['seeds']}\n"
        )
        header = ["method", "params (no head)", "vs LoRA r=8", "lr", "test accuracy %", "macro-F1 %", "train s"]
        table = []
        std = len(r0["seeds"]) > 1
        for r in drows:
            ratio = f"{r['adapter_params'] / lora8:.3f}x" if lora8 and r["adapter_params"] else "—"
            table.append([r["label"], common.fmt_params(r["adapter_params"]), ratio, common.fmt_lr(r),
                          common.fmt_pct(r["accuracy"], std), common.fmt_pct(r["macro_f1"], std),
                          f"{r['train_seconds'][0]:.0f}"])
        lines.append(common.markdown_table(header, table))
        lines += [f"\n- {line}" for line in common.versus(drows, "lora:8")]
        lines.append("\n" if lora8 else "")
    lines.append(
        f"\nTest accuracy: mean ± sample std over seeds (the mean alone for one seed). Parameters exclude the classification head, which every method "
        f"trains ({'; '.join(_head_sizes(records))}). {len(records)} runs; wall time {common.fmt_duration(wall)} "
        f"(sum of the runs' own times {common.fmt_duration(sum(r['seconds'] for r in records))}; the wall time is "
        f"less when runs came from the store). Max sequence length 64, batch {config['batch_size']}, {config['epochs']:g} epoch(s), AdamW, "
        f"linear schedule with 6 % warm-up, weight decay 0.01.\n"
    )
    return "".join(lines)


def _head_sizes(records: list[dict[str, Any]]) -> list[str]:
    sizes = {}
    for r in records:
        if r["method"] == "head":
            sizes[r["spec"]["dataset"]] = r["trainable_params"]
    return [f"{DATASET_NAMES.get(d, d)} head {n:,}" for d, n in sizes.items()]
