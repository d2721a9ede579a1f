"""Typed presets: every experiment's presets, coercion, ``--set`` and its errors."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import pytest

from surm import experiments
from surm.experiments import presets
from surm.experiments.presets import Preset, setting
from surm.harness.methods import Method, parse


@dataclass(frozen=True, kw_only=True)
class Toy(Preset):
    seeds: tuple[int, ...] = setting((0,), "seeds")
    epochs: float = setting(1.0, "epochs")
    methods: dict[str, tuple[Method, ...]] = setting({"rotten_tomatoes": ("lora:8",)}, "data set -> methods")
    lr: float | dict[Method, float] | None = setting(None, "learning rate")
    regime: Literal["random", "pretrained"] = setting("random", "regime")
    n_eval: int | None = setting(100, "cap")


TOYS = {"quick": Toy(name="quick")}


@pytest.mark.parametrize("name", experiments.names())
def test_every_experiment_has_typed_frozen_presets_with_help(name):
    module = experiments.load(name)
    assert {"smoke", "quick", "full"} <= set(module.PRESETS)
    kinds = {type(p) for p in module.PRESETS.values()}
    assert len(kinds) == 1  # one preset type per experiment
    kind = kinds.pop()
    assert issubclass(kind, Preset) and kind.__dataclass_params__.frozen
    assert all(help for help in kind.settings().values())  # every setting says what it is
    assert "threads" in kind.settings() and "seeds" in kind.settings()
    for key, preset in module.PRESETS.items():
        assert preset.name == key
        with pytest.raises(dataclasses.FrozenInstanceError):
            preset.seeds = (9,)


def test_values_are_coerced_to_the_field_types():
    toy = Toy(seeds=[1, 2], epochs=2, methods={"r8": ["head", "surm:ldr:rank=2"]}, lr={"lora:8": 3e-3})
    assert toy.seeds == (1, 2) and toy.epochs == 2.0 and isinstance(toy.epochs, float)
    assert toy.methods == {"r8": (parse("head"), parse("surm:ldr:rank=2"))}
    assert toy.lr == {parse("lora:8"): 3e-3}
    assert toy.to_dict()["methods"] == {"r8": ["head", "surm:ldr:rank=2"]}


def test_set_changes_settings_with_dataclasses_replace():
    toy = presets.resolve("toy", TOYS, "quick", ["seeds=[3]", "lr=0.01", "regime=pretrained", "n_eval=None",
                                                 "methods={'r8': ['lora:4']}"])
    assert toy == dataclasses.replace(TOYS["quick"], seeds=(3,), lr=0.01, regime="pretrained", n_eval=None,
                                      methods={"r8": (parse("lora:4"),)})
    assert TOYS["quick"].seeds == (0,)  # the preset itself is unchanged


@pytest.mark.parametrize(
    "item, message",
    [
        ("epochz=2",
         "unknown setting 'epochz' in --set epochz=2; settings: seeds, epochs, methods, lr, regime, n_eval"),
        ("name=big", "unknown setting 'name'"),
        ("seeds", "--set expects KEY=VALUE"),
        ("seeds=1", "--set seeds: expected a list of integers, got 1"),
        ("epochs=fast", "--set epochs: expected a number, got 'fast'"),
        ("epochs=True", "--set epochs: expected a number, got True"),
        ("n_eval=1.5", "--set n_eval: expected an integer or None, got 1.5"),
        ("regime=pretend", "--set regime: expected one of 'random', 'pretrained', got 'pretend'"),
        ("lr=fast", "--set lr: expected a number or a dict {method string (e.g. lora:8): number} or None"),
        ("methods={'r8': ['lora:0']}", "--set methods: method 'lora:0': give a positive rank"),
    ],
)
def test_set_errors_name_the_setting_the_expected_type_and_the_value(item, message):
    with pytest.raises(ValueError) as err:
        presets.resolve("toy", TOYS, "quick", [item])
    assert str(err.value).startswith("toy: ") and message in str(err.value)


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ValueError, match="toy: unknown preset 'huge'; presets: quick"):
        presets.resolve("toy", TOYS, "huge")


def test_describe_lists_every_setting_with_its_help():
    text = presets.describe(TOYS["quick"])
    assert text.startswith("quick preset:")
    for key, help in Toy.settings().items():
        assert f"  {key}" in text and help in text


def test_experiment_checks_run_on_set():
    nlp = experiments.load("nlp")
    with pytest.raises(ValueError, match="train_fraction: give one for r8"):
        presets.resolve("nlp", nlp.PRESETS, "quick", ["methods={'r8': ['head']}"])
    pinwheel = experiments.load("pinwheel")
    with pytest.raises(ValueError, match="the pinwheel applies head, full, lora, surm"):
        presets.resolve("pinwheel", pinwheel.PRESETS, "quick", ["methods=['houlsby:4']"])
