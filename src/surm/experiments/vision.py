"""Image classification with EfficientNet-Lite0 (the paper's Table 1 analog, scaled down).

No pretrained ViT or CLIP can be had offline, so the ImageNet-pretrained EfficientNet-Lite0 is
fine-tuned on MNIST-5k and scikit-learn's 8x8 digits (grey images resized to 64 px). Adapters
go on every 1x1 convolution (a linear map over channels: 16 expand, 16 project and the head
convolution); PEFT's LoRA is applied to the same layers. BatchNorm statistics stay frozen for
every method but full fine-tuning.

Writes ``vision.json``, ``vision.md`` and ``vision.png`` (accuracy against parameters).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import common

DATASET_NAMES = {"mnist": "MNIST-5k", "digits": "digits (8x8)"}
METHODS = ["head", "lora:4", "surm:circulant", "surm:toeplitz", "full"]

PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(datasets=["digits"], methods=["head", "lora:2", "surm:circulant"], seeds=[0],
                  train_fraction={"digits": 0.02}, n_eval=16, image_size=32, batch_size=8, epochs=1.0, threads=1),
    "quick": dict(datasets=["digits"], methods=["head", "lora:4", "surm:circulant", "full"], seeds=[0],
                  train_fraction={"digits": 1.0}, n_eval=500, image_size=64, batch_size=32, epochs=1.0, threads=None),
    "full": dict(datasets=["mnist", "digits"], methods=METHODS, seeds=[0, 1, 2],
                 train_fraction={"mnist": 0.25, "digits": 1.0}, n_eval=500, image_size=64, batch_size=32,
                 epochs=1.0, threads=None),
}
for _config in PRESETS.values():
    _config.update(lr=None, store=None, fresh=False, progress=True)


def specs(config: dict[str, Any]) -> list[common.RunSpec]:
    out = []
    for dataset in config["datasets"]:
        base = common.RunSpec(dataset=dataset, method="head", model="efficientnet",
                              train_fraction=config["train_fraction"][dataset], n_eval=config["n_eval"],
                              image_size=config["image_size"], batch_size=config["batch_size"], epochs=config["epochs"])
        for method in config["methods"]:
            lr = common.preset_lr(config, method)
            out += [base.replace(method=method, seed=seed, lr=lr) for seed in config["seeds"]]
    return out


def run(out_dir: Path | str, preset: str = "full", **overrides: Any) -> dict[str, Any]:
    """Run the vision experiment into ``out_dir``; returns ``{"rows", "markdown", "files", ...}``."""
    config = common.resolve_preset("vision", PRESETS, preset, overrides)
    out_dir = Path(out_dir)
    records, wall = common.run_preset(specs(config), config, out_dir, "vision")
    rows = common.aggregate(records)
    markdown = report(rows, config, preset, wall, records)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / "vision.png"
    panels = {DATASET_NAMES.get(d, d): [r for r in rows if r["dataset"] == d] for d in config["datasets"]}
    common.plot_accuracy_vs_params(panels, png, title=f"EfficientNet-Lite0 fine-tuning ({preset} preset)")
    payload = {"experiment": "vision", "preset": preset, "config": config, "wall_seconds": wall,
               "run_seconds": sum(r["seconds"] for r in records), "rows": rows, "runs": records}
    files = common.write_outputs(out_dir, "vision", payload, markdown)
    return {"experiment": "vision", "rows": rows, "markdown": markdown, "wall_seconds": wall,
            "files": [*files.values(), png]}


def report(rows, config, preset, wall, records) -> str:
    datasets = config["datasets"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cell = {(r["dataset"], r["method"]): r for r in rows}
    header = ["method", "params (no head)", "lr"] + [
        f"{DATASET_NAMES.get(d, d)} ({cell[(d, methods[0])]['n_train']} train / {cell[(d, methods[0])]['n_test']} test)"
        for d in datasets
    ] + ["train s / run"]
    table = []
    for m in methods:
        first = cell[(datasets[0], m)]
        table.append([first["label"], common.fmt_params(first["adapter_params"]), common.fmt_lr(first)]
                     + [common.fmt_pct(cell[(d, m)]["accuracy"]) for d in datasets]
                     + [f"{first['train_seconds'][0]:.0f}"])
    head = next((r["trainable_params"] for r in rows if r["method"] == "head"), None)
    return (
        f"# EfficientNet-Lite0 image classification ({preset} preset)\n\n"
        f"Test accuracy (%), mean ± std over seeds {config['seeds']}; {config['image_size']} px, batch "
        f"{config['batch_size']}, {config['epochs']:g} epoch(s). Adapters on the 32 pointwise (1x1) convolutions; "
        f"parameters exclude the classification head ({head:,} parameters, trained by every method).\n\n"
        + common.markdown_table(header, table)
        + f"\n{len(records)} runs, wall time {common.fmt_duration(wall)} (sum of the runs' own times "
        f"{common.fmt_duration(sum(r['seconds'] for r in records))}).\n"
    )
