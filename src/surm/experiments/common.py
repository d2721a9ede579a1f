"""What the fine-tuning experiments share: one cached training run, presets, tables and plots.

A :class:`RunSpec` names one fine-tuning run (data set and sizes, model, method, seed,
optimisation). :func:`run_one` performs it and returns a JSON-able record; with a ``store``
directory the record is written to ``store/<key>.json`` and later calls with an identical spec
read it back instead of training again, so experiments share runs (``cka`` reuses the
Rotten Tomatoes runs of ``nlp`` when both use the same store, by default ``<out>/../runs``).

Records hold the test and validation metrics, trainable parameter counts (all, and without
the classification head), train / eval seconds, peak memory, the loss curve and the exact
data sizes. With ``spec.save_deltas`` the run also saves ``store/<key>.deltas.safetensors``:
the effective change ``W_finetuned - W0`` (merged adapters) of the attention query and value
weights of every layer, for the CKA and weight-drift analysis.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import surm
from surm import data as surm_data
from surm import methods as surm_methods
from surm.train import ImageBatcher, TextBatcher, TrainConfig, finetune

__all__ = [
    "RunSpec",
    "aggregate",
    "delta_names",
    "load_deltas",
    "load_splits",
    "make_model",
    "markdown_table",
    "mean_std",
    "resolve_preset",
    "run_many",
    "execute",
    "run_one",
    "write_outputs",
]

TINY_BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 max_position_embeddings=128)


@dataclass(frozen=True)
class RunSpec:
    """One fine-tuning run.

    Sizes: ``n_train`` keeps a stratified subsample of about that many training examples
    (``train_fraction`` instead keeps that fraction); ``n_eval`` caps validation and test at a
    fixed subset of that many examples, the same for every method and seed.
    ``model`` is ``"minilm"`` (packaged all-MiniLM-L6-v2), ``"tiny-bert"`` (a random
    2-layer BERT with the MiniLM tokenizer, for tests), ``"efficientnet"`` (packaged
    EfficientNet-Lite0) or a local transformers directory. ``lr=None`` takes the method's
    default (:func:`surm.methods.default_lr`).
    """

    dataset: str
    method: str
    seed: int = 0
    lr: float | None = None
    epochs: float = 1.0
    min_steps: int = 0
    batch_size: int = 16
    n_train: int | None = None
    train_fraction: float | None = None
    n_eval: int | None = 1000
    max_length: int = 64
    image_size: int = 64
    model: str = "minilm"
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    eval_splits: tuple[str, ...] = ("test",)
    device: str = "cpu"
    save_deltas: bool = False
    head_lr: float | None = None  # None: the method's default (surm.methods.default_head_lr)

    @property
    def key(self) -> str:
        """A file-name-safe key of everything that changes the result (not ``save_deltas``)."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("save_deltas", "head_lr")}
        fields["method"] = surm_methods.parse(self.method).name
        fields["lr"] = self.effective_lr
        if self.effective_head_lr is not None:  # absent otherwise: keys of runs from before head_lr stay valid
            fields["head_lr"] = self.effective_head_lr
        fields["version"] = surm.__version__
        digest = hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]
        return f"{self.slug}-{digest}"

    @property
    def slug(self) -> str:
        """``<dataset>-<method>-s<seed>``, file-name safe."""
        method = surm_methods.parse(self.method).name
        for old, new in ((":", "-"), ("=", ""), (",", "_"), ("(", ""), (")", ""), (" ", "")):
            method = method.replace(old, new)
        return f"{self.dataset}-{method}-s{self.seed}"

    @property
    def profile(self) -> surm_methods.Profile:
        return surm_methods.IMAGE if self.model == "efficientnet" else surm_methods.TEXT

    @property
    def effective_lr(self) -> float:
        return self.lr if self.lr is not None else surm_methods.default_lr(self.method, self.profile)

    @property
    def effective_head_lr(self) -> float | None:
        """The head's learning rate when it differs from :attr:`effective_lr`, else None."""
        head_lr = self.head_lr if self.head_lr is not None else surm_methods.default_head_lr(self.method, self.profile)
        return None if head_lr == self.effective_lr else head_lr

    def replace(self, **changes: Any) -> RunSpec:
        return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------------- data and models


def load_splits(spec: RunSpec) -> surm_data.DatasetSplits:
    """The data of ``spec``: train subsampled by ``n_train`` / ``train_fraction`` (chosen by
    ``spec.seed``), validation and test capped at ``n_eval`` (a fixed subset, seed 0)."""
    full = surm_data.load(spec.dataset, seed=spec.seed)
    fraction = spec.train_fraction
    if fraction is None and spec.n_train is not None:
        fraction = min(1.0, spec.n_train / len(full.train))
    splits = full if fraction in (None, 1.0) else surm_data.load(spec.dataset, seed=spec.seed, train_fraction=fraction)
    if spec.n_eval is None:
        return splits
    return dataclasses.replace(
        splits, validation=_fixed_subset(splits.validation, spec.n_eval), test=_fixed_subset(splits.test, spec.n_eval)
    )


def _fixed_subset(split: surm_data.Split, n: int) -> surm_data.Split:
    if n >= len(split):
        return split
    rows = np.sort(np.random.default_rng(0).permutation(len(split))[:n])
    inputs = split.inputs[rows] if isinstance(split.inputs, np.ndarray) else [split.inputs[i] for i in rows]
    return surm_data.Split(inputs=inputs, labels=split.labels[rows], ids=split.ids[rows])


def make_model(spec: RunSpec, num_labels: int):
    """``(model, batcher, profile)`` for ``spec``; the new head is initialised from ``spec.seed``."""
    torch.manual_seed(spec.seed)
    if spec.model == "efficientnet":
        from surm.models import load_image_classifier

        model = surm_methods.plain_pointwise_convs(load_image_classifier(num_labels))
        return model, ImageBatcher(spec.image_size), surm_methods.IMAGE
    from surm.models import load_text_classifier, packaged_text_model_path

    if spec.model == "tiny-bert":
        from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

        tokenizer = AutoTokenizer.from_pretrained(str(packaged_text_model_path()), local_files_only=True)
        config = BertConfig(vocab_size=tokenizer.vocab_size, num_labels=num_labels, **TINY_BERT)
        model = BertForSequenceClassification(config)
    else:
        import transformers

        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # the "newly initialised head" load report
        transformers.logging.disable_progress_bar()
        try:
            model, tokenizer = load_text_classifier(num_labels, None if spec.model == "minilm" else spec.model)
        finally:
            transformers.logging.set_verbosity(verbosity)
            transformers.logging.enable_progress_bar()
    return model, TextBatcher(tokenizer, spec.max_length), surm_methods.TEXT


def delta_names(model: torch.nn.Module) -> list[str]:
    """Names of the attention query and value weights of a BERT-like model, layer by layer."""
    return [n for n, _ in model.named_parameters() if n.endswith(("query.weight", "value.weight"))]


def _effective_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The plain model's state dict with parallel adapters merged (PEFT models are unloaded)."""
    import peft

    if isinstance(model, peft.PeftModel):
        model = model.merge_and_unload()
    return model.state_dict()


# --------------------------------------------------------------------------- runs


def execute(spec: RunSpec, progress: bool = True) -> tuple[dict[str, Any], torch.nn.Module, dict[str, torch.Tensor]]:
    """Train and evaluate ``spec`` (no store): ``(record, trained model, deltas)``.

    ``deltas`` maps the query/value weight names to ``W_finetuned - W0`` when
    ``spec.save_deltas`` (parallel adapters merged into a copy), else it is empty.
    """
    start, cpu_start = time.perf_counter(), time.process_time()
    splits = load_splits(spec)
    model, batcher, profile = make_model(spec, splits.num_labels)
    method = surm_methods.parse(spec.method)
    watched = delta_names(model) if spec.save_deltas else []
    base = {n: p.detach().clone() for n, p in model.named_parameters() if n in watched}
    model = surm_methods.apply(model, method, profile)
    config = TrainConfig(
        lr=spec.effective_lr, epochs=spec.epochs, min_steps=spec.min_steps, batch_size=spec.batch_size,
        weight_decay=spec.weight_decay, warmup_ratio=spec.warmup_ratio, seed=spec.seed, device=spec.device,
        progress=progress, freeze_norm_stats=True,  # BatchNorm uses its pretrained statistics, for every method
        head_lr=spec.effective_head_lr, head=profile.head,
    )
    trainable = surm_methods.count_trainable(model)
    result = finetune(model, batcher, splits, config, eval_splits=spec.eval_splits)
    record = {
        "key": spec.key,
        "spec": dataclasses.asdict(spec),
        "method": method.name,
        "label": method.label,
        "lr": spec.effective_lr,
        "head_lr": spec.effective_head_lr,
        "trainable_params": trainable,
        "adapter_params": surm_methods.count_trainable(model, exclude_head=profile.head),
        "optimizer_state_mb": trainable * 12 / 2**20,  # fp32 gradient + two AdamW moments
        "sizes": {"train": len(splits.train), "validation": len(splits.validation), "test": len(splits.test)},
        "num_labels": splits.num_labels,
        "label_names": list(splits.label_names),
        **result,
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu_start,
    }
    deltas = {}
    if watched:
        state = _effective_state(copy.deepcopy(model).cpu())
        deltas = {n: (state[n].float() - base[n].float().cpu()).contiguous() for n in watched}
    return record, model, deltas


def run_one(spec: RunSpec, store: Path | None = None, progress: bool = True, fresh: bool = False) -> dict[str, Any]:
    """:func:`execute` ``spec``, or read its record from ``store`` if it was run before.

    With a store, the record goes to ``store/<key>.json`` and, with ``spec.save_deltas``, the
    weight changes to ``store/<key>.deltas.safetensors``. ``fresh`` ignores stored records.
    """
    path = None if store is None else Path(store) / f"{spec.key}.json"
    deltas_path = None if path is None else path.with_suffix(".deltas.safetensors")
    if path is not None and path.is_file() and not fresh and (not spec.save_deltas or deltas_path.is_file()):
        return json.loads(path.read_text())
    record, _, deltas = execute(spec, progress)
    if store is not None:
        Path(store).mkdir(parents=True, exist_ok=True)
        if deltas:
            from safetensors.torch import save_file

            save_file(deltas, str(deltas_path))
        path.write_text(json.dumps(record, indent=1) + "\n")
    return record


def load_deltas(spec: RunSpec, store: Path) -> dict[str, torch.Tensor]:
    """The saved ``W_finetuned - W0`` of a run made with ``save_deltas=True``."""
    from safetensors.torch import load_file

    return load_file(str(Path(store) / f"{spec.key}.deltas.safetensors"))


def run_many(specs: Sequence[RunSpec], store: Path | None, desc: str, progress: bool = True,
             fresh: bool = False) -> list[dict[str, Any]]:
    """:func:`run_one` for every spec, with an outer progress bar; records in spec order."""
    from tqdm.auto import tqdm

    records = []
    bar = tqdm(specs, desc=desc, disable=not progress, dynamic_ncols=True)
    for spec in bar:
        bar.set_postfix_str(f"{spec.dataset} {spec.method} seed {spec.seed}")
        records.append(run_one(spec, store, progress=progress, fresh=fresh))
    return records


def run_preset(
    specs: Sequence[RunSpec], config: dict[str, Any], out_dir: Path, desc: str
) -> tuple[list[dict[str, Any]], float]:
    """:func:`run_many` under a resolved preset's ``threads``, ``store``, ``progress`` and
    ``fresh``; returns ``(records, wall seconds)``."""
    start = time.perf_counter()
    with threads(config["threads"]):
        records = run_many(specs, store_dir(out_dir, config["store"]), desc, config["progress"], config["fresh"])
    return records, time.perf_counter() - start


# --------------------------------------------------------------------------- presets


def preset_lr(config: dict[str, Any], method: str) -> float | None:
    """The learning rate a preset's ``lr`` override gives ``method``: one value for every method,
    a ``{method: lr}`` dict, or None (the method's default)."""
    return config["lr"].get(method) if isinstance(config["lr"], dict) else config["lr"]


@contextlib.contextmanager
def threads(n: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)`` (``None``: leave the default)."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def resolve_preset(name: str, presets: dict[str, dict[str, Any]], preset: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """``presets[preset]`` updated with ``overrides``; errors name the known presets / keys."""
    if preset not in presets:
        raise ValueError(f"{name}: unknown preset {preset!r}; presets: {', '.join(presets)}")
    config = dict(presets[preset])
    unknown = set(overrides) - set(config)
    if unknown:
        raise TypeError(f"{name}: unknown override(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(config))}")
    config.update(overrides)
    return config


def store_dir(out_dir: Path, store: str | Path | None) -> Path:
    """The run store: ``store`` if given, else ``<out_dir>/../runs`` (shared by experiments)."""
    return Path(store) if store is not None else Path(out_dir).resolve().parent / "runs"


# --------------------------------------------------------------------------- summaries


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = np.asarray(list(values), dtype=float)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def aggregate(records: Sequence[dict[str, Any]], by: Sequence[str] = ("dataset", "method")) -> list[dict[str, Any]]:
    """Group records by spec fields ``by`` (in first-seen order) and average over seeds.

    Each row: the ``by`` fields, ``label``, ``adapter_params``, ``trainable_params``, ``lr``,
    ``seeds``, and ``(mean, std)`` pairs of test ``accuracy`` and ``macro_f1``,
    ``train_seconds`` and ``peak_memory_growth_mb``.
    """
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        key = tuple(r["spec"][k] if k != "method" else r["method"] for k in by)
        groups.setdefault(key, []).append(r)
    rows = []
    for key, rs in groups.items():
        row = dict(zip(by, key))
        row.update(
            label=rs[0]["label"], adapter_params=rs[0]["adapter_params"], trainable_params=rs[0]["trainable_params"],
            lr=rs[0]["lr"], head_lr=rs[0].get("head_lr"), seeds=[r["spec"]["seed"] for r in rs], n_train=rs[0]["sizes"]["train"],
            n_test=rs[0]["sizes"]["test"],
            accuracy=mean_std(r["test"]["accuracy"] for r in rs),
            macro_f1=mean_std(r["test"]["macro_f1"] for r in rs),
            train_seconds=mean_std(r["train_seconds"] for r in rs),
            peak_memory_growth_mb=mean_std(r["peak_memory_growth_mb"] for r in rs),
        )
        rows.append(row)
    return rows


def fmt_lr(row: dict[str, Any]) -> str:
    """``"0.003"``, or ``"0.001 (head 0.1)"`` where the head has its own rate."""
    head = row.get("head_lr")
    return f"{row['lr']:g}" if head is None else f"{row['lr']:g} (head {head:g})"


def fmt_pct(pair: tuple[float, float], std: bool = True) -> str:
    """``(0.8123, 0.0112)`` -> ``"81.2 ± 1.1"`` (``"81.2"`` with ``std=False``)."""
    mean, sd = pair
    return f"{100 * mean:.1f} ± {100 * sd:.1f}" if std else f"{100 * mean:.1f}"


def versus(rows: Sequence[dict[str, Any]], reference: str, prefix: str = "surm:") -> list[str]:
    """One sentence per method starting with ``prefix``: its mean test accuracy against the
    ``reference`` method's, and its share of the reference's parameters."""
    ref = next((r for r in rows if r["method"] == reference), None)
    if ref is None or not ref["adapter_params"]:
        return []
    out = []
    for r in rows:
        if r["method"].startswith(prefix):
            gap = 100 * (r["accuracy"][0] - ref["accuracy"][0])
            ratio = ref["adapter_params"] / max(r["adapter_params"], 1)
            out.append(f"{r['label']}: {gap:+.1f} points against {ref['label']} with {ratio:.1f}x fewer parameters")
    return out


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub Markdown table; ``align`` is one character per column, ``l`` or ``r``."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(map(str, header)) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_outputs(out_dir: Path, name: str, payload: dict[str, Any], markdown: str) -> dict[str, Path]:
    """Write ``<name>.json`` and ``<name>.md`` into ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{name}.json", "markdown": out_dir / f"{name}.md"}
    paths["json"].write_text(json.dumps(payload, indent=1, default=_jsonable) + "\n")
    paths["markdown"].write_text(markdown)
    return paths


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def method_style(method: str) -> dict[str, Any]:
    """Matplotlib marker and colour by method kind, so every plot reads the same way."""
    kind = surm_methods.parse(method)
    colours = {"full": "black", "head": "grey", "bitfit": "tab:brown", "lora": "tab:blue", "houlsby": "tab:purple",
               "pfeiffer": "tab:pink"}
    if kind.kind == "surm":
        return {"color": "tab:red" if kind.placement == "parallel" else "tab:orange",
                "marker": "o" if kind.placement == "parallel" else "D"}
    return {"color": colours[kind.kind], "marker": {"lora": "s", "houlsby": "^", "pfeiffer": "v"}.get(kind.kind, "x")}


def plot_accuracy_vs_params(rows_by_panel: dict[str, list[dict[str, Any]]], path: Path, metric: str = "accuracy",
                            title: str = "") -> Path:
    """One panel per data set: test ``metric`` (mean ± std over seeds) against adapter
    parameters (log axis; the head, trained by all, left out; head-only drawn at 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(rows_by_panel.items())
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4), squeeze=False)
    for ax, (panel, rows) in zip(axes[0], panels):
        for row in rows:
            style = method_style(row["method"])
            mean, sd = row[metric]
            x = max(row["adapter_params"], 1)
            ax.errorbar(x, 100 * mean, yerr=100 * sd, fmt=style["marker"], color=style["color"], capsize=3, ms=6)
            ax.annotate(_short(row["method"]), (x, 100 * mean), textcoords="offset points", xytext=(4, 3), fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters without the head (log)")
        ax.set_ylabel(f"test {metric.replace('_', ' ')} (%)")
        ax.set_title(panel)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _short(method: str) -> str:
    return (method.replace("surm:", "").replace("symmetric_toeplitz", "sym_toep").replace("skew_circulant", "skew_circ")
            .replace(":parallel", "").replace(":serial", " (ser)"))


def fmt_duration(seconds: float) -> str:
    """``42 s`` below two minutes, else ``3.5 min``."""
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def fmt_params(n: int) -> str:
    return f"{n:,}"

