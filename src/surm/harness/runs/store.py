"""The run store, and the runner that reads runs from it or trains them.

A :class:`RunStore` is a folder of records, ``<key>.json`` (and ``<key>.deltas.safetensors``
for runs made with ``save_deltas``), keyed by :attr:`RunSpec.key`: the spec's fields and the
recipe version (:mod:`.provenance`). So experiments share runs (``cka`` reuses the
Rotten Tomatoes runs of ``nlp``, ``lowres`` those of its fractions that ``nlp`` made), and a
run is read back only while no change to the code alters its result. The command line uses one store,
:data:`surm.harness.outputs.RUN_STORE`, whatever the output folder.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from surm.harness import progress
from surm.harness.threads import torch_threads

from .execution import execute
from .spec import RunRecord, RunSpec

__all__ = ["RunStore", "Runner"]


class RunStore:
    """Run records in the folder ``root`` (made when the first record is written)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunStore({str(self.root)!r})"

    def _path(self, spec: RunSpec, suffix: str = ".json") -> Path:
        return self.root / f"{spec.key}{suffix}"

    def read(self, spec: RunSpec) -> RunRecord | None:
        """The stored record of ``spec`` (``from_store=True``), or None; a run that must save
        deltas counts as stored only with its deltas."""
        path = self._path(spec)
        if not path.is_file() or (spec.save_deltas and not self._path(spec, ".deltas.safetensors").is_file()):
            return None
        try:
            return RunRecord.from_json(json.loads(path.read_text()), from_store=True)
        except (ValueError, KeyError, TypeError) as err:  # a damaged or foreign file: train the run again
            warnings.warn(f"ignoring the unreadable run record {path} ({err!r}); the run is trained again",
                          stacklevel=2)
            return None

    def write(self, record: RunRecord, deltas: dict[str, torch.Tensor] | None = None) -> Path:
        """Store ``record`` (and its ``deltas``, if any); returns the record's path."""
        self.root.mkdir(parents=True, exist_ok=True)
        if deltas:
            from safetensors.torch import save_file

            save_file(deltas, str(self._path(record.spec, ".deltas.safetensors")))
        path = self._path(record.spec)
        partial = path.with_name(f".{path.name}.partial")
        partial.write_text(json.dumps(record.to_json(), indent=1) + "\n")
        os.replace(partial, path)  # a reader (or a session cut off now) sees the whole record or none
        return path

    def deltas(self, spec: RunSpec) -> dict[str, torch.Tensor]:
        """The saved ``W_finetuned - W0`` of a run made with ``save_deltas=True``."""
        from safetensors.torch import load_file

        return load_file(str(self._path(spec, ".deltas.safetensors")))


@dataclass
class Runner:
    """Carries out an experiment's runs: reads each from ``store`` (None: no store) unless
    ``fresh``, trains and stores the others; ``progress`` draws progress bars.

    ``jobs > 1`` trains that many runs at once, each in its own process on one thread (on a
    machine with that many cores, about ``jobs`` times the runs per hour); every run's result
    is the same as when trained alone, since a run depends only on its spec.

    Without a store, the deltas of the runs trained here are kept in memory, so an experiment
    that needs them (cka) works without one.

    ``stored_only`` trains nothing: :meth:`run_all` returns the records the store holds and
    lists the others in :attr:`left_out` (for a report of a comparison that is still running);
    :meth:`run` raises :class:`LookupError` for a run the store lacks.
    """

    store: RunStore | None = None
    fresh: bool = False
    progress: bool = True
    jobs: int = 1
    stored_only: bool = False
    #: the runs ``stored_only`` left out, ``"<dataset> <method> seed <seed>"``, in the order asked
    left_out: list[str] = field(default_factory=list)
    _deltas: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    def run(self, spec: RunSpec) -> RunRecord:
        """The record of ``spec``: from the store if it is there (and not ``fresh``), else trained."""
        if self.store is not None and not self.fresh:
            record = self.store.read(spec)
            if record is not None:
                return record
        if self.stored_only:
            raise LookupError(f"{_label(spec)} is not in the run store {self.store}; "
                              "leave out stored_only (--stored-only) to train it")
        record, _, deltas = execute(spec, self.progress)
        if self.store is not None:
            self.store.write(record, deltas)
        elif deltas:
            self._deltas[spec.key] = deltas
        return record

    def run_all(self, specs: Sequence[RunSpec], desc: str,
                n_threads: int | None = None) -> tuple[list[RunRecord], float]:
        """:meth:`run` every spec under ``torch.set_num_threads(n_threads)`` with an outer
        progress bar (with ``jobs > 1``, the missing runs in parallel processes of one thread
        each); ``(records in spec order, wall seconds)``."""
        start = time.perf_counter()
        stored = {} if self.fresh or self.store is None else {s.key: self.store.read(s) for s in specs}
        missing = [s for s in dict.fromkeys(specs) if stored.get(s.key) is None]
        if self.stored_only:
            self.left_out += [_label(s) for s in missing]
            return [stored[s.key] for s in specs if stored.get(s.key) is not None], time.perf_counter() - start
        check_methods_fit(missing)
        if self.jobs > 1:
            if len(missing) > 1:
                done = {**{k: r for k, r in stored.items() if r is not None}, **self._train_in_parallel(missing, desc)}
                return [done[s.key] for s in specs], time.perf_counter() - start
        records = []
        with torch_threads(n_threads):
            # in a terminal an outer bar over the runs; in a log one line per run instead
            outer = progress.bar(len(specs), desc, self.progress and progress.to_terminal())
            for i, spec in enumerate(specs, 1):
                label = _label(spec)
                progress.note(f"{desc} [{i}/{len(specs)}] {label}", self.progress)
                if outer is not None:
                    outer.set_postfix_str(label)
                record = stored.get(spec.key)
                records.append(record if record is not None else self.run(spec))
                if outer is not None:
                    outer.update()
            if outer is not None:
                outer.close()
        return records, time.perf_counter() - start

    def _train_in_parallel(self, specs: list[RunSpec], desc: str) -> dict[str, RunRecord]:
        """Train ``specs`` in ``jobs`` processes; ``{key: record}`` (stored, deltas kept as by :meth:`run`)."""
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        done: dict[str, RunRecord] = {}
        context = multiprocessing.get_context("spawn")  # no fork of a process holding torch threads
        with ProcessPoolExecutor(max_workers=self.jobs, mp_context=context) as pool:
            futures = {pool.submit(_train_one, spec.to_json()): spec for spec in specs}
            for i, future in enumerate(as_completed(futures), 1):
                spec = futures[future]
                payload, deltas = future.result()
                record = RunRecord.from_json(payload)
                if self.store is not None:
                    self.store.write(record, deltas)
                elif deltas:
                    self._deltas[spec.key] = deltas
                done[spec.key] = record
                progress.note(f"{desc} [{i}/{len(specs)} trained, {self.jobs} at once] "
                              f"{spec.dataset} {spec.method} seed {spec.seed}", self.progress)
        return done

    def deltas(self, spec: RunSpec) -> dict[str, torch.Tensor]:
        """The weight changes of ``spec``, a run made with ``save_deltas`` (by :meth:`run`)."""
        if spec.key in self._deltas:
            return self._deltas[spec.key]
        if self.store is None:
            raise KeyError(f"no deltas of {spec.slug}: run it with save_deltas=True first")
        return self.store.deltas(spec)


def _label(spec: RunSpec) -> str:
    return f"{spec.dataset} {spec.method} seed {spec.seed}"


def check_methods_fit(specs: Sequence[RunSpec]) -> None:
    """Build each distinct (model, method or adapter config, profile) of ``specs`` on its model's
    skeleton (meta device, no weights): ValueError, naming the run, before any of them trains."""
    from .skeleton import check_fits

    seen = set()
    for spec in specs:
        key = (spec.model, spec.method, spec.adapter, spec.modality)
        if key in seen:
            continue
        seen.add(key)
        try:
            check_fits(spec, spec.adapter_config() if spec.adapter is not None else None)
        except ValueError as err:
            raise ValueError(f"run {spec.slug} cannot start: {err}") from None


def _train_one(spec_json: dict) -> tuple[dict, dict[str, torch.Tensor] | None]:
    """Train one run in a worker process on one thread: ``(record JSON, deltas)``."""
    with torch_threads(1):
        record, _, deltas = execute(RunSpec.from_json(spec_json), False)
    return record.to_json(), deltas
