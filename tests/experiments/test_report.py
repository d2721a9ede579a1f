"""Summaries: means over seeds, rows, Markdown, the store's mark, written outputs."""

import dataclasses
import json

import pytest

from surm.experiments import report
from surm.harness.methods import parse
from surm.harness.runs import RunRecord, RunSpec


def _record(method: str, seed: int, accuracy: float, from_store: bool = False) -> RunRecord:
    spec = RunSpec("rotten_tomatoes", method, seed=seed, model="tiny-bert")
    return RunRecord(
        spec=spec, key=spec.key, label=spec.method.label, lr=spec.effective_lr, head_lr=None, trainable_params=100,
        adapter_params={"lora:8": 800, "surm:circulant": 50}.get(method, 0), optimizer_state_mb=0.0,
        sizes={"train": 10, "validation": 5, "test": 5}, num_labels=2, label_names=["a", "b"],
        train={"losses": [1.0], "steps": 1}, metrics={"test": {"accuracy": accuracy, "macro_f1": accuracy, "n": 5}},
        train_seconds=1.0, train_cpu_seconds=1.0, eval_seconds=0.1, peak_memory_mb=1.0,
        peak_memory_growth_mb=0.5, memory_measure="rss", config={}, seconds=2.0, cpu_seconds=2.0, code="x",
        from_store=from_store,
    )


RECORDS = [_record("lora:8", 0, 0.8), _record("lora:8", 1, 0.6, from_store=True),
           _record("surm:circulant", 0, 0.7), _record("surm:circulant", 1, 0.7)]


def test_mean_std_is_the_sample_std():
    assert report.mean_std([1.0, 3.0]) == (2.0, pytest.approx(2 ** 0.5))
    assert report.mean_std([5.0]) == (5.0, 0.0)


def test_aggregate_groups_seeds_and_counts_stored_runs():
    lora, surm = report.aggregate(RECORDS)
    assert lora.method == parse("lora:8") and lora.seeds == [0, 1] and lora.stored == 1 and surm.stored == 0
    assert lora.accuracy == pytest.approx((0.7, 0.1414213), rel=1e-5)
    assert json.loads(json.dumps(lora.to_json()))["method"] == "lora:8"
    assert report.versus([lora, surm], parse("lora:8")) == [
        "SURM circulant: +0.0 points against LoRA r=8 with 16.0x fewer parameters"]


def test_stored_runs_are_marked_and_explained():
    assert report.stored_mark(0, 3) == ""
    assert report.stored_mark(3, 3) == f" {report.STORED}"
    assert report.stored_mark(1, 3) == f" {report.STORED} (1 of 3)"
    assert report.stored_note(RECORDS[2:]) == ""
    note = report.stored_note(RECORDS)
    assert note.strip().startswith(report.STORED) and "1 of 4 runs" in note


def test_formats_and_markdown_table():
    assert report.fmt_pct((0.8123, 0.0112)) == "81.2 ± 1.1" and report.fmt_pct((0.8123, 0.0), std=False) == "81.2"
    assert report.fmt_lr(0.003) == "0.003" and report.fmt_lr(0.003, 0.1) == "0.003 (head 0.1)"
    assert report.fmt_duration(42) == "42 s" and report.fmt_duration(210) == "3.5 min"
    assert report.markdown_table(["a", "b"], [[1, 2]]) == "| a | b |\n| --- | ---: |\n| 1 | 2 |\n"


def test_write_leaves_json_and_markdown(tmp_path):
    payload = {"rows": report.aggregate(RECORDS), "runs": RECORDS, "curve": [1.0, 2.0]}
    outcome = report.write(tmp_path, "demo", payload, "# demo\n", one_line=["curve"])
    from surm.harness.runs import provenance

    assert outcome.files == [tmp_path / "demo.json", tmp_path / "demo.md"]
    # the report names the commit and the run code that made it, in the Markdown and the JSON
    assert outcome.markdown.startswith("# demo\n\n<sub>Made by surm ") and provenance.code_version() in outcome.markdown
    assert (tmp_path / "demo.md").read_text() == outcome.markdown
    assert json.loads((tmp_path / "demo.json").read_text())["made_by"] == provenance.made_by()
    text = (tmp_path / "demo.json").read_text()
    assert ' "curve": [1.0, 2.0]' in text  # one line
    data = json.loads(text)
    assert data["runs"][1]["method"] == "lora:8" and RunRecord.from_json(data["runs"][1]) == dataclasses.replace(
        RECORDS[1], from_store=False)
