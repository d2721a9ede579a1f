"""A user's own data: a CSV or JSON Lines file, or a Hugging Face ``datasets`` dataset saved on
disk (``save_to_disk``), wherever a packaged data set's name is taken (``surm finetune --data``).

What the columns say decides the task:

=============================  ==========  ===================================================
columns                        modality    one example
=============================  ==========  ===================================================
``text``, ``label``            text        a text and its class (any values; classes sorted)
``prompt``, ``response``       causal_lm   the user's turn and the reply the model learns
``messages``                   causal_lm   a chat: an optional system turn, one user turn,
                                           one assistant reply (``{"role", "content"}`` each)
=============================  ==========  ===================================================

An optional ``split`` column (``train``, ``validation``, ``test``) places each row; a saved
``DatasetDict`` places them by its splits. Without a validation split 10 % of train becomes
validation (of each class for labelled texts); without any split, rows are cut 80 / 10 / 10
(stratified by class for labelled texts), fixed by ``split_seed``. Prompt -> response rows may
carry a ``group`` column (a document, a speaker, a conversation): groups are then kept whole in
one split. A missing column, an empty text or a bad row is refused naming the file, the row and
what is wrong.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["SUFFIXES", "content_digest", "is_user_data", "load_rows", "modality", "short_name"]

#: File types read as a user's data (a folder is read as a saved ``datasets`` dataset).
SUFFIXES = (".csv", ".jsonl")
SPLITS = ("train", "validation", "test")
_TASKS = {"text": ("text", "label"), "causal_lm": ("prompt", "response")}


def is_user_data(name: str) -> bool:
    """Whether ``name`` names a user's data (a file of :data:`SUFFIXES`, or a folder saved by
    ``datasets``) rather than a packaged data set; the file need not exist."""
    path = Path(name)
    return path.suffix.lower() in SUFFIXES or path.is_dir()


@dataclass(frozen=True)
class Rows:
    """A user's data as read: the modality, and per split (``None``: not given) its rows, each
    ``{"inputs": text or (prompt, response, system), "label": str, "group": str}``."""

    source: str
    modality: str
    splits: dict[str | None, list[dict[str, Any]]]


def modality(name: str) -> str:
    """``"text"`` or ``"causal_lm"``, from the columns of the user's data ``name``."""
    return load_rows(name).modality


def short_name(name: str) -> str:
    """A file-name-safe short name for run slugs: the file's or folder's stem."""
    stem = Path(name).stem or "data"
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in stem)


def content_digest(name: str) -> str:
    """16 hex digits of the SHA-256 of the data's bytes (every file of a saved dataset), so that
    a run on an edited file is a new run."""
    path = Path(name)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(file.relative_to(path).as_posix().encode() if path.is_dir() else b"")
        digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def load_rows(name: str) -> Rows:
    """Read and check the user's data ``name`` (cached while the file is unchanged)."""
    path = Path(name)
    if not path.exists():
        raise ValueError(f"--data {name}: no such file or folder (a user's data set is a .csv or .jsonl file, or a "
                         f"folder saved by datasets' save_to_disk)")
    stamp = tuple((p.stat().st_size, p.stat().st_mtime_ns) for p in ([path] if path.is_file() else path.rglob("*")))
    return _load_rows(str(path.resolve()), stamp)


@functools.lru_cache(maxsize=8)
def _load_rows(path: str, stamp: tuple) -> Rows:
    raw = _read(Path(path))
    columns = set().union(*(row.keys() for rows in raw.values() for row in rows)) if raw else set()
    task = _task(path, columns)
    splits: dict[str | None, list[dict[str, Any]]] = {}
    for split, rows in raw.items():
        splits[split] = [_example(path, task, row, number) for number, row in enumerate(rows, 1)]
    if not any(splits.values()):
        raise ValueError(f"{path}: no rows")
    return Rows(path, task, splits)


def _read(path: Path) -> dict[str | None, list[dict[str, Any]]]:
    """``{split: rows}`` of a file or saved dataset; split None holds the rows without a split."""
    if path.is_dir():
        return _read_saved(path)
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    else:
        rows = []
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}, line {number}: not JSON ({err.msg}); a .jsonl file holds one JSON "
                                     f"object per line") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}, line {number}: a {type(row).__name__}, not a JSON object")
                rows.append(row)
    return _by_split_column(path, rows)


def _read_saved(path: Path) -> dict[str | None, list[dict[str, Any]]]:
    try:
        import datasets
    except ImportError:
        raise ValueError(f"{path}: a folder is read as a dataset saved by datasets' save_to_disk, and the datasets "
                         f"package is not installed (pip install datasets)") from None
    try:
        saved = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(f"{path}: not a dataset saved by datasets' save_to_disk ({err})") from None
    if isinstance(saved, datasets.DatasetDict):
        unknown = sorted(set(saved) - set(SPLITS))
        if unknown:
            raise ValueError(f"{path}: unknown split(s) {', '.join(unknown)}; name them {', '.join(SPLITS)}")
        return {split: saved[split].to_list() for split in saved}
    return _by_split_column(path, saved.to_list())


def _by_split_column(path: Path, rows: list[dict[str, Any]]) -> dict[str | None, list[dict[str, Any]]]:
    if not rows or "split" not in rows[0]:
        return {None: rows}
    out: dict[str | None, list[dict[str, Any]]] = {}
    for number, row in enumerate(rows, 1):
        split = str(row.get("split", "")).strip().lower()
        if split not in SPLITS:
            raise ValueError(f"{path}, row {number}: split {row.get('split')!r}; it must be one of {', '.join(SPLITS)}")
        out.setdefault(split, []).append(row)
    return out


def _task(path: str, columns: set[str]) -> str:
    if {"text", "label"} <= columns:
        return "text"
    if {"prompt", "response"} <= columns or "messages" in columns:
        return "causal_lm"
    raise ValueError(f"{path}: columns {', '.join(sorted(columns)) or 'none'}; a user's data set needs text and "
                     f"label (classification), prompt and response, or messages (a chat, for a causal LM)")


def _example(path: str, task: str, row: dict[str, Any], number: int) -> dict[str, Any]:
    where = f"{path}, row {number}"
    if task == "text":
        text, label = row.get("text"), row.get("label")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}: text is {text!r}; every row needs a non-empty text")
        if label is None or (isinstance(label, str) and not label.strip()):
            raise ValueError(f"{where}: no label; every row needs one")
        return {"inputs": text.strip(), "label": label, "group": None}
    if "messages" in row and row["messages"] is not None:
        prompt, response, system = _chat(where, row["messages"])
    else:
        prompt, response, system = row.get("prompt"), row.get("response"), None
        for field, value in (("prompt", prompt), ("response", response)):
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{where}: {field} is {value!r}; every row needs a non-empty {field}")
    group = row.get("group")
    return {"inputs": (prompt, response, system), "label": None, "group": None if group is None else str(group)}


def _chat(where: str, messages: Any) -> tuple[str, str, str | None]:
    """``(prompt, response, system)`` of a one-turn chat: [system], user, assistant."""
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError:
            raise ValueError(f"{where}: messages is text that is not JSON; give a list of "
                             f"{{'role', 'content'}} objects") from None
    if not isinstance(messages, list) or not all(isinstance(m, dict) and {"role", "content"} <= set(m)
                                                 for m in messages):
        raise ValueError(f"{where}: messages must be a list of {{'role': ..., 'content': ...}} objects")
    roles = [m["role"] for m in messages]
    if roles not in (["user", "assistant"], ["system", "user", "assistant"]):
        raise ValueError(f"{where}: messages has the roles {roles}; supported: [system,] user, assistant (one "
                         f"user turn and the assistant's reply, which the model learns)")
    system = messages[0]["content"] if roles[0] == "system" else None
    prompt, response = messages[-2]["content"], messages[-1]["content"]
    for field, value in (("the user turn", prompt), ("the assistant reply", response)):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{where}: {field} is {value!r}; it must be non-empty text")
    return prompt, response, system


def label_names(rows: Rows) -> list[str]:
    """The classes, sorted (numerically when every label is a number)."""
    labels = {row["label"] for split in rows.splits.values() for row in split}
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in labels)
    return [str(v) for v in (sorted(labels) if numeric else sorted(labels, key=str))]


def positions(rows: Rows) -> tuple[list[dict[str, Any]], dict[str, np.ndarray] | None]:
    """All rows in one pool, and the pool positions of each split the data give (None: no split
    given, the caller cuts them)."""
    pool = [row for split in rows.splits.values() for row in split]
    if set(rows.splits) == {None}:
        return pool, None
    out, start = {}, 0
    for split, split_rows in rows.splits.items():
        out[split] = np.arange(start, start + len(split_rows))
        start += len(split_rows)
    return pool, out


# --------------------------------------------------------------------------- splits


def _cut(rows: Rows, split_seed: int, labels: np.ndarray | None, groups: np.ndarray | None):
    """Pool positions of (train, validation, test): the splits the data give, the rest cut from
    train (10 % each, of each class for labelled texts, whole groups for prompt -> response)."""
    from .packaged import TEST_FRACTION, VALIDATION_FRACTION, _group_partition, _stratified_split

    pool, given = positions(rows)
    given = given or {}
    rng = np.random.default_rng(split_seed)
    train = given.get("train", given.get(None, np.arange(len(pool))))
    wanted = [s for s in ("validation", "test") if s not in given]
    fractions = {"validation": VALIDATION_FRACTION, "test": TEST_FRACTION}
    cut: dict[str, np.ndarray] = {}
    if wanted and labels is not None:
        rest, *parts = _stratified_split(train, labels, [fractions[s] for s in wanted], rng)
        cut = dict(zip(wanted, parts))
        train = rest
    elif wanted:
        local = groups[train] if groups is not None else np.arange(len(train))
        _, index = np.unique(local, return_inverse=True)
        parts = _group_partition(index, split_seed)  # train, validation, test of the groups
        if wanted == ["validation", "test"]:
            train, cut["validation"], cut["test"] = (train[p] for p in parts)
        else:  # one split to cut: the groups of both held-out parts go to it
            train, cut[wanted[0]] = train[parts[0]], train[np.sort(np.concatenate(parts[1:]))]
    out = [train, given.get("validation", cut.get("validation")), given.get("test", cut.get("test"))]
    for name, part in zip(SPLITS, out):
        if len(part) == 0:
            raise ValueError(f"{rows.source}: the {name} split is empty ({len(pool)} rows); give more rows or a "
                             f"split column")
    return out


def load_labelled(name: str, seed: int, split_seed: int, train_fraction: float, max_examples: int | None):
    """A user's labelled texts as :class:`~surm.harness.data.packaged.DatasetSplits`."""
    from .packaged import DatasetSplits, Split, _stratified_subset

    rows = load_rows(name)
    if rows.modality != "text":
        raise ValueError(f"{name} holds prompt -> response pairs; load it with load_instructions")
    pool, _ = positions(rows)
    classes = label_names(rows)
    index = {c: k for k, c in enumerate(classes)}
    labels = np.array([index[str(row["label"])] for row in pool], dtype=np.int64)
    train, validation, test = _cut(rows, split_seed, labels, None)
    n_train = len(train)
    if train_fraction < 1:
        n_train = max(round(train_fraction * n_train), len(np.unique(labels[train])))
    if max_examples is not None:
        n_train = min(n_train, max_examples)
    train = _stratified_subset(train, labels, n_train, np.random.default_rng(seed))
    if max_examples is not None:
        cap = np.random.default_rng([split_seed, 1])
        validation = _stratified_subset(validation, labels, max_examples, cap)
        test = _stratified_subset(test, labels, max_examples, cap)

    def select(p: np.ndarray) -> Split:
        return Split(inputs=[pool[i]["inputs"] for i in p], labels=labels[p], ids=p.astype(np.int64))

    return DatasetSplits(name=name, task="text", label_names=classes, train=select(train),
                         validation=select(validation), test=select(test))


def load_prompts(name: str, seed: int, split_seed: int, train_fraction: float, max_examples: int | None):
    """A user's prompt -> response pairs as :class:`~surm.harness.data.packaged.InstructionSplits`;
    a row's system turn, if any, goes in :attr:`InstructionSplit.systems`."""
    from .packaged import CAUSAL_LM, InstructionSplit, InstructionSplits, _random_subset

    rows = load_rows(name)
    if rows.modality != "causal_lm":
        raise ValueError(f"{name} holds labelled texts; load it with load")
    pool, _ = positions(rows)
    groups = np.array([row["group"] if row["group"] is not None else f"row {i}" for i, row in enumerate(pool)])
    train, validation, test = _cut(rows, split_seed, None, groups)
    n_train = len(train)
    if train_fraction < 1:
        n_train = max(round(train_fraction * n_train), 1)
    if max_examples is not None:
        n_train = min(n_train, max_examples)
    train = _random_subset(np.sort(train), n_train, np.random.default_rng(seed))
    if max_examples is not None:
        cap = np.random.default_rng([split_seed, 1])
        validation = _random_subset(np.sort(validation), max_examples, cap)
        test = _random_subset(np.sort(test), max_examples, cap)

    def select(p: np.ndarray) -> InstructionSplit:
        p = np.sort(p)
        systems = [pool[i]["inputs"][2] for i in p]
        return InstructionSplit(prompts=[pool[i]["inputs"][0] for i in p], responses=[pool[i]["inputs"][1] for i in p],
                                groups=[str(groups[i]) for i in p], ids=p.astype(np.int64),
                                systems=systems if any(s is not None for s in systems) else None)

    return InstructionSplits(name=name, task=CAUSAL_LM, train=select(train), validation=select(validation),
                             test=select(test))
