"""Summaries of runs: means over seeds, Markdown tables, number formats and the written outputs.

:func:`aggregate` groups :class:`~surm.harness.runs.RunRecord` s into :class:`Row` s (one
per method and data set, say) with mean and sample standard deviation over seeds; the
``fmt_*`` functions format numbers the same way in every table; :func:`write` leaves an
experiment's ``<name>.json`` and ``<name>.md`` and returns its :class:`Outcome`.

Rows whose runs came from the run store carry a mark, :data:`STORED`, explained once under
the table by :func:`stored_note`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from surm.harness.methods import Method
from surm.harness.runs import RunRecord, RunSpec

__all__ = [
    "STORED",
    "Outcome",
    "Row",
    "aggregate",
    "fmt_duration",
    "fmt_lr",
    "fmt_params",
    "fmt_pct",
    "markdown_table",
    "mean_std",
    "stored_mark",
    "stored_note",
    "versus",
    "write",
]

#: The mark of a row (or a label) whose runs were read from the run store.
STORED = "†"


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = np.asarray(list(values), dtype=float)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


@dataclass
class Row:
    """The runs of one method on one setting (``spec``: the first run's), averaged over seeds.

    ``accuracy``, ``macro_f1``, ``train_seconds`` and ``peak_memory_growth_mb`` are
    ``(mean, sample std)`` pairs of the test metric / run measure; ``stored`` counts the runs
    read from the run store.
    """

    spec: RunSpec
    label: str
    adapter_params: int
    trainable_params: int
    lr: float
    head_lr: float | None
    seeds: list[int]
    n_train: int
    n_test: int
    accuracy: tuple[float, float]
    macro_f1: tuple[float, float]
    train_seconds: tuple[float, float]
    peak_memory_growth_mb: tuple[float, float]
    stored: int = 0

    @property
    def method(self) -> Method:
        return self.spec.method

    @property
    def dataset(self) -> str:
        return self.spec.dataset

    def to_json(self) -> dict[str, Any]:
        out = {"dataset": self.spec.dataset, "method": self.method.name, "train_fraction": self.spec.train_fraction}
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "spec"})
        return out


def aggregate(records: Sequence[RunRecord], by: Sequence[str] = ("dataset", "method")) -> list[Row]:
    """Group records by the spec fields ``by`` (in first-seen order) and average over seeds."""
    groups: dict[tuple, list[RunRecord]] = {}
    for r in records:
        groups.setdefault(tuple(getattr(r.spec, k) for k in by), []).append(r)
    rows = []
    for rs in groups.values():
        first = rs[0]
        rows.append(Row(
            spec=first.spec, label=first.label, adapter_params=first.adapter_params,
            trainable_params=first.trainable_params, lr=first.lr, head_lr=first.head_lr,
            seeds=[r.spec.seed for r in rs], n_train=first.sizes["train"], n_test=first.sizes["test"],
            accuracy=mean_std(r.test["accuracy"] for r in rs), macro_f1=mean_std(r.test["macro_f1"] for r in rs),
            train_seconds=mean_std(r.train_seconds for r in rs),
            peak_memory_growth_mb=mean_std(r.peak_memory_growth_mb for r in rs),
            stored=sum(r.from_store for r in rs),
        ))
    return rows


def versus(rows: Sequence[Row], reference: Method, kind: str = "surm") -> list[str]:
    """One sentence per method of ``kind``: its mean test accuracy against the ``reference``
    method's, and its share of the reference's parameters."""
    ref = next((r for r in rows if r.method == reference), None)
    if ref is None or not ref.adapter_params:
        return []
    out = []
    for r in rows:
        if r.method.kind == kind:
            gap = 100 * (r.accuracy[0] - ref.accuracy[0])
            ratio = ref.adapter_params / max(r.adapter_params, 1)
            out.append(f"{r.label}: {gap:+.1f} points against {ref.label} with {ratio:.1f}x fewer parameters")
    return out


# --------------------------------------------------------------------------- the run store in tables


def stored_mark(stored: int, total: int) -> str:
    """``""``, `` †`` (every run from the store) or `` † (1 of 3)``."""
    if not stored:
        return ""
    return f" {STORED}" if stored == total else f" {STORED} ({stored} of {total})"


def stored_note(records: Sequence[RunRecord]) -> str:
    """The footnote of :data:`STORED` (empty when every run was trained now)."""
    stored = sum(r.from_store for r in records)
    if not stored:
        return ""
    return (f"\n{STORED} Read from the run store ({stored} of {len(records)} runs): made earlier by this version of "
            f"the code and libraries, with the same settings; their times are those of the earlier runs.\n")


# --------------------------------------------------------------------------- formats


def fmt_lr(lr: float, head_lr: float | None = None) -> str:
    """``"0.003"``, or ``"0.001 (head 0.1)"`` where the head has its own rate."""
    return f"{lr:g}" if head_lr is None else f"{lr:g} (head {head_lr:g})"


def fmt_pct(pair: tuple[float, float], std: bool = True) -> str:
    """``(0.8123, 0.0112)`` -> ``"81.2 ± 1.1"`` (``"81.2"`` with ``std=False``)."""
    mean, sd = pair
    return f"{100 * mean:.1f} ± {100 * sd:.1f}" if std else f"{100 * mean:.1f}"


def fmt_duration(seconds: float) -> str:
    """``42 s`` below two minutes, else ``3.5 min``."""
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def fmt_params(n: int) -> str:
    return f"{n:,}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub Markdown table; ``align`` is one character per column, ``l`` or ``r``."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(map(str, header)) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- outputs


@dataclass
class Outcome:
    """What an experiment leaves: its Markdown report, the files it wrote and its JSON payload."""

    experiment: str
    markdown: str
    files: list[Path]
    payload: dict[str, Any]


def write(out_dir: Path, name: str, payload: dict[str, Any], markdown: str, figures: Sequence[Path] = (),
          one_line: Collection[str] = ()) -> Outcome:
    """Write ``<name>.json`` and ``<name>.md`` into ``out_dir``; the outcome lists them and
    ``figures``. Both name what made them (:func:`surm.harness.runs.provenance.made_by`: the surm
    version, the commit, the run code's hash). The top-level keys in ``one_line`` (long series of
    numbers) are written on one line each, the rest indented."""
    from surm.harness.runs.provenance import made_by

    maker = made_by()
    payload = {**payload, "made_by": maker}
    markdown = markdown.rstrip("\n") + "\n\n" + maker_line(maker) + "\n"
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    if one_line:
        items = [f" {json.dumps(k)}: {json.dumps(v, indent=None if k in one_line else 1, default=jsonable)}"
                 for k, v in payload.items()]
        json_path.write_text("{\n" + ",\n".join(items) + "\n}\n")
    else:
        json_path.write_text(json.dumps(payload, indent=1, default=jsonable) + "\n")
    md_path.write_text(markdown)
    return Outcome(name, markdown, [json_path, md_path, *figures], payload)


def maker_line(maker: dict[str, Any]) -> str:
    """The Markdown line that names what made a report."""
    commit = f"commit `{maker['commit']}`" if maker.get("commit") else "an installed copy (no git checkout)"
    return f"<sub>Made by surm {maker['surm']} at {commit} (run code `{maker['code']}`).</sub>"


def jsonable(value: Any) -> Any:
    """``json.dumps``'s ``default``: records, rows, specs and presets by their ``to_json`` /
    ``to_dict``, methods by their string, paths and numpy scalars as plain values."""
    if hasattr(value, "to_json"):
        return value.to_json()
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, Method):
        return value.name
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
