"""Image classification with EfficientNet-Lite0 (the paper's Table 1 analog, scaled down).

No pretrained ViT or CLIP can be had offline, so the ImageNet-pretrained EfficientNet-Lite0 is
fine-tuned on MNIST-5k and scikit-learn's 8x8 digits (grey images resized to 64 px). Adapters
go on every 1x1 convolution (a linear map over channels: 16 expand, 16 project and the head
convolution); PEFT's LoRA is applied to the same layers. BatchNorm statistics stay frozen for
every method but full fine-tuning.

The ``full`` preset is the fair re-run: every method's learning rate is chosen on validation
from the same-size grid (:mod:`.selection`), SURM at its defaults against LoRA r=4 and LoRA
r=1 (SURM Toeplitz's parameter count on the same layers), PEFT's LoKr (the Kronecker baseline;
C3A, FourierFT and VeRA adapt Linear layers only) and the paper's other baselines that have a
meaning for a CNN.

Writes ``vision.json``, ``vision.md`` and ``vision.png`` (accuracy against parameters), and
with chosen rates ``vision_lr.png`` (validation accuracy over each grid).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from surm.harness.methods import Method, parse
from surm.harness.runs import Runner, RunRecord, RunSpec

from . import plots, report, selection
from .presets import Preset, lr_for, setting

DATASET_NAMES = {"mnist": "MNIST-5k", "digits": "digits (8x8)"}
METHODS = ("head", "lora:4", "surm:circulant", "surm:toeplitz", "full")
#: The fair re-run's methods: LoRA r=1 on every 1x1 convolution has 22,784 parameters, SURM
#: Toeplitz 22,752 and circulant 19,168; LoKr r=8 (KAdaptation) 15,093.
FAIR_METHODS = (
    "head", "bitfit", "lntuning", "lora:4", "lora:1", "lorafix:4", "houlsby:32", "adapterdrop:32", "lokr:8",
    "surm:circulant", "surm:toeplitz", "surm:kronecker", "surm:ldr", "full",
)
FAIR_FACTORS = (1 / 3, 1.0, 3.0)
FAIR_DEFAULTS = ("surm:circulant", "surm:toeplitz")


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
    lr_factors: tuple[float, ...] | None = setting(
        None, "choose each method's rate on validation (first seed) from default * factor for each factor, e.g. "
              "(1/3, 1, 3); None: train at lr / the default")
    at_default: tuple[Method, ...] = setting(
        (), "with lr_factors: methods also reported on every seed at their default rate")
    threads: int | None = setting(None, "torch threads (None: torch's default)")

    def __post_init__(self) -> None:
        super().__post_init__()
        missing = [d for d in self.datasets if d not in self.train_fraction]
        if missing:
            raise ValueError(f"train_fraction: give one for {', '.join(missing)}")
        if self.lr_factors is not None and self.lr is not None:
            raise ValueError("lr and lr_factors: give one (lr_factors chooses the rates on validation)")


PRESETS: dict[str, VisionPreset] = {
    "smoke": VisionPreset(name="smoke", methods=("head", "lora:2", "surm:circulant"), train_fraction={"digits": 0.02},
                          n_eval=16, image_size=32, batch_size=8, threads=1),
    "quick": VisionPreset(name="quick", methods=("head", "lora:4", "surm:circulant", "full")),
    "full": VisionPreset(name="full", datasets=("mnist", "digits"), methods=FAIR_METHODS, seeds=(0, 1, 2),
                         train_fraction={"mnist": 0.25, "digits": 1.0}, lr_factors=FAIR_FACTORS,
                         at_default=FAIR_DEFAULTS),
}


def base_spec(config: VisionPreset, dataset: str) -> RunSpec:
    """The run spec shared by every method and seed of ``dataset`` (scored on validation too when
    the rates are chosen there)."""
    splits = ("validation", "test") if config.lr_factors is not None else ("test",)
    return RunSpec(dataset=dataset, method=parse("head"), model="efficientnet",
                   train_fraction=config.train_fraction[dataset], n_eval=config.n_eval, image_size=config.image_size,
                   batch_size=config.batch_size, epochs=config.epochs, eval_splits=splits)


def specs(config: VisionPreset) -> list[RunSpec]:
    """Every run: data set by data set, method by method, seed by seed."""
    out = []
    for dataset in config.datasets:
        base = base_spec(config, dataset)
        for method in config.methods:
            out += [base.replace(method=method, seed=seed, lr=lr_for(config.lr, method)) for seed in config.seeds]
    return out


def run(config: VisionPreset, out_dir: Path, runner: Runner) -> report.Outcome:
    """Run the vision experiment into ``out_dir``."""
    chosen = None
    if config.lr_factors is None:
        records, wall = runner.run_all(specs(config), "vision", config.threads)
        rows = report.aggregate(records)
    else:
        bases = [base_spec(config, d).replace(method=m) for d in config.datasets for m in config.methods]
        chosen = selection.run_selected(runner, bases, config.lr_factors, config.seeds, "vision", config.threads,
                                        at_default=[m.name for m in config.at_default])
        records, wall = chosen.final + chosen.at_default, chosen.wall_seconds
        rows = selection.rows(chosen)
    markdown = tables(rows, config, wall, records, chosen)
    out_dir.mkdir(parents=True, exist_ok=True)
    panels = {}
    for d in config.datasets:
        drows = [r for r in rows if r.dataset == d]
        panels[f"{DATASET_NAMES.get(d, d)}, {drows[0].n_train:,} training images"] = drows
    png = plots.accuracy_vs_params(
        panels, out_dir / "vision.png",
        title=f"EfficientNet-Lite0 fine-tuned on digits ({config.name} preset): test accuracy against trainable "
              f"parameters")
    payload = {"experiment": "vision", "preset": config.name, "config": config, "wall_seconds": wall,
               "run_seconds": sum(r.seconds for r in records), "rows": rows, "runs": records}
    figures = [png]
    if chosen is not None:
        figures.append(selection.sensitivity_plot(
            chosen, {d: DATASET_NAMES.get(d, d) for d in config.datasets},
            f"EfficientNet-Lite0: learning-rate sensitivity, seed {config.seeds[0]} ({config.name} preset)",
            out_dir / "vision_lr.png"))
        payload.update(chosen.payload())
    return report.write(out_dir, "vision", payload, markdown, figures)


def tables(rows: list[report.Row], config: VisionPreset, wall: float, records: list[RunRecord],
           chosen: selection.Selection | None = None) -> str:
    """Markdown: methods by data sets (each data set's rate beside its accuracy when the rates
    were chosen on validation), then the learning-rate grids."""
    datasets = config.datasets
    methods = list(dict.fromkeys((r.method, r.label.endswith(selection.AT_DEFAULT)) for r in rows))
    cell = {(r.dataset, r.method, r.label.endswith(selection.AT_DEFAULT)): r for r in rows}
    first_of = {d: cell[(d, *methods[0])] for d in datasets}
    header = ["method", "params (no head)"]
    for d in datasets:
        header += ([f"lr {DATASET_NAMES.get(d, d)}"] if chosen is not None else []) + [
            f"{DATASET_NAMES.get(d, d)} ({first_of[d].n_train} train / {first_of[d].n_test} test)"]
    if chosen is None:
        header.insert(2, "lr")
    header.append("train s / run")
    std = len(config.seeds) > 1
    table = []
    for m in methods:
        cells = [cell[(d, *m)] for d in datasets]
        stored = sum(c.stored for c in cells)
        total = sum(len(c.seeds) for c in cells)
        line = [cells[0].label + report.stored_mark(stored, total), report.fmt_params(cells[0].adapter_params)]
        if chosen is None:
            line.append(report.fmt_lr(cells[0].lr, cells[0].head_lr))
        for c in cells:
            line += ([report.fmt_lr(c.lr, c.head_lr)] if chosen is not None else []) + [report.fmt_pct(c.accuracy, std)]
        table.append(line + [f"{cells[0].train_seconds[0]:.0f}"])
    head = next((f"{r.trainable_params:,} parameters, " for r in rows if r.method.kind == "head"), "")
    fair = ""
    if chosen is not None:
        fair = (f"Every method's learning rate was chosen on the validation split from the same-size grid default × "
                f"{', '.join(f'{f:.3g}' for f in config.lr_factors)} with seed {config.seeds[0]}; the other seeds "
                f"trained at the chosen rate. Test accuracy played no part in the choice.\n\n")
    grids = "".join(f"\n### {DATASET_NAMES.get(d, d)}\n" + selection.grid_table(chosen, d, config.seeds[0])
                    for d in datasets) if chosen is not None else ""
    return (
        f"# EfficientNet-Lite0 image classification ({config.name} preset)\n\n"
        + fair
        + f"Test accuracy (%), mean ± std over seeds {list(config.seeds)}; {config.image_size} px, batch "
        f"{config.batch_size}, {config.epochs:g} epoch(s). Adapters on the 32 pointwise (1x1) convolutions; "
        f"parameters exclude the classification head ({head}trained by every method).\n\n"
        + report.markdown_table(header, table)
        + f"\n{len(records)} runs, wall time {report.fmt_duration(wall)} (sum of the runs' own times "
        f"{report.fmt_duration(sum(r.seconds for r in records))}).\n"
        + report.stored_note(records)
        + grids
    )
