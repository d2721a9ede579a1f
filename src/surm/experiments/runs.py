"""One fine-tuning run: what it is (:class:`RunSpec`), doing it (:func:`execute`) and what it
leaves (:class:`RunRecord`).

A record holds the test and validation metrics, the trainable parameter counts (all, and
without the classification head), train / eval seconds, peak memory, the loss curve and the
exact data sizes. With ``spec.save_deltas`` the run also returns the effective change
``W_finetuned - W0`` (merged adapters) of the attention query and value weights of every
layer, for the CKA and weight-drift analysis. Keeping runs between processes is the job of
:mod:`surm.experiments.store`.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


from surm import data as surm_data
from surm import methods as surm_methods
from surm.methods import Method
from surm.train import ImageBatcher, TextBatcher, TrainConfig, finetune

from . import provenance

__all__ = [
    "MODELS",
    "RunRecord",
    "RunSpec",
    "delta_names",
    "adapter_json",
    "execute",
    "load_splits",
    "make_model",
    "planning_batches",
]

#: Packaged models by name, with the modality of the data they take. Any other name is a local
#: transformers directory (text).
MODELS = {"minilm": "text", "tiny-bert": "text", "efficientnet": "image"}
#: The model a run uses when its spec names none.
DEFAULT_MODEL = {"text": "minilm", "image": "efficientnet"}

TINY_BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 max_position_embeddings=128)


@dataclass(frozen=True)
class RunSpec:
    """One fine-tuning run.

    Args:
        dataset: a text or image data set of :func:`surm.data.names`; its modality decides the
            default model and where adapters go (:data:`surm.methods.PROFILES`).
        method: a :class:`surm.methods.Method` (a method string is parsed once, here).
        seed: head and adapter initialisation, data order and the training subsample.
        lr: the learning rate; None takes the method's default (:func:`surm.methods.default_lr`).
        n_train: keep a stratified subsample of about that many training examples
            (``train_fraction`` instead keeps that fraction).
        n_eval: cap validation and test at a fixed subset of that many examples, the same for
            every method and seed.
        model: ``"minilm"`` (packaged all-MiniLM-L6-v2), ``"tiny-bert"`` (a random 2-layer BERT
            with the MiniLM tokenizer, for tests), ``"efficientnet"`` (packaged
            EfficientNet-Lite0), a local transformers directory, or None: the default model of
            the data set's modality (:data:`DEFAULT_MODEL`).
        save_deltas: also return the merged query/value weight changes (not part of the key).
        head_lr: the head's learning rate; None takes the method's default
            (:func:`surm.methods.default_head_lr`).
        adapter: a SURM adapter config as the JSON :func:`adapter_json` writes (e.g. a plan of
            :func:`surm.plan`); it replaces the method's adapter, and the method still gives the
            learning rates and the label. Part of the key (and, as a digest, of the slug).
    """

    dataset: str
    method: Method
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
    model: str | None = None
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    eval_splits: tuple[str, ...] = ("test",)
    device: str = "cpu"
    save_deltas: bool = False
    head_lr: float | None = None
    adapter: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", surm_methods.parse(self.method))
        modality = surm_data.modality(self.dataset)  # ValueError naming the known data sets
        if modality not in DEFAULT_MODEL:
            usable = [name for name in surm_data.names() if surm_data.modality(name) in DEFAULT_MODEL]
            raise ValueError(f"{self.dataset} is a {modality} data set (prompt -> response pairs), which runs do not "
                             f"take: they fine-tune classifiers, on {', '.join(usable)}")
        model = self.model or DEFAULT_MODEL[modality]
        if MODELS.get(model, "text") != modality:
            raise ValueError(f"model {model} takes {MODELS.get(model, 'text')} data, but {self.dataset} is a "
                             f"{modality} data set (its model: {DEFAULT_MODEL[modality]})")
        object.__setattr__(self, "model", model)
        object.__setattr__(self, "eval_splits", tuple(self.eval_splits))
        self.effective_lr  # ValueError now, not after loading a model, if the method has no default

    @property
    def modality(self) -> str:
        return surm_data.modality(self.dataset)

    @property
    def profile(self) -> surm_methods.Profile:
        return surm_methods.PROFILES[self.modality]

    @property
    def effective_lr(self) -> float:
        return self.lr if self.lr is not None else surm_methods.default_lr(self.method, self.profile)

    @property
    def effective_head_lr(self) -> float | None:
        """The head's learning rate when it differs from :attr:`effective_lr`, else None."""
        head_lr = self.head_lr if self.head_lr is not None else surm_methods.default_head_lr(self.method, self.profile)
        return None if head_lr == self.effective_lr else head_lr

    @property
    def slug(self) -> str:
        """``<dataset>-<method>-s<seed>``, file-name safe."""
        method = self.method.name
        for old, new in ((":", "-"), ("=", ""), (",", "_"), ("(", ""), (")", ""), (" ", "")):
            method = method.replace(old, new)
        if self.adapter is not None:
            method += "-adapter" + hashlib.sha1(self.adapter.encode()).hexdigest()[:8]
        return f"{self.dataset}-{method}-s{self.seed}"

    def identity(self) -> dict[str, Any]:
        """Every field that changes the result, with the learning rates resolved (an explicit
        default is no change) and without ``save_deltas``."""
        fields = {k: v for k, v in self.to_json().items() if k not in ("save_deltas", "head_lr", "adapter")}
        if self.adapter is not None:  # absent when None: the keys of runs without one stay as they were
            fields["adapter"] = self.adapter
        fields["lr"] = self.effective_lr
        if self.effective_head_lr is not None:
            fields["head_lr"] = self.effective_head_lr
        return fields

    @property
    def key(self) -> str:
        """``<slug>-<digest>``: the digest of :meth:`identity` and of the code and libraries that
        run it (:func:`surm.experiments.provenance.fingerprint`), so a stored run is never
        read back by changed code."""
        payload = {**self.identity(), "made_by": provenance.fingerprint()}
        digest = hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]
        return f"{self.slug}-{digest}"

    def replace(self, **changes: Any) -> RunSpec:
        return dataclasses.replace(self, **changes)

    def adapter_config(self):
        """The :class:`surm.SurmConfig` of :attr:`adapter` (a fresh one, ready to train), or None."""
        if self.adapter is None:
            return None
        from surm.peft import SurmConfig

        return SurmConfig(**json.loads(self.adapter), inference_mode=False)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["method"] = self.method.name
        out["eval_splits"] = list(self.eval_splits)
        return out

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> RunSpec:
        return cls(**payload)


@dataclass
class RunRecord:
    """What a run leaves (written as JSON by :meth:`to_json`, read by :meth:`from_json`).

    ``metrics`` maps each evaluated split (``"test"``, ``"validation"``) to its
    ``{"accuracy", "macro_f1", "n"}``; ``train`` is the training history (``losses``,
    ``steps``, ...); ``config`` the :class:`surm.train.TrainConfig` used; ``code`` the
    :func:`~surm.experiments.provenance.code_version` that ran it. ``from_store`` (not
    written) says that the record was read back from a run store rather than trained now.
    """

    spec: RunSpec
    key: str
    label: str
    lr: float
    head_lr: float | None
    trainable_params: int
    adapter_params: int
    optimizer_state_mb: float  # fp32 gradient + two AdamW moments per trainable parameter
    sizes: dict[str, int]
    num_labels: int
    label_names: list[str]
    train: dict[str, Any]
    metrics: dict[str, dict[str, float]]
    train_seconds: float
    train_cpu_seconds: float
    eval_seconds: float
    peak_memory_mb: float
    peak_memory_growth_mb: float
    memory_measure: str
    config: dict[str, Any]
    seconds: float
    cpu_seconds: float
    code: str
    from_store: bool = dataclasses.field(default=False, compare=False)

    @property
    def method(self) -> Method:
        return self.spec.method

    @property
    def test(self) -> dict[str, float]:
        return self.metrics["test"]

    @property
    def validation(self) -> dict[str, float]:
        return self.metrics["validation"]

    def to_json(self) -> dict[str, Any]:
        """The record as JSON: the spec, ``method``, each split's metrics under its name."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "from_store":
                continue
            if f.name == "metrics":
                out.update(self.metrics)
            elif f.name == "spec":
                out.update(spec=self.spec.to_json(), method=self.method.name)
            else:
                out[f.name] = getattr(self, f.name)
        return out

    @classmethod
    def from_json(cls, payload: dict[str, Any], from_store: bool = False) -> RunRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in payload.items() if k in names}
        fields["spec"] = RunSpec.from_json(payload["spec"])
        fields["metrics"] = {s: payload[s] for s in ("validation", "test") if s in payload}
        return cls(**fields, from_store=from_store)


def adapter_json(config) -> str:
    """A SURM adapter config as :attr:`RunSpec.adapter` holds it: its fields that differ from
    the defaults, as JSON with sorted keys (sets as sorted lists), so equal configs give equal
    keys whatever the PEFT version or field order."""
    from surm.peft import SurmConfig

    defaults = {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                for f in dataclasses.fields(SurmConfig) if f.init}
    fields = {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in config.to_dict().items()
              if k in defaults and k not in ("peft_type", "peft_version", "inference_mode") and v != defaults[k]}
    return json.dumps(fields, sort_keys=True)


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
    """``(model, batcher)`` for ``spec``; the new head is initialised from ``spec.seed``."""
    torch.manual_seed(spec.seed)
    if spec.model == "efficientnet":
        from surm.models import load_image_classifier

        model = surm_methods.plain_pointwise_convs(load_image_classifier(num_labels))
        return model, ImageBatcher(spec.image_size)
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
    return model, TextBatcher(tokenizer, spec.max_length)


def planning_batches(spec: RunSpec, n_batches: int, batch_size: int):
    """``(model, batches, loss_fn)`` for the planner (:func:`surm.plan`): ``spec``'s model on its
    device with its new head initialised from ``spec.seed``, ``n_batches`` batches of
    ``batch_size`` training examples drawn by ``spec.seed`` from the whole training set, and the
    loss (None for text: the batches carry their labels and the model returns its loss)."""
    splits = surm_data.load(spec.dataset, seed=spec.seed)
    train = splits.train
    rows = np.random.default_rng(spec.seed).permutation(len(train))[: n_batches * batch_size]
    inputs = train.inputs[rows] if isinstance(train.inputs, np.ndarray) else [train.inputs[i] for i in rows]
    subset = surm_data.Split(inputs=inputs, labels=train.labels[rows], ids=train.ids[rows])
    model, batcher = make_model(spec, splits.num_labels)
    model.to(spec.device)
    chunks = [np.arange(i, min(i + batch_size, len(subset))) for i in range(0, len(subset), batch_size)]
    batches = []
    for x, y in batcher.batches(subset, chunks):
        if isinstance(x, dict):
            batches.append({**{k: v.to(spec.device) for k, v in x.items()}, "labels": y.to(spec.device)})
        else:
            batches.append((x.to(spec.device), y.to(spec.device)))
    if spec.modality == "text":
        return model, batches, None
    return model, batches, lambda model, batch: torch.nn.functional.cross_entropy(model(batch[0]), batch[1])


def delta_names(model: torch.nn.Module) -> list[str]:
    """Names of the attention query and value weights of a BERT-like model, layer by layer."""
    return [n for n, _ in model.named_parameters() if n.endswith(("query.weight", "value.weight"))]


def _effective_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The plain model's state dict with parallel adapters merged (PEFT models are unloaded)."""
    import peft

    if isinstance(model, peft.PeftModel):
        model = model.merge_and_unload()
    return model.state_dict()


# --------------------------------------------------------------------------- running


def execute(spec: RunSpec, progress: bool = True, adapter=None) -> tuple[RunRecord, torch.nn.Module, dict[str, torch.Tensor]]:
    """Train and evaluate ``spec``: ``(record, trained model, deltas)``.

    ``adapter``, a PEFT config, replaces the method's own, and so does ``spec.adapter`` when
    ``adapter`` is None (the method still gives the learning rates and the label). ``deltas``
    maps the query/value weight names to ``W_finetuned - W0`` when ``spec.save_deltas``
    (parallel adapters merged into a copy), else it is empty.
    """
    start, cpu_start = time.perf_counter(), time.process_time()
    splits = load_splits(spec)
    model, batcher = make_model(spec, splits.num_labels)
    profile = spec.profile
    watched = delta_names(model) if spec.save_deltas else []
    base = {n: p.detach().clone() for n, p in model.named_parameters() if n in watched}
    if adapter is None and spec.adapter is not None:
        adapter = spec.adapter_config()
        if profile.head is not None:  # the new head trains in full
            adapter.modules_to_save = [*(adapter.modules_to_save or ()), profile.head]
    model = surm_methods.apply(model, spec.method if adapter is None else adapter, profile)
    config = TrainConfig(
        lr=spec.effective_lr, epochs=spec.epochs, min_steps=spec.min_steps, batch_size=spec.batch_size,
        weight_decay=spec.weight_decay, warmup_ratio=spec.warmup_ratio, seed=spec.seed, device=spec.device,
        progress=progress, freeze_norm_stats=True,  # BatchNorm uses its pretrained statistics, for every method
        head_lr=spec.effective_head_lr, head=profile.head,
    )
    trainable = surm_methods.count_trainable(model)
    result = finetune(model, batcher, splits, config, eval_splits=spec.eval_splits)
    record = RunRecord(
        spec=spec, key=spec.key, label=spec.method.label, lr=spec.effective_lr, head_lr=spec.effective_head_lr,
        trainable_params=trainable, adapter_params=surm_methods.count_trainable(model, exclude_head=profile.head),
        optimizer_state_mb=trainable * 12 / 2**20,
        sizes={"train": len(splits.train), "validation": len(splits.validation), "test": len(splits.test)},
        num_labels=splits.num_labels, label_names=list(splits.label_names), train=result["train"],
        metrics={name: result[name] for name in spec.eval_splits},
        train_seconds=result["train_seconds"], train_cpu_seconds=result["train_cpu_seconds"],
        eval_seconds=result["eval_seconds"], peak_memory_mb=result["peak_memory_mb"],
        peak_memory_growth_mb=result["peak_memory_growth_mb"], memory_measure=result["memory_measure"],
        config=result["config"], seconds=time.perf_counter() - start, cpu_seconds=time.process_time() - cpu_start,
        code=provenance.code_version(),
    )
    deltas = {}
    if watched:
        state = _effective_state(copy.deepcopy(model).cpu())
        deltas = {n: (state[n].float() - base[n].float().cpu()).contiguous() for n in watched}
    return record, model, deltas


