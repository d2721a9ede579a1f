r"""Fine-tuning causal LMs on prompt -> response pairs: batches, loss, held-out perplexity, greedy
generation, the merge check.

>>> model, tokenizer = surm.harness.models.load_causal_lm("smollm2-135m")
>>> splits = surm.harness.data.load_instructions("grimm_tales")
>>> batcher = InstructionBatcher(tokenizer, max_length=256)
>>> model = surm.harness.methods.apply(model, "surm:circulant")  # where adapters go: the Llama profile
>>> surm.harness.training.train(model, batcher, splits.train, TrainConfig(lr=3e-2, min_steps=24, batch_size=4),
...                  loss_fn=causal_lm_loss)
>>> evaluate_lm(model, batcher, splits.test)          # {"loss", "perplexity", "tokens", "n"}

Training reuses :func:`surm.harness.training.train` (AdamW, linear warm-up and decay, clipping): the batcher
yields ``(inputs, None)`` with the labels inside ``inputs`` (:mod:`surm.harness.data.chat`: -100 on the
prompt and on padding), and :func:`causal_lm_loss` is the model's own loss, the mean
cross-entropy over the response tokens of the batch.

Evaluation sums the cross-entropy over every response token of the split and divides once:
``loss = sum_t CE_t / n_tokens`` and ``perplexity = exp(loss)``, so long responses weigh by
their tokens, not by their batch.
"""

from __future__ import annotations

import copy
import math
import weakref
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from surm.harness.data import InstructionSplit
from surm.harness.data.chat import IGNORE_INDEX, collate, encode_example

from .loop import length_grouped_batches

__all__ = [
    "InstructionBatcher",
    "causal_lm_loss",
    "eval_steps",
    "evaluate_lm",
    "finetune_lm",
    "choose",
    "generate",
    "merge_check",
    "response_token_losses",
]

class InstructionBatcher:
    """Chat-template batches of an :class:`~surm.harness.data.InstructionSplit` for :func:`surm.harness.training.train`.

    Yields ``(inputs, None)``: ``inputs`` holds ``input_ids``, ``attention_mask`` and ``labels``,
    each int64 ``(B, T)``, padded on the right to the longest example of the batch (at most
    ``max_length`` tokens; :func:`surm.harness.data.chat.encode_example`). Each split is encoded once.

    ``rank`` / ``world_size``: under data parallelism each process takes rows ``rank::world_size``
    of every training batch (all processes draw the same batches from the same seed), so the
    processes together see the single-process batch; evaluation batches are not split.
    """

    def __init__(self, tokenizer, max_length: int = 256, system: str | None = None,
                 rank: int = 0, world_size: int = 1):
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 tokens, got {max_length}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.system = system
        self.rank, self.world_size = rank, world_size
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("the tokenizer has neither a pad token nor an end-of-sequence token to pad with")
        self.pad_id = pad
        self._cache: weakref.WeakKeyDictionary[Any, list[dict[str, list[int]]]] = weakref.WeakKeyDictionary()

    def encode(self, split: InstructionSplit) -> list[dict[str, list[int]]]:
        """``{"input_ids", "labels"}`` of every example of ``split`` (computed once per split)."""
        if not isinstance(split, InstructionSplit):
            raise TypeError(f"InstructionBatcher takes prompt -> response splits "
                            f"(surm.harness.data.load_instructions), "
                            f"got {type(split).__name__}")
        if split not in self._cache:
            systems = split.systems or [None] * len(split.prompts)
            self._cache[split] = [encode_example(self.tokenizer, p, r, self.max_length, s or self.system)
                                  for p, r, s in zip(split.prompts, split.responses, systems)]
        return self._cache[split]

    def batches(self, split: InstructionSplit, index_batches: Iterable[np.ndarray]) -> Iterator[tuple[dict, None]]:
        """``(inputs, None)`` for each array of row indices in ``index_batches``."""
        encoded = self.encode(split)
        for rows in index_batches:
            yield collate([encoded[i] for i in rows], self.pad_id, "right"), None

    def choice_ids(self, split: InstructionSplit) -> torch.Tensor:
        """int64 ``(C,)``: the token of each of ``split.choices`` as a response starts with it
        (ValueError unless every choice is one token and the tokens differ)."""
        ids = []
        for choice in split.choices or ():
            encoded = encode_example(self.tokenizer, "?", choice, 10**6, None)
            tokens = [t for t, label in zip(encoded["input_ids"], encoded["labels"]) if label != IGNORE_INDEX]
            alone = self.tokenizer(choice, add_special_tokens=False)["input_ids"]
            if len(alone) != 1 or tokens[:1] != alone:
                raise ValueError(f"choice {choice!r} is {len(alone)} tokens of this tokenizer; scoring a choice by "
                                 f"its first token needs one-token choices")
            ids.append(alone[0])
        if len(set(ids)) != len(ids):
            raise ValueError(f"choices {split.choices} share a token")
        return torch.tensor(ids, dtype=torch.long)

    def lengths(self, split: InstructionSplit) -> np.ndarray:
        """Token count of every example, ``(N,)``."""
        return np.array([len(e["input_ids"]) for e in self.encode(split)])

    def train_batches(self, split: InstructionSplit, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
        """One epoch of shuffled batches grouped by length (:func:`surm.harness.training.length_grouped_batches`),
        this process's rows of each; batches with fewer rows than processes are dropped."""
        batches = length_grouped_batches(self.lengths(split), batch_size, rng)
        if self.world_size == 1:
            return batches
        return [rows[self.rank :: self.world_size] for rows in batches if len(rows) >= self.world_size]

    def eval_batches(self, split: InstructionSplit, batch_size: int) -> list[np.ndarray]:
        """Batches of indices sorted by length: evaluation pads as little as possible."""
        order = np.argsort(self.lengths(split), kind="stable")
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


#: Causal LMs whose logits are ``lm_head(last hidden state)`` and nothing more: for them the head
#: is applied at the scored positions only (:func:`scored_logits`).
PLAIN_HEADS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


def scored_logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(logits, targets)`` at the positions that predict a labelled token only: logits
    ``(N, V)`` and their target tokens ``(N,)``, N the labelled tokens of the batch (the shift
    included: position t predicts token t + 1). The same numbers as the full logits at those
    positions, without the vocabulary projection (a fifth of SmolLM2's compute) and the
    ``(B, T, V)`` logits at every other position. None for a model outside :data:`PLAIN_HEADS`
    (or wrapped for DistributedDataParallel): the caller takes the model's own forward."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if type(inner).__name__ not in PLAIN_HEADS or not isinstance(getattr(inner, "lm_head", None), nn.Linear):
        return None
    hidden = inner.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
    targets = inputs["labels"][:, 1:]
    scored = targets != IGNORE_INDEX
    return inner.lm_head(hidden[:, :-1][scored]), targets[scored]


def causal_lm_loss(model: nn.Module, inputs: dict[str, torch.Tensor], labels: Any = None) -> torch.Tensor:
    """Mean cross-entropy over the tokens whose label is not -100 (the response tokens): the
    model's own loss, the head applied at those tokens only where it can be
    (:func:`scored_logits`). ``labels`` (the batcher's None) is not used."""
    scored = scored_logits(model, inputs)
    if scored is None:
        return model(**inputs).loss
    logits, targets = scored
    return F.cross_entropy(logits.float(), targets)


def response_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy and count of the labelled tokens.

    Args:
        logits: ``(B, T, V)``; position ``t`` predicts token ``t + 1``.
        labels: ``(B, T)`` token ids, -100 where nothing is predicted (prompt, padding).

    Returns:
        ``(sum, n)``: a float64 scalar, the cross-entropy summed over the ``n`` tokens ``t >= 1``
        with ``labels[:, t] != -100``, each scored by ``logits[:, t - 1]``.
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} differ in (B, T)")
    targets = labels[:, 1:]
    scored = logits[:, :-1].float()
    total = F.cross_entropy(scored.reshape(-1, scored.shape[-1]), targets.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    return total.double(), int((targets != IGNORE_INDEX).sum())


@torch.no_grad()
def evaluate_lm(model: nn.Module, batcher: InstructionBatcher, split: InstructionSplit, batch_size: int = 4,
                device: str = "cpu") -> dict[str, float]:
    """Mean response-token loss and perplexity of ``model`` on ``split``, and, for a split with
    ``choices`` (a labelled data set asked as a question), the accuracy of the model's choice.

    Returns ``{"loss", "perplexity", "tokens", "n"}``: ``loss`` is the cross-entropy (nats)
    averaged over all ``tokens`` response tokens of the ``n`` examples, ``perplexity`` is
    ``exp(loss)``; with choices also ``"accuracy"``: the share of examples whose response is the
    choice with the most likely first token after the prompt (every choice one token:
    :meth:`InstructionBatcher.choice_ids`), from the same forward pass. The model's train / eval
    mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    total, tokens, correct = 0.0, 0, 0
    choice_ids = batcher.choice_ids(split) if split.choices else None
    index_batches = batcher.eval_batches(split, batch_size)
    for rows, (inputs, _) in zip(index_batches, batcher.batches(split, index_batches)):
        inputs = {k: v.to(device) for k, v in inputs.items()}
        scored = scored_logits(model, inputs)
        if scored is None:
            logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
            batch_sum, batch_tokens = response_token_losses(logits, inputs["labels"])
            picked = None if choice_ids is None else choose(logits, inputs["labels"], choice_ids)
        else:
            logits, targets = scored
            batch_sum = F.cross_entropy(logits.float(), targets, reduction="sum").double()
            batch_tokens = int(targets.numel())
            picked = None if choice_ids is None else _choose_scored(logits, inputs["labels"], choice_ids)
        total += float(batch_sum)
        tokens += batch_tokens
        if picked is not None:
            answers = torch.tensor([split.choices.index(split.responses[i]) for i in rows], device=device)
            correct += int((picked == answers).sum())
    model.train(was_training)
    if tokens == 0:
        raise ValueError("the split has no response tokens to score (every response was cut by max_length?)")
    loss = total / tokens
    metrics = {"loss": loss, "perplexity": math.exp(loss), "tokens": tokens, "n": len(split)}
    if choice_ids is not None:
        metrics["accuracy"] = correct / len(split)
    return metrics


def _choose_scored(logits: torch.Tensor, labels: torch.Tensor, choice_ids: torch.Tensor) -> torch.Tensor:
    """:func:`choose` from :func:`scored_logits`' ``(N, V)`` rows: each batch row's first scored
    position is its response's first token."""
    scored = labels[:, 1:] != IGNORE_INDEX  # (B, T - 1), row-major as the logits' rows
    counts = scored.sum(1)
    if bool((counts == 0).any()):
        raise ValueError("a row has no response token to score its choice at")
    first = torch.cumsum(counts, 0) - counts  # the index of each batch row's first scored logit row
    return logits[first][:, choice_ids].argmax(1)


def choose(logits: torch.Tensor, labels: torch.Tensor, choice_ids: torch.Tensor) -> torch.Tensor:
    """The index of the most likely choice of each row.

    Args:
        logits: ``(B, T, V)``; position ``t`` predicts token ``t + 1``.
        labels: ``(B, T)``, -100 before the response: the first labelled position is the response's
            first token, predicted by the position before it.
        choice_ids: ``(C,)`` the token of each choice.

    Returns:
        int64 ``(B,)``: for each row, ``argmax_c logits[first - 1, choice_ids[c]]``.
    """
    labelled = labels != IGNORE_INDEX
    if not bool(labelled.any(1).all()):
        raise ValueError("a row has no response token to score its choice at")
    first = labelled.float().argmax(1)  # the first labelled position of each row
    if bool((first < 1).any()):
        raise ValueError("a response starts at position 0: no prompt predicts it")
    at = logits[torch.arange(logits.shape[0], device=logits.device), first - 1]  # (B, V)
    return at[:, choice_ids].argmax(1)


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int = 40,
             system: str | None = None, device: str = "cpu") -> list[str]:
    """Greedy continuations of ``prompts`` through the chat template, one at a time (no padding
    to get wrong); returns the new text of each, special tokens dropped."""
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    texts = []
    for prompt in prompts:
        messages = [] if system is None else [{"role": "system", "content": system}]
        messages.append({"role": "user", "content": prompt})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]], device=device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad)
        texts.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    model.train(was_training)
    return texts


def eval_steps(steps: int, points: int) -> list[int]:
    """``points`` evaluation steps spread evenly over ``1..steps``, the last one included
    (step 0, before training, is evaluated apart); at most one per step."""
    if points < 1:
        return []
    return sorted({max(1, round(steps * k / points)) for k in range(1, points + 1)})


def finetune_lm(model: nn.Module, batcher: InstructionBatcher, splits, config, eval_points: int = 4,
                eval_splits: Sequence[str] = ("validation", "test"), curve_split: str = "validation",
                progress_log=None) -> dict[str, Any]:
    """Train ``model`` on ``splits.train`` with :func:`surm.harness.training.train` and :func:`causal_lm_loss`,
    evaluating ``curve_split`` before training and at ``eval_points`` steps (:func:`eval_steps`;
    none with ``eval_points=0``), then every split of ``eval_splits``.

    Under ``torch.distributed`` (initialised by the caller) the model trains wrapped in
    ``DistributedDataParallel``, each process on its rows of every batch (build ``batcher`` with
    ``rank`` / ``world_size``); every process evaluates the whole split.

    Returns ``{"curve": [{"step", "loss", "perplexity"}, ...], "train": {...}, "<split>":
    {"loss", "perplexity", "tokens", "n"}, "steps", "train_seconds", "seconds_per_step",
    "train_cpu_seconds", "cpu_seconds_per_step", "eval_seconds", "peak_memory_mb",
    "peak_memory_growth_mb", "memory_measure"}``. The times leave out the evaluations during
    training; the CPU times (of the process, all threads) do not grow when other processes
    share the cores, the wall times do.
    """
    import time

    import torch.distributed as dist

    from .loop import MemoryTracker, compute_context, num_steps, train

    model.to(config.device)
    trained = model
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        trained = nn.parallel.DistributedDataParallel(model)
    steps = num_steps(len(splits.train), config)
    at = set(eval_steps(steps, eval_points))
    curve_data = getattr(splits, curve_split)
    curve = []

    def evaluate(split):
        with compute_context(config):
            return evaluate_lm(model, batcher, split, config.eval_batch_size, config.device)

    if eval_points > 0:  # the curve starts before training
        curve.append({"step": 0, **_point(evaluate(curve_data))})
    eval_time = [0.0, 0.0]  # wall, CPU

    def on_step(step: int) -> None:
        if step in at:
            start, cpu_start = time.perf_counter(), time.process_time()
            curve.append({"step": step, **_point(evaluate(curve_data))})
            eval_time[0] += time.perf_counter() - start
            eval_time[1] += time.process_time() - cpu_start
            if progress_log is not None:
                progress_log(f"step {step}/{steps}: {curve_split} loss {curve[-1]['loss']:.4f}")

    with MemoryTracker(config.device) as memory:
        history = train(trained, batcher, splits.train, config, loss_fn=causal_lm_loss, on_step=on_step)
    train_seconds, cpu_seconds = history["seconds"] - eval_time[0], history["cpu_seconds"] - eval_time[1]
    result: dict[str, Any] = {"curve": curve, "train": history, "steps": history["steps"],
                              "train_seconds": train_seconds, "seconds_per_step": train_seconds / history["steps"],
                              "train_cpu_seconds": cpu_seconds, "cpu_seconds_per_step": cpu_seconds / history["steps"]}
    start = time.perf_counter()
    for name in eval_splits:
        result[name] = evaluate(getattr(splits, name))
    result.update(eval_seconds=time.perf_counter() - start, peak_memory_mb=memory.peak_mb,
                  peak_memory_growth_mb=memory.growth_mb, memory_measure=memory.how)
    return result


def _point(metrics: dict[str, float]) -> dict[str, float]:
    return {"loss": metrics["loss"], "perplexity": metrics["perplexity"]}


def merge_check(model, tokenizer, batcher, split, prompts, max_new_tokens: int) -> dict[str, Any]:
    """Merge a copy of the adapter model (``merge_and_unload``) and compare: the max absolute
    difference of the logits on the first evaluation batch of ``split`` (and the largest logit
    for scale), and the greedy generations of both. Returns ``{"max_abs_logit_diff",
    "max_abs_logit", "same_generations", "generations"}`` (``generations``: the merged model's)."""
    merged = copy.deepcopy(model).merge_and_unload()
    rows = batcher.eval_batches(split, 4)[0]
    inputs, _ = next(batcher.batches(split, [rows]))
    inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    model.eval()
    with torch.no_grad():
        adapter_logits, merged_logits = model(**inputs).logits, merged.eval()(**inputs).logits
    mask = inputs["attention_mask"].bool()
    diff = (adapter_logits - merged_logits)[mask].abs().max().item()
    unmerged_texts = generate(model, tokenizer, prompts, max_new_tokens)
    merged_texts = generate(merged, tokenizer, prompts, max_new_tokens)
    return {"max_abs_logit_diff": diff, "max_abs_logit": adapter_logits[mask].abs().max().item(),
            "same_generations": unmerged_texts == merged_texts, "generations": merged_texts,
            "merged_type": type(merged).__name__}
