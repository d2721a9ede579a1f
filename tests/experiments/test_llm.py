"""``surm reproduce llm``: the smoke preset on the tiny random Llama (seconds), the matched LoRA
rank, the merge check, and presets that refuse what the experiment cannot run."""

import dataclasses
import json

import pytest

from surm.experiments import llm
from surm.harness import methods
from surm.harness.runs import Runner, RunStore


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("llm")
    outcome = llm.run(llm.PRESETS["smoke"], out, Runner(RunStore(out / "runs"), progress=False))
    return out, outcome


def test_stored_only_reports_the_stored_runs_and_names_the_others(smoke, tmp_path):
    out, _ = smoke
    config = dataclasses.replace(llm.PRESETS["smoke"], seeds=(0, 5))
    runner = Runner(RunStore(out / "runs"), progress=False, stored_only=True)
    outcome = llm.run(config, tmp_path, runner)
    payload = json.loads((tmp_path / "llm.json").read_text())
    assert {r["seed"] for r in payload["rows"]} == {0} and all(r["stored"] for r in payload["rows"])
    assert "grimm_tales lora:2 seed 5" in payload["left_out"]
    assert "Not run yet, left out of every table" in outcome.markdown


def test_smoke_writes_tables_curves_generations_and_merge_check(smoke):
    out, outcome = smoke
    payload = json.loads((out / "llm.json").read_text())
    matched = llm.matched_lora_rank("tiny-llama", methods.parse("surm:circulant"))[0]
    for dataset in ("grimm_tales", "rotten_tomatoes_instruct"):
        rows = {r["method"]: r for r in payload["rows"] if r["dataset"] == dataset}
        assert list(rows) == ["base", "lora:2", "surm:circulant", f"lora:{matched}:targets=all"]
        assert rows["base"]["trainable_params"] == 0 and "merge" not in rows["base"]
        for name in ("lora:2", "surm:circulant"):
            r = rows[name]
            assert r["trainable_params"] > 0 and r["steps"] == 4
            assert [p["step"] for p in r["curve"]] == [0, 2, 4]
            assert r["curve"][0]["loss"] == pytest.approx(rows["base"]["validation"]["loss"])  # the same start
            assert r["validation"]["perplexity"] == pytest.approx(2.718281828 ** r["validation"]["loss"])
            assert r["merge"]["max_abs_logit_diff"] < 1e-5 and r["merge"]["merged_type"] == "LlamaForCausalLM"
            assert r["merge"]["same_generations"] and len(r["generations"]) == 1
            assert r["seconds_per_step"] > 0 and r["peak_memory_mb"] > 0
        assert rows["surm:circulant"]["lr"] == pytest.approx(3e-2) and rows["lora:2"]["lr"] == pytest.approx(3e-3)
        assert rows["surm:circulant"]["where"] == "q k v o gate up down" and rows["lora:2"]["where"] == "q v"
        summary = {s["method"]: s for s in payload["summary"][dataset]}
        assert summary["surm:circulant"]["seeds"] == [0] and summary["base"]["trainable_params"] == 0
    # the accuracy task is scored by accuracy, on the fixed subset of its test split
    choice_rows = [r for r in payload["rows"] if r["dataset"] == "rotten_tomatoes_instruct"]
    assert all(0 <= r["test"]["accuracy"] <= 1 and r["test"]["n"] == 6 for r in choice_rows)
    assert not any(r.get("stored") for r in payload["rows"])  # trained now, and kept in the store
    again = llm.run(llm.PRESETS["smoke"], out / "again", Runner(RunStore(out / "runs"), progress=False))
    assert all(r["stored"] for r in again.payload["rows"] if r["method"] != "base")  # read back, not trained
    assert [r["test"] for r in again.payload["rows"]] == [r["test"] for r in payload["rows"]]
    md = (out / "llm.md").read_text()
    assert md == outcome.markdown and "| SURM circulant | q k v o gate up down |" in md and "### Merge check" in md
    assert "## rotten_tomatoes_instruct" in md and "test accuracy %" in md
    for png in ("llm_quality.png", "llm_grimm_tales.png", "llm_rotten_tomatoes_instruct.png"):
        assert (out / png).stat().st_size > 0


def test_paired_differences_and_summaries_follow_the_rows():
    rows = [{"dataset": "friends", "method": m, "seed": s, "label": m, "where": "q v", "trainable_params": 1, "lr": 0.1,
             "test": {"loss": loss, "perplexity": 2.0}, "validation": {"loss": loss, "perplexity": 2.0},
             "seconds_per_step": 1.0, "peak_memory_growth_mb": 1.0}
            for m, s, loss in [("lora:8", 0, 2.0), ("lora:8", 1, 2.2), ("surm:circulant", 0, 2.1),
                               ("surm:circulant", 1, 2.0)]]
    (pair,) = llm.paired(rows, "friends")
    assert pair["method"] == "surm:circulant" and pair["by_seed"] == pytest.approx({0: 0.1, 1: -0.2})
    assert pair["mean"][0] == pytest.approx(-0.05)
    summary = {s["method"]: s for s in llm.summarize(rows, "friends")}
    assert summary["lora:8"]["test"][0] == pytest.approx(2.1) and summary["lora:8"]["seeds"] == [0, 1]


def test_the_full_preset_is_the_documented_comparison():
    full = llm.PRESETS["full"]
    assert full.datasets == ("friends", "rotten_tomatoes_instruct") and full.seeds == (0, 1, 2)
    assert full.steps >= 200 and full.batch_size >= 8 and full.ceiling == "full"
    for method in ("lora:8", "lora:8:targets=all", "lora:1:targets=all", "surm:circulant", "surm:toeplitz",
                   "surm:circulant:targets=qv", "surm:toeplitz:targets=qv", "c3a:192", "lokr:4", "fourierft:576",
                   "vera:192"):
        assert method in full.methods
    assert full.n_eval["rotten_tomatoes_instruct"] >= 1000


def test_matched_lora_rank_is_nearest_the_surm_count():
    model = "tiny-llama"
    rank, surm_params = llm.matched_lora_rank(model, methods.parse("surm:circulant"))
    per_rank = llm.adapter_params(model, methods.parse("lora:1:targets=all"))
    assert surm_params == llm.adapter_params(model, methods.parse("surm:circulant")) > 0
    assert all(abs(rank * per_rank - surm_params) <= abs(r * per_rank - surm_params) for r in range(1, 9))


def test_presets_refuse_non_adapter_methods_and_bad_sizes():
    with pytest.raises(ValueError, match="not an adapter method"):
        llm.PRESETS["smoke"].replace(methods=("base", "head"))
    with pytest.raises(ValueError, match="unknown method"):
        llm.PRESETS["smoke"].replace(methods=("lora8",))
    with pytest.raises(ValueError, match="matched_lora"):
        llm.PRESETS["smoke"].replace(matched_lora="lora:8")
    with pytest.raises(ValueError, match="steps"):
        llm.PRESETS["smoke"].replace(steps=0)
    with pytest.raises(ValueError, match="model: expected one of 'smollm2', 'tiny-llama'"):
        llm.PRESETS["smoke"].replace(model="gpt2")


def test_quick_preset_is_the_documented_one():
    quick = llm.PRESETS["quick"]
    assert quick.model == "smollm2" and quick.datasets == ("grimm_tales",) and quick.threads == 1
    assert quick.methods == ("base", "lora:8", "surm:circulant", "surm:toeplitz")
    assert quick.max_length == 256 and quick.steps == 24 and quick.batch_size == 4
