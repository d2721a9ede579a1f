"""A small, honest fine-tuning loop for sequence and image classifiers, with evaluation.

>>> batcher = TextBatcher(tokenizer, max_length=64)
>>> result = finetune(model, batcher, splits, TrainConfig(lr=3e-3, epochs=1))
>>> result["test"]["accuracy"], result["train_seconds"], result["peak_memory_growth_mb"]

* AdamW on the trainable parameters only (the head at its own rate with ``head_lr``), weight decay
  on all of them, a linear schedule with
  linear warm-up (6 % of the steps by default), gradient clipping at norm 1.
* Text batches are padded to the longest sequence in the batch (truncated at ``max_length``);
  training batches are grouped by length (shuffled pools of 50 batches sorted by length, as
  transformers' ``group_by_length``) and evaluation batches are sorted by length: far less
  padding, and no prediction changes.
* Image batches go through :func:`surm.harness.models.image_transform` one batch at a time.
* Metrics: accuracy and macro-F1 (the unweighted mean of per-class F1 over the classes that
  occur in the labels or the predictions).
* Memory: on CUDA, ``torch.cuda.max_memory_allocated``; on the CPU, the peak resident set size
  of the process during training, sampled every 20 ms from ``/proc/self/statm`` (falling back to
  ``getrusage``'s lifetime maximum), reported as growth over the resident size at the start.
"""

from __future__ import annotations

import math
import os
import re
import resource
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from surm.harness import progress
from surm.harness.data import DatasetSplits, Split

__all__ = [
    "ImageBatcher",
    "MemoryTracker",
    "TextBatcher",
    "TrainConfig",
    "classification_loss",
    "compute_context",
    "evaluate",
    "finetune",
    "length_grouped_batches",
    "logits",
    "num_steps",
    "predict",
    "scores",
    "train",
]


@dataclass
class TrainConfig:
    """Optimisation settings of one run."""

    lr: float = 1e-3
    epochs: float = 1.0  # fractional epochs allowed: steps = ceil(epochs * batches_per_epoch)
    batch_size: int = 16
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    grad_clip: float = 1.0
    min_steps: int = 0  # train at least this many steps (more epochs on tiny training sets)
    eval_batch_size: int = 128
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    freeze_norm_stats: bool = False  # keep BatchNorm running statistics fixed (eval mode)
    head_lr: float | None = None  # learning rate of the head's parameters; None: ``lr``
    head: str | None = None  # name component of the head's module (e.g. "classifier"); needed with head_lr
    # "bfloat16": every forward pass (training and evaluation) under torch.autocast in bf16: a bf16 base's
    # matmuls with float32 trainable parameters; SURM's FFTs stay float32 (torch has no bf16 FFT)
    autocast: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- batching


class TextBatcher:
    """Tokenises texts once and yields padded batches ``(inputs, labels)``.

    ``inputs`` is a dict of ``input_ids``, ``attention_mask`` (and ``token_type_ids``), each
    ``(B, T)`` int64 with ``T`` the longest length in the batch (at most ``max_length``).
    """

    def __init__(self, tokenizer, max_length: int = 64):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._cache: weakref.WeakKeyDictionary[Split, list[list[int]]] = weakref.WeakKeyDictionary()

    def encode(self, split: Split) -> list[list[int]]:
        """Token ids of every input of ``split`` (computed once per split object)."""
        if split not in self._cache:
            encoded = self.tokenizer(list(split.inputs), truncation=True, max_length=self.max_length)
            self._cache[split] = encoded["input_ids"]
        return self._cache[split]

    def collate(self, sequences: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        length = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), length), dtype=torch.long)
        for row, seq in enumerate(sequences):
            ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}

    def batches(self, split: Split, index_batches: Iterable[np.ndarray]) -> Iterator[tuple[dict, torch.Tensor]]:
        """``(inputs, labels)`` for each array of row indices in ``index_batches``."""
        encoded = self.encode(split)
        for rows in index_batches:
            yield self.collate([encoded[i] for i in rows]), torch.as_tensor(split.labels[rows])

    def train_batches(self, split: Split, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
        """One epoch of shuffled batches grouped by length: a random permutation is cut into
        pools of 50 batches, each pool is sorted by length and cut into batches, and the batches
        are shuffled (transformers' ``group_by_length``). Pads far less than random batches."""
        return length_grouped_batches(np.array([len(s) for s in self.encode(split)]), batch_size, rng)

    def eval_batches(self, split: Split, batch_size: int) -> list[np.ndarray]:
        """Batches of indices sorted by length: evaluation pads as little as possible."""
        lengths = np.array([len(s) for s in self.encode(split)])
        return _chunks(np.argsort(lengths, kind="stable"), batch_size)


class ImageBatcher:
    """Yields ``(images, labels)``: images ``(B, 3, size, size)`` float32 from grey ``(N, H, W)``."""

    def __init__(self, size: int = 64):
        self.size = size

    def batches(self, split: Split, index_batches: Iterable[np.ndarray]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(images, labels)`` for each array of row indices in ``index_batches``."""
        from surm.harness.models import image_transform

        for rows in index_batches:
            yield image_transform(split.inputs[rows], size=self.size), torch.as_tensor(split.labels[rows])

    def train_batches(self, split: Split, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
        return _chunks(rng.permutation(len(split)), batch_size)

    def eval_batches(self, split: Split, batch_size: int) -> list[np.ndarray]:
        return _chunks(np.arange(len(split)), batch_size)


def length_grouped_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch of shuffled index batches grouped by length (``lengths``: ``(N,)``): a random
    permutation is cut into pools of 50 batches, each pool is sorted by length and cut into
    batches, and the batches are shuffled (transformers' ``group_by_length``)."""
    order = rng.permutation(len(lengths))
    batches = []
    pool = 50 * batch_size
    for start in range(0, len(order), pool):
        block = order[start : start + pool]
        batches += _chunks(block[np.argsort(lengths[block], kind="stable")], batch_size)
    return [batches[i] for i in rng.permutation(len(batches))]


def _chunks(order: np.ndarray, size: int) -> list[np.ndarray]:
    return [order[i : i + size] for i in range(0, len(order), size)]


def _to(inputs: Any, device: str) -> Any:
    if isinstance(inputs, dict):
        return {k: v.to(device) for k, v in inputs.items()}
    return inputs.to(device)


def logits(model: nn.Module, inputs: Any) -> torch.Tensor:
    """Logits ``(B, num_labels)`` of a transformers classifier (dict inputs) or a plain module."""
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


# --------------------------------------------------------------------------- memory


class MemoryTracker:
    """Context manager measuring peak memory of the block (see the module docstring).

    Attributes after exit: ``peak_mb`` (peak resident set / CUDA allocation, MiB),
    ``growth_mb`` (peak minus the value at entry), ``how`` (what was measured).
    """

    def __init__(self, device: str = "cpu", interval: float = 0.02):
        self.device = torch.device(device)
        self.interval = interval
        self.peak_mb = self.growth_mb = float("nan")
        self.how = ""

    @staticmethod
    def _rss_mb() -> float | None:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except (OSError, ValueError, IndexError):
            return None

    def __enter__(self) -> MemoryTracker:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device) / 2**20
            return self
        self._start = self._rss_mb()
        self._peak = self._start
        self._stop = threading.Event()
        if self._start is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        else:
            self._start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            rss = self._rss_mb()
            if rss is not None and rss > self._peak:
                self._peak = rss

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
            self.how = "torch.cuda.max_memory_allocated"
        elif self._peak is not None:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, self._rss_mb() or 0.0)
            self.peak_mb, self.how = self._peak, "peak RSS sampled every 20 ms (/proc/self/statm)"
        else:
            self.peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            self.how = "getrusage ru_maxrss (process lifetime peak)"
        self.growth_mb = self.peak_mb - self._start


# --------------------------------------------------------------------------- training


def _optimizer_groups(model: nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
    """AdamW parameter groups: one at ``config.lr``, or, with ``config.head_lr``, the head's
    trainable parameters (any module named ``config.head``, PEFT's trainable copy included) at
    ``head_lr`` and the rest at ``lr``."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters")
    if config.head_lr is None:
        return [{"params": [p for _, p in named], "lr": config.lr}]
    if not config.head:
        raise ValueError("TrainConfig.head_lr needs TrainConfig.head, the name of the head module (e.g. 'classifier')")
    in_head = re.compile(rf"(^|\.){re.escape(config.head)}\.")
    head = [p for n, p in named if in_head.search(n)]
    rest = [p for n, p in named if not in_head.search(n)]
    if not head:
        raise ValueError(f"head_lr={config.head_lr} but no trainable parameter lies in a module named "
                         f"{config.head!r}; pass the head's module name as TrainConfig.head")
    return [group for group in ({"params": rest, "lr": config.lr}, {"params": head, "lr": config.head_lr})
            if group["params"]]


def compute_context(config: TrainConfig):
    """The context of every forward pass of a run: ``torch.autocast`` in ``config.autocast``'s
    dtype, or nothing."""
    import contextlib

    if config.autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(config.device).type, dtype=getattr(torch, config.autocast))


def _set_train_mode(model: nn.Module, freeze_norm_stats: bool) -> None:
    model.train()
    if freeze_norm_stats:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def num_steps(n_train: int, config: TrainConfig) -> int:
    """Optimizer steps of a run: ``ceil(epochs * batches_per_epoch)``, at least ``min_steps``."""
    per_epoch = math.ceil(n_train / config.batch_size)
    return max(math.ceil(config.epochs * per_epoch), config.min_steps, 1)


def classification_loss(model: nn.Module, inputs: Any, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of a classifier's logits ``(B, C)`` against ``labels`` ``(B,)``."""
    return nn.functional.cross_entropy(logits(model, inputs), labels)


def train(model: nn.Module, batcher, split: Split, config: TrainConfig,
          loss_fn: Callable[[nn.Module, Any, Any], torch.Tensor] = classification_loss,
          on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Train ``model`` in place on ``split``; returns ``{"steps", "losses", "seconds", "cpu_seconds"}``
    (``cpu_seconds``: CPU time of the process, all threads, which unlike wall time does not grow
    when other processes share the cores).

    ``losses`` holds the mean training loss of each block of about 5 % of the steps.

    ``loss_fn(model, inputs, labels)`` is the scalar loss of one batch as the batcher yields it
    (inputs already on ``config.device``; labels moved there when they are a tensor); the default
    is a classifier's cross-entropy. ``on_step(step)`` is called after optimizer step ``step``
    (1-based), e.g. to evaluate during training; the model is in train mode again after it returns,
    and its time counts in ``seconds``.
    """
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    steps = num_steps(len(split), config)
    groups = _optimizer_groups(model, config)
    params = [p for group in groups for p in group["params"]]  # for gradient clipping
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    warmup = int(round(config.warmup_ratio * steps))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (steps - step) / max(1, steps - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    _set_train_mode(model, config.freeze_norm_stats)
    losses, block, block_size = [], [], max(1, steps // 20)
    start, cpu_start = time.perf_counter(), time.process_time()
    bar = _progress(steps, config.progress, "train")
    step = 0
    while step < steps:
        for inputs, labels in batcher.batches(split, batcher.train_batches(split, config.batch_size, rng)):
            if isinstance(labels, torch.Tensor):
                labels = labels.to(config.device)
            with compute_context(config):
                loss = loss_fn(model, _to(inputs, config.device), labels)
            loss.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            block.append(loss.item())
            if len(block) == block_size:
                losses.append(float(np.mean(block)))
                block = []
            step += 1
            if bar is not None:
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)  # drawn by update, at most every mininterval
                bar.update(1)
            if on_step is not None:
                on_step(step)
                _set_train_mode(model, config.freeze_norm_stats)
            if step == steps:
                break
    if block:
        losses.append(float(np.mean(block)))
    if bar is not None:
        bar.close()
    if not all(math.isfinite(x) for x in losses):
        raise FloatingPointError(f"training diverged (loss {losses[-1]}); lower the learning rate ({config.lr})")
    return {"steps": steps, "losses": losses, "seconds": time.perf_counter() - start,
            "cpu_seconds": time.process_time() - cpu_start}


@torch.no_grad()
def predict(model: nn.Module, batcher, split: Split, batch_size: int = 128, device: str = "cpu",
            progress: bool = False) -> np.ndarray:
    """Predicted labels ``(N,)`` in the split's order."""
    was_training = model.training
    model.eval()
    index_batches = batcher.eval_batches(split, batch_size)
    preds = np.empty(len(split), dtype=np.int64)
    bar = _progress(len(index_batches), progress, "eval")
    for rows, (inputs, _) in zip(index_batches, batcher.batches(split, index_batches)):
        preds[rows] = logits(model, _to(inputs, device)).argmax(-1).cpu().numpy()
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    model.train(was_training)
    return preds


def scores(labels: np.ndarray, preds: np.ndarray) -> dict[str, float]:
    """``accuracy`` and ``macro_f1`` of predictions against labels."""
    from sklearn.metrics import f1_score

    labels, preds = np.asarray(labels), np.asarray(preds)
    macro_f1 = f1_score(labels, preds, average="macro", zero_division=0)
    return {"accuracy": float(np.mean(labels == preds)), "macro_f1": float(macro_f1)}


def evaluate(model: nn.Module, batcher, split: Split, batch_size: int = 128, device: str = "cpu",
             progress: bool = False) -> dict[str, float]:
    """``{"accuracy", "macro_f1", "n"}`` of ``model`` on ``split``."""
    preds = predict(model, batcher, split, batch_size, device, progress)
    return {**scores(split.labels, preds), "n": len(split)}


def finetune(
    model: nn.Module,
    batcher,
    splits: DatasetSplits,
    config: TrainConfig,
    eval_splits: Sequence[str] = ("validation", "test"),
) -> dict[str, Any]:
    """Train on ``splits.train`` and evaluate on ``eval_splits``.

    Returns ``{"train": {...}, "<split>": {"accuracy", "macro_f1", "n"}, "train_seconds",
    "eval_seconds", "peak_memory_mb", "peak_memory_growth_mb", "memory_measure", "config"}``.
    """
    model.to(config.device)
    with MemoryTracker(config.device) as memory:
        history = train(model, batcher, splits.train, config)
    result: dict[str, Any] = {"train": history}
    start = time.perf_counter()
    for name in eval_splits:
        with compute_context(config):
            result[name] = evaluate(model, batcher, getattr(splits, name), config.eval_batch_size, config.device)
    result.update(
        train_seconds=history["seconds"],
        train_cpu_seconds=history["cpu_seconds"],
        eval_seconds=time.perf_counter() - start,
        peak_memory_mb=memory.peak_mb,
        peak_memory_growth_mb=memory.growth_mb,
        memory_measure=memory.how,
        config=config.to_dict(),
    )
    return result


def _progress(total: int, enabled: bool, desc: str):
    """The bar of one training or evaluation pass (see :mod:`surm.harness.progress`)."""
    return progress.bar(total, desc, enabled, inner=True)
