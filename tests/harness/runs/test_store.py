"""The run store and the runner; the code version in the store's keys."""

import json
import shutil
from pathlib import Path

import pytest

import surm
from surm.harness.runs import Runner, RunSpec, RunStore, provenance

SPEC = RunSpec("rotten_tomatoes", "head", model="tiny-bert", train_fraction=0.003, n_eval=16, batch_size=8)


def _stored_seconds(store: RunStore) -> float:
    (path,) = store.root.glob("*.json")
    return json.loads(path.read_text())["seconds"]


def test_store_reuses_runs_and_fresh_retrains(tmp_path):
    store = RunStore(tmp_path / "runs")
    first = Runner(store, progress=False).run(SPEC)
    seconds = _stored_seconds(store)
    assert not first.from_store and store.read(SPEC) == first
    assert first.code == provenance.code_version()  # the record says which code made it
    again = Runner(store, progress=False).run(SPEC)
    assert again.from_store and again == first and _stored_seconds(store) == seconds  # read back, not retrained
    retrained = Runner(store, fresh=True, progress=False).run(SPEC)
    assert not retrained.from_store and _stored_seconds(store) != seconds


def test_a_run_that_needs_deltas_is_stored_only_with_them(tmp_path):
    store = RunStore(tmp_path)
    store.write(Runner(None, progress=False).run(SPEC))  # no deltas written
    assert store.read(SPEC) is not None and store.read(SPEC.replace(save_deltas=True)) is None


def test_runner_without_a_store_keeps_deltas_in_memory():
    runner = Runner(None, progress=False)
    spec = SPEC.replace(method="lora:2", save_deltas=True)
    records, wall = runner.run_all([spec], "test", n_threads=1)
    assert wall > 0 and len(runner.deltas(spec)) == 4
    with pytest.raises(KeyError, match="no deltas"):
        runner.deltas(SPEC)


def test_store_key_follows_the_recipe_version_not_the_code_hash(monkeypatch):
    key = SPEC.key
    monkeypatch.setattr(provenance, "code_version", lambda package_dir=None: "another version")
    assert SPEC.key == key  # a change that alters no result keeps the stored runs
    monkeypatch.setattr(provenance, "RECIPE", provenance.RECIPE + 1)
    assert SPEC.key != key and SPEC.key.startswith(SPEC.slug)
    monkeypatch.undo()
    assert SPEC.key == key


def test_a_record_names_the_code_and_libraries_that_made_it(tmp_path):
    record = Runner(None, progress=False).run(SPEC)
    assert record.made_by == provenance.fingerprint() and record.code == provenance.code_version()


def test_a_damaged_record_is_trained_again_not_fatal(tmp_path):
    store = RunStore(tmp_path)
    path = store.write(Runner(None, progress=False).run(SPEC))
    path.write_text('{"spec": ')  # a session cut off mid-write by an older version, or an edit
    with pytest.warns(UserWarning, match="unreadable run record"):
        assert store.read(SPEC) is None
    assert not list(tmp_path.glob(".*.partial"))


@pytest.fixture()
def package(tmp_path) -> Path:
    """A copy of the package's sources."""
    src = Path(surm.__file__).parent
    dst = tmp_path / "surm"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def test_code_version_follows_the_sources_a_run_executes(package):
    version = provenance.code_version(package)
    assert version == provenance.code_version()  # a copy elsewhere has the same version
    methods = package / "harness" / "methods" / "apply.py"
    methods.write_text(methods.read_text() + "\n# changed\n")
    assert provenance.code_version(package) != version
    methods.write_text(methods.read_text().replace("\n# changed\n", ""))
    assert provenance.code_version(package) == version


@pytest.mark.parametrize("path", ["structured/circulant.py", "harness/training/loop.py", "harness/runs/execution.py",
                                  "peft/layer.py"])
def test_code_version_covers_training_code(package, path):
    version = provenance.code_version(package)
    (package / path).write_text((package / path).read_text() + "\n")
    assert provenance.code_version(package) != version


def test_code_version_ignores_caches_presentation_and_line_endings(package):
    version = provenance.code_version(package)
    (package / "__pycache__").mkdir()
    (package / "__pycache__" / "methods.cpython-311.pyc").write_bytes(b"\0compiled")
    (package / "harness" / "methods.pyc").write_bytes(b"\0compiled")
    for path in ("experiments/report.py", "experiments/plots.py", "experiments/nlp.py", "commands/main.py"):
        (package / path).write_text((package / path).read_text() + "\n# wording\n")
    train = package / "harness" / "training" / "loop.py"
    train.write_bytes(train.read_bytes().replace(b"\n", b"\r\n"))  # a Windows checkout
    assert provenance.code_version(package) == version
    assert all(p.suffix == ".py" for p in provenance.run_sources(package))


def test_fingerprint_names_the_code_and_the_libraries():
    assert provenance.fingerprint()["code"] == provenance.code_version()
    assert set(provenance.fingerprint()) == {"code", *provenance.LIBRARIES}


def test_the_code_a_run_executes_imports_nothing_left_out_of_its_version():
    import ast

    root = Path(surm.__file__).parent
    included = {p.relative_to(root).as_posix() for p in provenance.run_sources()}
    for rel in included:
        package = ["surm", *rel.split("/")[:-1]]
        for node in ast.walk(ast.parse((root / rel).read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                names = [".".join([*base, *(node.module or "").split(".")]).strip(".")]
                names += [f"{names[0]}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                parts = name.split(".")
                if parts[0] != "surm":
                    continue
                path = "/".join(parts[1:])  # a module; packages' __init__ (experiments': the registry) aside
                if (root / f"{path}.py").is_file():
                    assert f"{path}.py" in included, f"{rel} imports {name}, which the code version leaves out"


def test_stored_only_returns_what_the_store_holds_and_lists_the_rest(tmp_path):
    store = RunStore(tmp_path / "runs")
    Runner(store, progress=False).run(SPEC)
    other = SPEC.replace(seed=1)
    runner = Runner(store, progress=False, stored_only=True)
    records, _ = runner.run_all([SPEC, other], "runs")
    assert [r.spec for r in records] == [SPEC] and records[0].from_store
    assert runner.left_out == ["rotten_tomatoes head seed 1"]
    assert store.read(other) is None  # nothing was trained
    with pytest.raises(LookupError, match="not in the run store.*--stored-only"):
        runner.run(other)
