"""``SurmConfig.structure_pattern``: a structure per module, with everything a config does
(build, count, save and load bit-identically, merge, several adapters, weighted combinations),
and errors that name the pattern, the module and the fix."""

import copy
import re

import peft
import pytest
import torch

import surm
from surm import structured
from surm.peft import SurmLayer

from .tiny_models import bert, mlp

QV = [f"bert.encoder.layer.{i}.attention.self.{w}" for i in (0, 1) for w in ("query", "value")]
#: per BERT query/value layer: structure and knobs (every kind of family, a rectangular-free 24x24 model)
MIXED = {
    QV[0]: ("circulant", {"block_size": 6}),
    QV[1]: ("low_rank", {"rank": 2}),
    QV[2]: ("kronecker", {"factors": ((4, 6), (6, 4)), "terms": 2}),
    QV[3]: ("toeplitz", {}),
}


def _mixed_config(**extra):
    extra.setdefault("modules_to_save", ["classifier"])
    return surm.SurmConfig(
        structure="toeplitz",
        target_modules=QV,
        structure_pattern={re.escape(name): s for name, (s, _) in MIXED.items()},
        knob_pattern={re.escape(name): knobs for name, (_, knobs) in MIXED.items()},
        **extra,
    )


def _layers(model, adapter="default"):
    return {name.removeprefix("base_model.model."): m.surm_matrix[adapter] for name, m in model.named_modules()
            if isinstance(m, SurmLayer) and adapter in m.surm_matrix}


def _updates(model, adapter, x):
    """{layer: alpha_eff * S(x)}: each layer's scaled update of ``adapter`` on x."""
    return {name.removeprefix("base_model.model."): m.surm_alpha[adapter] * m.surm_matrix[adapter](x)
            for name, m in model.named_modules() if isinstance(m, SurmLayer) and adapter in m.surm_matrix}


def _randomize(model, adapter="default"):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "surm_" in name and f".{adapter}" in name:
                p.copy_(torch.randn_like(p) * 0.3)


def test_each_module_gets_its_structure_and_knobs():
    torch.manual_seed(0)
    base, _, _ = bert()
    model = peft.get_peft_model(base, _mixed_config())
    layers = _layers(model)
    assert set(layers) == set(QV)
    for name, (family, knobs) in MIXED.items():
        S = layers[name]
        assert S.name == family
        assert {k: v for k, v in S.knobs().items() if k in knobs} == knobs
    expected = sum(structured.make(s, 24, 24, device="meta", **k).num_params for s, k in MIXED.values())
    trainable, _ = model.get_nb_trainable_parameters()
    head = sum(p.numel() for n, p in model.named_parameters() if "classifier" in n and p.requires_grad)
    assert trainable - head == expected


def test_top_level_knobs_belong_to_structure_only():
    torch.manual_seed(0)
    base, _, _ = mlp()
    config = surm.SurmConfig(structure="circulant", block_size=2, target_modules=["fc1", "fc2"],
                             structure_pattern={"fc2": "low_rank"})
    assert config.structure_for("model.fc1") == "circulant" and config.structure_for("model.fc2") == "low_rank"
    assert config.knobs_for("fc1") == {"block_size": 2} and config.knobs_for("fc2") == {}
    layers = _layers(peft.get_peft_model(base, config))
    assert layers["fc1"].knobs() == {"block_size": 2}
    assert layers["fc2"].name == "low_rank" and layers["fc2"].rank == 8  # the family's default


def test_first_matching_key_wins_and_matches_the_end_of_the_name():
    config = surm.SurmConfig(structure_pattern={r"layer\.0\..*query": "low_rank", "query": "ldr", "self": "kronecker"})
    assert config.structure_for(QV[0]) == "low_rank"
    assert config.structure_for(QV[2]) == "ldr"
    assert config.structure_for(QV[1]) == "circulant"  # "self" is not at the end of ...self.value
    assert config.structure_for("bert.encoder.layer.0.attention.self") == "kronecker"


def test_save_and_load_round_trip_is_bit_identical(tmp_path):
    torch.manual_seed(0)
    base, _, run = bert()
    pristine = copy.deepcopy(base)
    model = peft.get_peft_model(base, _mixed_config())
    _randomize(model)
    with torch.no_grad():
        before = run(model)
    model.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(pristine, tmp_path)
    config = loaded.peft_config["default"]
    assert config.structure_pattern == model.peft_config["default"].structure_pattern
    assert {name: S.name for name, S in _layers(loaded).items()} == {name: s for name, (s, _) in MIXED.items()}
    with torch.no_grad():
        assert torch.equal(run(loaded), before)
    saved = {k: v for k, v in model.state_dict().items() if "surm_" in k}
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in saved.items())


def test_merge_and_unload_gives_the_adapter_output():
    torch.manual_seed(0)
    base, _, run = bert()
    model = peft.get_peft_model(base, _mixed_config())
    _randomize(model)
    with torch.no_grad():
        before = run(model)
        merged = model.merge_and_unload()
        torch.testing.assert_close(run(merged), before, rtol=1e-10, atol=1e-10)


def test_a_second_adapter_with_other_structures_on_the_same_layers():
    torch.manual_seed(0)
    base, _, _ = bert()
    model = peft.get_peft_model(base, _mixed_config())
    model.add_adapter("other", surm.SurmConfig(structure="circulant", target_modules=QV[:2],
                                               structure_pattern={re.escape(QV[0]): "low_rank"},
                                               knob_pattern={re.escape(QV[0]): {"rank": 1}}))
    layers = _layers(model, "other")
    assert layers[QV[0]].name == "low_rank" and layers[QV[0]].rank == 1
    assert layers[QV[1]].name == "circulant"
    assert _layers(model)[QV[0]].name == "circulant"  # the first adapter is untouched


def test_weighted_adapters_combine_layer_by_layer(tmp_path):
    torch.manual_seed(0)
    base, _, run = bert()
    pristine = copy.deepcopy(base)
    model = peft.get_peft_model(base, _mixed_config(), adapter_name="a")
    model.add_adapter("b", _mixed_config(alpha=0.5, modules_to_save=None))
    for name in ("a", "b"):
        _randomize(model, name)
    x = torch.randn(3, 24, dtype=torch.float64)
    updates = {name: _updates(model, name, x) for name in ("a", "b")}
    model.add_weighted_adapter(["a", "b"], [0.7, -1.5], "mix")
    mix = _layers(model, "mix")
    mixed = _updates(model, "mix", x)
    for layer, S in mix.items():
        assert S.name == MIXED[layer][0]
        expected = 0.7 * updates["a"][layer] - 1.5 * updates["b"][layer]
        torch.testing.assert_close(mixed[layer], expected, rtol=1e-10, atol=1e-10)
    assert mix[QV[1]].rank == 4 and mix[QV[2]].terms == 4  # the bilinear families concatenate
    model.set_adapter("mix")
    with torch.no_grad():
        before = run(model)
    model.save_pretrained(tmp_path, selected_adapters=["mix"])
    loaded = peft.PeftModel.from_pretrained(pristine, tmp_path / "mix", adapter_name="mix")
    with torch.no_grad():
        assert torch.equal(run(loaded), before)


def test_weighted_adapters_with_different_families_in_a_layer_are_refused():
    torch.manual_seed(0)
    base, _, _ = bert()
    model = peft.get_peft_model(base, _mixed_config(), adapter_name="a")
    model.add_adapter("b", surm.SurmConfig(structure="toeplitz", target_modules=QV))
    with pytest.raises(ValueError, match=r"adapters 'a' \(circulant\) and 'b' \(toeplitz\) at "
                                         r"bert\.encoder\.layer\.0\.attention\.self\.query: .*share the structure"):
        model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "mix")
    assert "mix" not in model.peft_config
    with pytest.raises(ValueError, match=r"combination_type='linear' needs a structure linear"):
        model.add_weighted_adapter(["a"], [1.0], "mix", combination_type="linear")  # low_rank, kronecker layers


# -- errors ---------------------------------------------------------------------------------
@pytest.mark.parametrize("fields, match", [
    (dict(structure_pattern={"fc2": "nope"}), r"structure_pattern\['fc2'\]: unknown structure 'nope'; known"),
    (dict(structure_pattern=["fc2"]), r"structure_pattern must be a dict of module-name pattern -> structure name"),
    (dict(structure_pattern={"fc2": 3}), r"structure_pattern must be a dict"),
    (dict(structure_pattern={"fc(": "toeplitz"}), r"structure_pattern key 'fc\(' is not a valid regex"),
    (dict(structure_pattern={"fc2": "low_rank"}, knob_pattern={"fc2": {"block_size": 4}}),
     r"'block_size' in knob_pattern\['fc2'\] is not a knob of structure 'low_rank'; its knobs: rank"),
    (dict(structure="toeplitz", structure_pattern={"fc2": "low_rank"}, knob_pattern={"fc": {"terms": 2}}),
     r"'terms' in knob_pattern\['fc'\] is not a knob of any structure this config uses \(toeplitz, low_rank\)"),
])
def test_bad_structure_patterns_are_refused(fields, match):
    with pytest.raises(ValueError, match=match):
        surm.SurmConfig(**fields)


def test_a_knob_that_reaches_a_module_of_another_structure_names_it():
    torch.manual_seed(0)
    base, _, _ = mlp()
    pristine = copy.deepcopy(base)
    config = surm.SurmConfig(structure="circulant", target_modules=["fc1", "fc2"],
                             structure_pattern={"fc2": "low_rank"}, knob_pattern={r"fc\d": {"block_size": 2}})
    with pytest.raises(ValueError, match=r"cannot adapt fc2: its structure is 'low_rank' but knob_pattern gives it "
                                         r"block_size \(knobs of low_rank: rank\)"):
        peft.get_peft_model(base, config)
    assert not any(isinstance(m, SurmLayer) for m in base.modules())
    assert all(torch.equal(a, b) for a, b in zip(base.state_dict().values(), pristine.state_dict().values()))


def test_every_field_is_documented_in_the_docstring_the_help_and_the_method_page():
    import dataclasses
    from pathlib import Path

    from peft.config import PeftConfig

    page = (Path(__file__).parents[2] / "docs" / "method.md").read_text()
    inherited = {f.name for f in dataclasses.fields(PeftConfig)}
    for f in dataclasses.fields(surm.SurmConfig):
        if f.name in inherited:
            continue
        assert f"        {f.name} (`" in surm.SurmConfig.__doc__, f.name
        assert f.metadata.get("help"), f.name
        assert re.search(rf"^\| [^|]*`{f.name}`[^|]*\| `", page, re.MULTILINE), f.name  # a row of the field table


@pytest.mark.parametrize("field, value", [
    ("knob_pattern", {"fc3": {"block_size": 2}}),
    ("structure_pattern", {"fc9": "toeplitz"}),
])
def test_a_pattern_key_that_matches_no_target_is_refused(field, value):
    from .tiny_models import mlp

    base, _, _ = mlp()
    before = [type(m) for m in base.modules()]
    config = surm.SurmConfig(structure="circulant", target_modules=["fc1", "fc2"], **{field: value})
    with pytest.raises(ValueError, match=f"{field} key '{next(iter(value))}' matches none of the 2 targeted"):
        peft.get_peft_model(base, config)
    assert [type(m) for m in base.modules()] == before
