"""One fine-tuning run: the spec, its key, the record and its JSON, the data and the deltas."""

import json

import numpy as np
import pytest
import torch

from surm.harness import methods, runs
from surm.harness.runs import RunRecord, RunSpec
from surm.harness.threads import torch_threads

TINY = dict(model="tiny-bert", train_fraction=0.003, n_eval=16, batch_size=8)


def test_the_method_string_is_parsed_once_into_the_spec():
    spec = RunSpec("rotten_tomatoes", "surm:ldr:rank=2")
    assert spec.method == methods.parse("surm:ldr:rank=2") and isinstance(spec.method, methods.Method)
    assert spec.replace(seed=3).method is spec.method


def test_modality_comes_from_the_data_and_the_profile_from_the_model_catalog():
    from surm.harness.models import catalog

    text, image = RunSpec("rotten_tomatoes", "lora:8"), RunSpec("digits", "lora:4")
    assert (text.modality, text.model, text.profile) == ("text", "minilm", catalog.CATALOG["minilm"].profile)
    assert (image.modality, image.model, image.profile) == ("image", "efficientnet",
                                                            catalog.CATALOG["efficientnet"].profile)
    assert image.effective_lr == image.profile.lr["lora"]
    with pytest.raises(ValueError, match="model efficientnet takes labelled images, but the data are labelled texts"):
        RunSpec("rotten_tomatoes", "head", model="efficientnet")
    with pytest.raises(ValueError, match="unknown data set 'imdb'"):
        RunSpec("imdb", "head")


def test_a_method_without_a_default_rate_is_refused_at_once(monkeypatch):
    import dataclasses

    monkeypatch.setitem(methods.KINDS, "c3a", dataclasses.replace(methods.KINDS["c3a"], lr=None))
    with pytest.raises(ValueError, match="no default learning rate for c3a:64"):
        RunSpec("rotten_tomatoes", "c3a:64")
    assert RunSpec("rotten_tomatoes", "c3a:64", lr=0.1).effective_lr == 0.1


def test_key_tracks_what_changes_results():
    spec = RunSpec("rotten_tomatoes", "lora:8")
    assert spec.key == RunSpec("rotten_tomatoes", "lora:8", save_deltas=True).key
    assert spec.key == RunSpec("rotten_tomatoes", "lora:8", lr=spec.effective_lr).key  # default lr = explicit
    assert spec.key == RunSpec("rotten_tomatoes", "lora:8", model="minilm").key  # default model = explicit
    assert spec.key != spec.replace(seed=1).key != spec.replace(lr=0.5).key
    assert spec.key.startswith("rotten_tomatoes-lora-8-s0-")
    assert RunSpec("digits", "surm:ldr:rank=2").slug == "digits-surm-ldr-rank2-s0"
    # a head rate equal to the method's is no change; a different one is
    assert spec.key == spec.replace(head_lr=spec.effective_lr).key != spec.replace(head_lr=0.1).key
    bitfit = RunSpec("rotten_tomatoes", "bitfit")
    assert bitfit.effective_head_lr == 0.1 and bitfit.key != bitfit.replace(head_lr=bitfit.effective_lr).key


def test_spec_json_round_trip():
    spec = RunSpec("digits", "surm:circulant:serial", seed=2, lr=1e-3, eval_splits=["validation", "test"])
    assert RunSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    assert spec.to_json()["method"] == "surm:circulant:serial"


@pytest.fixture(scope="module")
def executed():
    spec = RunSpec("rotten_tomatoes", "lora:2", lr=0.05, save_deltas=True, eval_splits=("validation", "test"), **TINY)
    with torch_threads(1):
        return spec, *runs.execute(spec, progress=False)


def test_record_is_typed_and_round_trips_through_json(executed):
    spec, record, _, _ = executed
    assert isinstance(record, RunRecord) and record.spec == spec and record.method == spec.method
    assert record.key == spec.key and record.label == "LoRA r=2" and record.lr == 0.05
    assert set(record.metrics) == {"validation", "test"} and record.test["n"] == 16
    assert record.sizes["train"] > 0 and record.train["steps"] > 0 and record.code
    payload = json.loads(json.dumps(record.to_json()))
    assert payload["method"] == "lora:2" and payload["test"] == record.test  # each split under its name
    assert RunRecord.from_json(payload) == record and not RunRecord.from_json(payload).from_store


def test_deltas_are_merged_weight_changes(executed):
    _, _, model, deltas = executed
    assert len(deltas) == 4 and all(n.endswith(("query.weight", "value.weight")) for n in deltas)
    layer = model.base_model.model.bert.encoder.layer[0].attention.self.query
    query = deltas["bert.encoder.layer.0.attention.self.query.weight"]
    torch.testing.assert_close(query, layer.get_delta_weight("default"))
    assert all(d.abs().sum() > 0 for d in deltas.values())


def test_runs_are_deterministic():
    spec = RunSpec("rotten_tomatoes", "surm:circulant", **TINY)
    with torch_threads(1):
        a, _, _ = runs.execute(spec, progress=False)
        b, _, _ = runs.execute(spec, progress=False)
    assert a.train["losses"] == b.train["losses"] and a.test == b.test


def test_load_splits_sizes_and_fixed_eval_subset():
    a = runs.load_splits(RunSpec("rotten_tomatoes", "head", train_fraction=0.01, n_eval=50, seed=0))
    b = runs.load_splits(RunSpec("rotten_tomatoes", "head", train_fraction=0.01, n_eval=50, seed=1))
    assert len(a.train) == 102 and len(a.test) == 50 and len(a.validation) == 50
    assert not np.array_equal(a.train.ids, b.train.ids)  # the seed picks the training subsample...
    assert np.array_equal(a.test.ids, b.test.ids)  # ...never the evaluation subset


def test_an_adapter_config_replaces_the_methods_own():
    import peft

    spec = RunSpec("rotten_tomatoes", "lora:2", **TINY)
    adapter = peft.LoraConfig(r=1, target_modules=["query"], modules_to_save=["classifier"])
    with torch_threads(1):
        record, model, _ = runs.execute(spec, progress=False, adapter=adapter)
    assert model.peft_config["default"] is adapter
    assert record.adapter_params == 2 * 1 * (32 + 32) and record.method == spec.method  # 2 layers, query only
