"""Labelled data sets as instruction tasks for a causal LM: text -> label word, through the chat
template, scored by accuracy.

``rotten_tomatoes_instruct`` asks SmolLM2 whether a movie review is positive or negative; the
reply is the label word alone. The splits are those of ``rotten_tomatoes`` (the same train,
validation and test sentences as every classifier run), so the tasks compare. Every label word is
one token of SmolLM2's tokenizer, so the model's choice is the label word whose token is most
likely after the prompt (:func:`surm.harness.training.causal_lm.evaluate_lm`): exact and one
forward pass per example, which the response loss needs anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["TASKS", "InstructTask", "load_task"]


@dataclass(frozen=True)
class InstructTask:
    """A labelled text data set (``source``) asked as a question: ``prompt`` formatted with the
    text, answered by ``words[label name]``."""

    source: str
    prompt: str
    words: dict[str, str]


TASKS = {
    "rotten_tomatoes_instruct": InstructTask(
        source="rotten_tomatoes",
        prompt='Movie review: "{text}"\n\nIs this review positive or negative? Answer with one word: positive or '
               'negative.',
        words={"rotten": "negative", "fresh": "positive"},
    ),
}


def load_task(name: str, *, seed: int, split_seed: int, train_fraction: float, max_examples: int | None):
    """The :class:`~surm.harness.data.packaged.InstructionSplits` of task ``name``: the source's
    splits (the same examples, ids and subsampling), prompts and label-word responses, the label
    words as every split's ``choices``."""
    from . import packaged

    task = TASKS[name]
    labelled = packaged.load(task.source, seed=seed, split_seed=split_seed, train_fraction=train_fraction,
                             max_examples=max_examples)
    missing = set(labelled.label_names) - set(task.words)
    if missing:
        raise ValueError(f"{name}: no label word for {', '.join(sorted(missing))}")
    choices = [task.words[label] for label in labelled.label_names]

    def split(part) -> packaged.InstructionSplit:
        order = np.argsort(part.ids, kind="stable")  # pool order, as every instruction split
        return packaged.InstructionSplit(
            prompts=[task.prompt.format(text=part.inputs[i]) for i in order],
            responses=[choices[part.labels[i]] for i in order], groups=[f"{task.source} {part.ids[i]}" for i in order],
            ids=part.ids[order].astype(np.int64), choices=choices)

    return packaged.InstructionSplits(name=name, task=packaged.CAUSAL_LM, train=split(labelled.train),
                                      validation=split(labelled.validation), test=split(labelled.test))
