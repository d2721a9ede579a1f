"""Data: the packaged data sets (:mod:`.packaged`), a user's own files (:mod:`.files`) and
chat-template batches (:mod:`.chat`).

Every function here takes a packaged data set's name or the path of a user's data (a ``.csv``
or ``.jsonl`` file, or a folder saved by ``datasets``), so whatever takes a data set name takes
a user's file too.
"""

from __future__ import annotations

from . import files, instruct, packaged
from .packaged import CAUSAL_LM, DatasetSplits, InstructionSplit, InstructionSplits, MissingPackageError, Split

__all__ = [
    "CAUSAL_LM",
    "DatasetSplits",
    "InstructionSplit",
    "InstructionSplits",
    "MissingPackageError",
    "Split",
    "content_digest",
    "load",
    "load_instructions",
    "modality",
    "names",
    "short_name",
]


def names() -> list[str]:
    """The packaged data sets and the labelled ones asked as instruction tasks
    (:mod:`.instruct`); a user's file is taken by its path."""
    return [*packaged.names(), *instruct.TASKS]


def _is_user(name: str) -> bool:
    return name not in names() and files.is_user_data(name)


def modality(name: str) -> str:
    """``"text"``, ``"image"`` or ``"causal_lm"``: what the examples of ``name`` are (a packaged
    set: nothing is read; a user's file: its columns)."""
    if _is_user(name):
        return files.modality(name)
    if name in instruct.TASKS:
        return CAUSAL_LM
    if name not in packaged.names():
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(packaged.names())}, or a user's data: a "
                         f".csv or .jsonl file (text,label or prompt,response or messages) or a folder saved by "
                         f"datasets")
    return packaged.modality(name)


def load(name: str, *, seed: int = 0, split_seed: int = 0, train_fraction: float = 1.0,
         max_examples: int | None = None) -> DatasetSplits:
    """Labelled data ``name`` cut into train / validation / test (:func:`.packaged.load`; a
    user's file: :mod:`.files`)."""
    if _is_user(name):
        packaged._check_sizes(train_fraction, max_examples)
        return files.load_labelled(name, seed, split_seed, train_fraction, max_examples)
    if name in instruct.TASKS:
        source = instruct.TASKS[name].source
        raise ValueError(f"{name} is {source} asked as an instruction task (prompt -> label word); load it with "
                         f"load_instructions, or load {source}")
    return packaged.load(name, seed=seed, split_seed=split_seed, train_fraction=train_fraction,
                         max_examples=max_examples)


def load_instructions(name: str, *, seed: int = 0, split_seed: int = 0, train_fraction: float = 1.0,
                      max_examples: int | None = None, max_response_chars: int | None = None) -> InstructionSplits:
    """Prompt -> response data ``name`` cut into train / validation / test
    (:func:`.packaged.load_instructions`; a user's file: :mod:`.files`, responses never cut)."""
    if _is_user(name):
        packaged._check_sizes(train_fraction, max_examples)
        if max_response_chars is not None:
            raise ValueError("max_response_chars applies to the packaged data sets; a user's responses are kept whole")
        return files.load_prompts(name, seed, split_seed, train_fraction, max_examples)
    if name in instruct.TASKS:
        if max_response_chars is not None:
            raise ValueError(f"max_response_chars: {name}'s responses are single label words")
        return instruct.load_task(name, seed=seed, split_seed=split_seed, train_fraction=train_fraction,
                                  max_examples=max_examples)
    return packaged.load_instructions(name, seed=seed, split_seed=split_seed, train_fraction=train_fraction,
                                      max_examples=max_examples, max_response_chars=max_response_chars)


def short_name(name: str) -> str:
    """``name`` for a packaged data set; a user's file by its stem (for run slugs)."""
    return files.short_name(name) if _is_user(name) else name


def content_digest(name: str) -> str | None:
    """The digest of a user's data (part of a run's identity); None for a packaged data set."""
    return files.content_digest(name) if _is_user(name) else None
