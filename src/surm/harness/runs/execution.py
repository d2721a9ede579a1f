"""Doing one run: its data, its model, training, evaluation, the record.

:func:`execute` serves classifiers (text, images) and causal LMs alike: the spec's catalog entry
loads the model, the method is applied with the model's profile, the loop of
:mod:`surm.harness.training` trains it, and the record holds the metrics of each evaluated
split. With ``spec.save_deltas`` the run also returns the effective change ``W_finetuned - W0``
(merged adapters) of the attention query and value weights of every layer, for the CKA and
weight-drift analysis.
"""

from __future__ import annotations

import copy
import dataclasses
import time

import numpy as np
import torch

from surm.harness import data as surm_data
from surm.harness import methods as surm_methods
from surm.harness.training import ImageBatcher, TextBatcher, TrainConfig, finetune

from .provenance import code_version, fingerprint
from .spec import RunRecord, RunSpec

__all__ = ["delta_names", "execute", "load_splits", "longest_prompt", "make_model", "planning_batches"]


#: The PEFT task type a run's adapter records, by the data's modality (none for EfficientNet,
#: which is no transformers model).
TASK_TYPES = {"text": "SEQ_CLS", "causal_lm": "CAUSAL_LM"}


# --------------------------------------------------------------------------- data and models


def load_splits(spec: RunSpec):
    """The data of ``spec``: train subsampled by ``n_train`` / ``train_fraction`` (chosen by
    ``spec.seed``), validation and test capped at ``n_eval`` (classifiers: a fixed subset drawn
    with seed 0; prompt -> response pairs: the first examples)."""
    causal = spec.modality == surm_data.CAUSAL_LM
    load = surm_data.load_instructions if causal else surm_data.load
    full = load(spec.dataset, seed=spec.seed)
    fraction = spec.train_fraction
    if fraction is None and spec.n_train is not None:
        fraction = min(1.0, spec.n_train / len(full.train))
    splits = full if fraction in (None, 1.0) else load(spec.dataset, seed=spec.seed, train_fraction=fraction)
    if spec.n_eval is None:
        return splits
    cap = _fixed_prompts if causal else _fixed_subset
    return dataclasses.replace(splits, validation=cap(splits.validation, spec.n_eval),
                               test=cap(splits.test, spec.n_eval))


def _fixed_subset(split: surm_data.Split, n: int) -> surm_data.Split:
    if n >= len(split):
        return split
    rows = np.sort(np.random.default_rng(0).permutation(len(split))[:n])
    inputs = split.inputs[rows] if isinstance(split.inputs, np.ndarray) else [split.inputs[i] for i in rows]
    return surm_data.Split(inputs=inputs, labels=split.labels[rows], ids=split.ids[rows])


def _fixed_prompts(split: surm_data.InstructionSplit, n: int) -> surm_data.InstructionSplit:
    """``n`` examples of ``split`` drawn with seed 0 (the same for every run), in pool order: held-out
    examples spread over the split's tales or episodes rather than its first few."""
    if n >= len(split):
        return split
    rows = np.sort(np.random.default_rng(0).permutation(len(split))[:n])
    return dataclasses.replace(split, prompts=[split.prompts[i] for i in rows],
                               responses=[split.responses[i] for i in rows], groups=[split.groups[i] for i in rows],
                               ids=split.ids[rows],
                               systems=None if split.systems is None else [split.systems[i] for i in rows])


def make_model(spec: RunSpec, num_labels: int | None = None):
    """``(model, batcher)`` for ``spec``; a new head is initialised from ``spec.seed``. The
    batcher of a causal LM takes this process's rows of each batch under ``torch.distributed``."""
    torch.manual_seed(spec.seed)
    model, tokenizer = spec.model_entry.load(num_labels)
    if spec.dtype != "float32":
        model.to(getattr(torch, spec.dtype))
    if spec.modality == "image":
        return model, ImageBatcher(spec.image_size)
    if spec.modality == "text":
        return model, TextBatcher(tokenizer, spec.max_length)
    from surm.harness.training.causal_lm import InstructionBatcher

    rank, world = _rank_and_world()
    return model, InstructionBatcher(tokenizer, spec.max_length, rank=rank, world_size=world)


def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def longest_prompt(spec: RunSpec) -> tuple[int, int, int]:
    """``(tokens, split index, how many)`` of a causal-LM run's prompts with the chat template:
    the longest prompt's token count, and how many prompts leave no room for a response within
    ``spec.max_length``; only the tokenizer is loaded, no weights."""
    from surm.harness.data.chat import prompt_token_counts

    splits = load_splits(spec)
    tokenizer = spec.model_entry.tokenizer()
    counts = [prompt_token_counts(tokenizer, getattr(splits, name)) for name in ("train", "validation", "test")]
    longest = max(int(c.max()) for c in counts)
    return longest, int(np.argmax([c.max() for c in counts])), sum(int((c >= spec.max_length).sum()) for c in counts)


def planning_batches(spec: RunSpec, n_batches: int, batch_size: int):
    """``(model, batches, loss_fn)`` for the planner (:func:`surm.plan`): ``spec``'s model on its
    device with its new head initialised from ``spec.seed``, ``n_batches`` batches of
    ``batch_size`` training examples drawn by ``spec.seed`` from the whole training set, and the
    loss (None for text: the batches carry their labels and the model returns its loss)."""
    if spec.modality == surm_data.CAUSAL_LM:
        raise ValueError(f"the planner takes labelled data; {spec.dataset} is prompt -> response pairs")
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


def train_config(spec: RunSpec, progress: bool = True) -> TrainConfig:
    """The training loop's settings of ``spec``."""
    return TrainConfig(
        lr=spec.effective_lr, epochs=spec.epochs, min_steps=spec.min_steps, batch_size=spec.batch_size,
        weight_decay=spec.weight_decay, warmup_ratio=spec.warmup_ratio, seed=spec.seed, device=spec.device,
        progress=progress, freeze_norm_stats=True,  # BatchNorm uses its pretrained statistics, for every method
        head_lr=spec.effective_head_lr, head=spec.profile.head, eval_batch_size=spec.effective_eval_batch_size,
        autocast=None if spec.dtype == "float32" else spec.dtype,
    )


def execute(spec: RunSpec, progress: bool = True, adapter=None) -> tuple[RunRecord, torch.nn.Module, dict]:
    """Train and evaluate ``spec``: ``(record, trained model, deltas)``.

    ``adapter``, a PEFT config, replaces the method's own, and so does ``spec.adapter`` when
    ``adapter`` is None (the method still gives the label). ``deltas`` maps the query/value
    weight names to ``W_finetuned - W0`` when ``spec.save_deltas`` (parallel adapters merged into
    a copy), else it is empty.
    """
    start, cpu_start = time.perf_counter(), time.process_time()
    causal = spec.modality == surm_data.CAUSAL_LM
    splits = load_splits(spec)
    model, batcher = make_model(spec, None if causal else splits.num_labels)
    profile = spec.profile
    watched = delta_names(model) if spec.save_deltas else []
    base = {n: p.detach().clone() for n, p in model.named_parameters() if n in watched}
    if adapter is None and spec.adapter is not None:
        adapter = spec.adapter_config()
        if profile.head is not None:  # the new head trains in full
            adapter.modules_to_save = [*(adapter.modules_to_save or ()), profile.head]
    if causal:
        torch.manual_seed(spec.seed)  # the adapters' random factors (DDP then starts every rank from rank 0's)
    model = surm_methods.apply(model, spec.method if adapter is None else adapter, profile,
                               task_type=TASK_TYPES.get(spec.modality))
    if spec.dtype != "float32":  # a low-precision base: what trains stays float32 (autocast does the matmuls)
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    config = train_config(spec, progress)
    trainable = surm_methods.count_trainable(model)
    if spec.method.record.trains_nothing:
        result = _evaluate_only(model, batcher, splits, spec, config)
    elif causal:
        from surm.harness.training.causal_lm import finetune_lm

        result = finetune_lm(model, batcher, splits, config, eval_points=spec.eval_points,
                             eval_splits=spec.eval_splits)
    else:
        result = finetune(model, batcher, splits, config, eval_splits=spec.eval_splits)
    checks = _checks(spec, model, batcher, splits) if causal and spec.n_generate > 0 else {}
    record = RunRecord(
        spec=spec, key=spec.key, label=spec.method.label, lr=spec.effective_lr, head_lr=spec.effective_head_lr,
        trainable_params=trainable, adapter_params=surm_methods.count_trainable(model, exclude_head=profile.head),
        optimizer_state_mb=trainable * 12 / 2**20,
        sizes={"train": len(splits.train), "validation": len(splits.validation), "test": len(splits.test)},
        num_labels=0 if causal else splits.num_labels, label_names=[] if causal else list(splits.label_names),
        train=result["train"], metrics={name: result[name] for name in spec.eval_splits},
        train_seconds=result["train_seconds"], train_cpu_seconds=result["train_cpu_seconds"],
        eval_seconds=result["eval_seconds"], peak_memory_mb=result["peak_memory_mb"],
        peak_memory_growth_mb=result["peak_memory_growth_mb"], memory_measure=result["memory_measure"],
        config=config.to_dict(), seconds=time.perf_counter() - start, cpu_seconds=time.process_time() - cpu_start,
        code=code_version(), curve=result.get("curve", []), checks=checks,
        made_by=fingerprint(),
    )
    deltas = {}
    if watched:
        state = _effective_state(copy.deepcopy(model).cpu())
        deltas = {n: (state[n].float() - base[n].float().cpu()).contiguous() for n in watched}
    return record, model, deltas


def _evaluate_only(model, batcher, splits, spec: RunSpec, config: TrainConfig) -> dict:
    """The result of a run that trains nothing (``base``): each split's metrics, no steps."""
    from surm.harness.training import MemoryTracker, compute_context
    from surm.harness.training.causal_lm import evaluate_lm

    model.to(config.device)
    start = time.perf_counter()
    with MemoryTracker(config.device) as memory, compute_context(config):
        metrics = {name: evaluate_lm(model, batcher, getattr(splits, name), config.eval_batch_size, config.device)
                   for name in spec.eval_splits}
    return {"train": {"steps": 0, "losses": [], "seconds": 0.0, "cpu_seconds": 0.0}, **metrics, "train_seconds": 0.0,
            "train_cpu_seconds": 0.0, "eval_seconds": time.perf_counter() - start, "peak_memory_mb": memory.peak_mb,
            "peak_memory_growth_mb": memory.growth_mb, "memory_measure": memory.how}


def _checks(spec: RunSpec, model, batcher, splits) -> dict:
    """Greedy generations from the first ``spec.n_generate`` test prompts, and the merge check:
    ``merge_and_unload()``'s plain model against the adapter model (:func:`merge_check`)."""
    from surm.harness.training.causal_lm import generate, merge_check

    prompts = list(splits.test.prompts[: spec.n_generate])
    if not hasattr(model, "merge_and_unload"):  # full fine-tuning or the base model: nothing to merge
        return {"generations": generate(model, batcher.tokenizer, prompts, spec.max_new_tokens)}
    merge = merge_check(model, batcher.tokenizer, batcher, splits.test, prompts, spec.max_new_tokens)
    return {"generations": merge.pop("generations"), "merge": merge}
