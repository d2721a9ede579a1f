"""Image classification with EfficientNet-Lite0 (the paper's Table 1 analog, scaled down).

No pretrained ViT or CLIP can be had offline, so the ImageNet-pretrained EfficientNet-Lite0 is
fine-tuned on MNIST-5k and scikit-learn's 8x8 digits (grey images resized to 64 px). Adapters
go on every 1x1 convolution (a linear map over channels: 16 expand, 16 project and the head
convolution); PEFT's LoRA is applied to the same layers. BatchNorm statistics stay frozen for
every method but full fine-tuning.

Writes ``vision.json``, ``vision.md`` and ``vision.png`` (accuracy against parameters).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from surm.methods import Method, parse

from . import plots, report
from .presets import Preset, lr_for, setting
from .runs import RunRecord, RunSpec
from .store import Runner

DATASET_NAMES = {"mnist": "MNIST-5k", "digits": "digits (8x8)"}
METHODS = ("head", "lora:4", "surm:circulant", "surm:toeplitz", "full")


@dataclass(frozen=True, kw_only=True)
class VisionPreset(Preset):
    """The image experiment's settings."""

    datasets: tuple[str, ...] = setting(("digits",), "image data sets (mnist, digits)")
    methods: tuple[Method, ...] = setting(METHODS, "method strings")
    seeds: tuple[int, ...] = setting((0,), "training seeds (mean ± std over them)")
    train_fraction: dict[str, float] = setting({"digits": 1.0}, "data set -> fraction of its training set")
    n_eval: int | None = setting(500, "cap validation and test at this many examples (None: all)")
    image_size: int = setting(64, "image side in pixels")
    batch_size: int = setting(32, "batch size")
    epochs: float = setting(1.0, "training epochs")
    lr: float | dict[Method, float] | None = setting(
        None, "learning rate: one for every method, {method: lr}, or None for each method's default")
    threads: int | None = setting(None, "torch threads (None: torch's default)")

    def __post_init__(self) -> None:
        super().__post_init__()
        missing = [d for d in self.datasets if d not in self.train_fraction]
        if missing:
            raise ValueError(f"train_fraction: give one for {', '.join(missing)}")


PRESETS: dict[str, VisionPreset] = {
    "smoke": VisionPreset(name="smoke", methods=("head", "lora:2", "surm:circulant"), train_fraction={"digits": 0.02},
                          n_eval=16, image_size=32, batch_size=8, threads=1),
    "quick": VisionPreset(name="quick", methods=("head", "lora:4", "surm:circulant", "full")),
    "full": VisionPreset(name="full", datasets=("mnist", "digits"), seeds=(0, 1, 2),
                         train_fraction={"mnist": 0.25, "digits": 1.0}),
}


def specs(config: VisionPreset) -> list[RunSpec]:
    """Every run: data set by data set, method by method, seed by seed."""
    out = []
    for dataset in config.datasets:
        base = RunSpec(dataset=dataset, method=parse("head"), model="efficientnet",
                       train_fraction=config.train_fraction[dataset], n_eval=config.n_eval,
                       image_size=config.image_size, batch_size=config.batch_size, epochs=config.epochs)
        for method in config.methods:
            out += [base.replace(method=method, seed=seed, lr=lr_for(config.lr, method)) for seed in config.seeds]
    return out


def run(config: VisionPreset, out_dir: Path, runner: Runner) -> report.Outcome:
    """Run the vision experiment into ``out_dir``."""
    records, wall = runner.run_all(specs(config), "vision", config.threads)
    rows = report.aggregate(records)
    markdown = tables(rows, config, wall, records)
    out_dir.mkdir(parents=True, exist_ok=True)
    panels = {}
    for d in config.datasets:
        drows = [r for r in rows if r.dataset == d]
        panels[f"{DATASET_NAMES.get(d, d)}, {drows[0].n_train:,} training images"] = drows
    png = plots.accuracy_vs_params(
        panels, out_dir / "vision.png",
        title=f"EfficientNet-Lite0 fine-tuned on digits ({config.name} preset): test accuracy against trainable parameters")
    payload = {"experiment": "vision", "preset": config.name, "config": config, "wall_seconds": wall,
               "run_seconds": sum(r.seconds for r in records), "rows": rows, "runs": records}
    return report.write(out_dir, "vision", payload, markdown, [png])


def tables(rows: list[report.Row], config: VisionPreset, wall: float, records: list[RunRecord]) -> str:
    """Markdown: methods by data sets."""
    datasets = config.datasets
    methods = list(dict.fromkeys(r.method for r in rows))
    cell = {(r.dataset, r.method): r for r in rows}
    header = ["method", "params (no head)", "lr"] + [
        f"{DATASET_NAMES.get(d, d)} ({cell[(d, methods[0])].n_train} train / {cell[(d, methods[0])].n_test} test)"
        for d in datasets
    ] + ["train s / run"]
    table = []
    for m in methods:
        first = cell[(datasets[0], m)]
        stored = sum(cell[(d, m)].stored for d in datasets)
        total = sum(len(cell[(d, m)].seeds) for d in datasets)
        table.append([first.label + report.stored_mark(stored, total), report.fmt_params(first.adapter_params),
                      report.fmt_lr(first.lr, first.head_lr)]
                     + [report.fmt_pct(cell[(d, m)].accuracy) for d in datasets]
                     + [f"{first.train_seconds[0]:.0f}"])
    head = next((f"{r.trainable_params:,} parameters, " for r in rows if r.method.kind == "head"), "")
    return (
        f"# EfficientNet-Lite0 image classification ({config.name} preset)\n\n"
        f"Test accuracy (%), mean ± std over seeds {list(config.seeds)}; {config.image_size} px, batch "
        f"{config.batch_size}, {config.epochs:g} epoch(s). Adapters on the 32 pointwise (1x1) convolutions; "
        f"parameters exclude the classification head ({head}trained by every method).\n\n"
        + report.markdown_table(header, table)
        + f"\n{len(records)} runs, wall time {report.fmt_duration(wall)} (sum of the runs' own times "
        f"{report.fmt_duration(sum(r.seconds for r in records))}).\n"
        + report.stored_note(records)
    )
