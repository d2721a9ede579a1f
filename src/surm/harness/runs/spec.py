"""One fine-tuning run: what it is (:class:`RunSpec`) and what it leaves (:class:`RunRecord`).

A spec names the data (a packaged data set or a user's file), the model (a catalog name or a
local directory; by default the data's modality's), the method and every setting that changes
the result. Classifiers (text, images) and causal LMs (prompt -> response pairs) are runs alike;
doing one is :func:`surm.harness.runs.execution.execute`, keeping them between processes the job
of :mod:`.store`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

from surm.harness import data as surm_data
from surm.harness import methods as surm_methods
from surm.harness.methods import Method
from surm.harness.models import catalog

from .provenance import key_version

__all__ = ["RunRecord", "RunSpec", "adapter_json", "steps_setting"]

#: Fields added after the first records were written: left out of :meth:`RunSpec.identity` at
#: these defaults, so the keys of the runs that do not use them stay as they were.
_LATER_FIELDS = {"adapter": None, "eval_batch_size": None, "eval_points": 0, "n_generate": 0, "max_new_tokens": 40,
                 "dtype": "float32"}
#: The dtypes a run's base model can be loaded in.
DTYPES = ("float32", "bfloat16")


def steps_setting(epochs: float, max_steps: int | None, min_steps: int = 0) -> tuple[float, int]:
    """``(epochs, min_steps)`` of a run: ``max_steps`` (the ``--max-steps`` of transformers)
    trains exactly that many steps whatever the epochs (steps = max(ceil(0 * batches),
    min_steps)); otherwise ``epochs``, and at least ``min_steps``. ValueError on a count below 1
    or ``min_steps`` above ``max_steps``."""
    if max_steps is None:
        if min_steps < 0:
            raise ValueError(f"min_steps must be 0 or more, got {min_steps}")
        return epochs, min_steps
    if max_steps < 1:
        raise ValueError(f"max_steps must be at least 1, got {max_steps}")
    if min_steps > max_steps:
        raise ValueError(f"min_steps {min_steps} exceeds max_steps {max_steps}")
    return 0.0, max_steps


@dataclass(frozen=True)
class RunSpec:
    """One fine-tuning run.

    Args:
        dataset: a data set of :func:`surm.harness.data.names` or the path of a user's file
            (:mod:`surm.harness.data.files`); its modality decides the default model.
        method: a :class:`surm.harness.methods.Method` (a method string is parsed once, here).
        seed: head and adapter initialisation, data order and the training subsample.
        lr: the learning rate; None takes the default: the method's
            (:func:`surm.harness.methods.default_lr`), or for an :attr:`adapter`
            :func:`surm.recommended_lr` of that config, whatever the data.
        epochs, min_steps: steps = max(ceil(epochs * batches per epoch), min_steps)
            (:func:`steps_setting` turns a ``max_steps`` into these).
        n_train: keep about that many training examples (``train_fraction`` instead keeps that
            fraction): stratified for classifiers, at random for prompt -> response pairs.
        n_eval: cap validation and test at that many examples: a fixed random subset, the same
            for every method and seed.
        max_length: tokens per text (prompt -> response pairs: the prompt and response together).
        model: a :data:`surm.harness.models.catalog.CATALOG` name or alias, a local transformers
            directory, or None: the default model of the data's modality.
        eval_splits: the splits scored after training.
        save_deltas: also return the merged query/value weight changes (not part of the key).
        head_lr: the head's learning rate; None takes the method's default
            (:func:`surm.harness.methods.default_head_lr`).
        adapter: a SURM adapter config as the JSON :func:`adapter_json` writes (e.g. a plan of
            :func:`surm.plan`); it replaces the method's adapter, and the method still gives the
            label. Part of the key (and, as a digest, of the slug).
        eval_batch_size: examples per evaluation batch (None: 128 for classifiers, 4 for
            causal LMs).
        eval_points: validation evaluations during training (causal LMs; the curve).
        n_generate: greedy generations from the first test prompts after training, with a
            check that the merged model gives the same (causal LMs).
        max_new_tokens: tokens per generation.
        dtype: the base model's dtype (:data:`DTYPES`); adapters and FFTs stay float32.
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
    eval_batch_size: int | None = None
    eval_points: int = 0
    n_generate: int = 0
    max_new_tokens: int = 40
    dtype: str = "float32"

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", surm_methods.parse(self.method))
        modality = surm_data.modality(self.dataset)  # ValueError naming the known data sets
        entry = catalog.entry(self.model, modality)  # ValueError: unknown model, or one for other data
        object.__setattr__(self, "model", entry.name)
        object.__setattr__(self, "eval_splits", tuple(self.eval_splits))
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if modality != surm_data.CAUSAL_LM and self.method.record.trains_nothing:
            raise ValueError(f"{self.method.name} trains nothing, and a classifier's new head is random: use head")
        if modality == surm_data.CAUSAL_LM and self.method.kind in ("head", "bitfit"):
            raise ValueError(f"{self.method.name} trains a classification head; a causal LM has none here (its LM "
                             f"head stays frozen): use an adapter method or full")
        for name, least in (("batch_size", 1), ("max_length", 2 if modality == surm_data.CAUSAL_LM else 1)):
            if getattr(self, name) < least:
                raise ValueError(f"{name} must be at least {least}, got {getattr(self, name)}")
        _ = self.effective_lr  # ValueError now, not after loading a model, if the method has no default

    @property
    def modality(self) -> str:
        """``"text"``, ``"image"`` or ``"causal_lm"``: what the data are."""
        return surm_data.modality(self.dataset)

    @property
    def model_entry(self) -> catalog.ModelEntry:
        return catalog.entry(self.model, self.modality)

    @property
    def profile(self):
        """Where the method puts its adapters on this model (the catalog's profile)."""
        return self.model_entry.profile

    @property
    def effective_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        if self.adapter is not None:
            from surm.peft.recommend import recommended_lr

            return recommended_lr(self.adapter_config())
        return surm_methods.default_lr(self.method, self.profile)

    @property
    def effective_head_lr(self) -> float | None:
        """The head's learning rate when it differs from :attr:`effective_lr`, else None."""
        if self.profile.head is None:
            return None
        head_lr = self.head_lr if self.head_lr is not None else surm_methods.default_head_lr(self.method, self.profile)
        return None if head_lr is None or head_lr == self.effective_lr else head_lr

    @property
    def effective_eval_batch_size(self) -> int:
        if self.eval_batch_size is not None:
            return self.eval_batch_size
        return 4 if self.modality == surm_data.CAUSAL_LM else 128

    @property
    def slug(self) -> str:
        """``<dataset>-<method>-s<seed>``, file-name safe (a user's file by its stem)."""
        method = self.method.name
        for old, new in ((":", "-"), ("=", ""), (",", "_"), ("(", ""), (")", ""), (" ", "")):
            method = method.replace(old, new)
        if self.adapter is not None:
            method += "-adapter" + hashlib.sha1(self.adapter.encode()).hexdigest()[:8]
        return f"{surm_data.short_name(self.dataset)}-{method}-s{self.seed}"

    def identity(self) -> dict[str, Any]:
        """Every field that changes the result, with the learning rates resolved (an explicit
        default is no change) and without ``save_deltas``; a user's data file by its path and
        the digest of its contents."""
        fields = {k: v for k, v in self.to_json().items() if k not in ("save_deltas", "head_lr")}
        for name, default in _LATER_FIELDS.items():
            if fields[name] == default:
                del fields[name]
        fields["lr"] = self.effective_lr
        if self.effective_head_lr is not None:
            fields["head_lr"] = self.effective_head_lr
        digest = surm_data.content_digest(self.dataset)
        if digest is not None:
            fields["data_digest"] = digest
        return fields

    @property
    def key(self) -> str:
        """``<slug>-<digest>``: the digest of :meth:`identity` and of the recipe version
        (:data:`surm.harness.runs.provenance.RECIPE`), so a stored run is read back as long as
        no change to the code alters what a run computes."""
        payload = {**self.identity(), "made_by": key_version()}
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

    ``metrics`` maps each evaluated split (``"test"``, ``"validation"``) to its metrics:
    ``{"accuracy", "macro_f1", "n"}`` for a classifier, ``{"loss", "perplexity", "tokens",
    "n"}`` for a causal LM; ``train`` is the training history (``losses``, ``steps``, ...);
    ``config`` the :class:`surm.harness.training.TrainConfig` used; ``code`` the
    :func:`~surm.harness.runs.provenance.code_version` that ran it and ``made_by`` its
    libraries. Causal LMs also keep ``curve`` (validation loss during training) and ``checks``
    (generations and the merge check). ``from_store`` (not written) says that the record was
    read back from a run store rather than trained now.
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
    curve: list[dict[str, float]] = dataclasses.field(default_factory=list)
    checks: dict[str, Any] = dataclasses.field(default_factory=dict)
    made_by: dict[str, str] = dataclasses.field(default_factory=dict)
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

    @property
    def seconds_per_step(self) -> float:
        return self.train_seconds / max(1, self.train["steps"])

    @property
    def diverged(self) -> bool:
        """A non-finite validation loss on the curve (causal LMs)."""
        return not all(math.isfinite(point["loss"]) for point in self.curve)

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
