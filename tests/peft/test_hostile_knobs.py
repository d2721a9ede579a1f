"""Knob values no layer can use are refused before anything is allocated: an edited config
with a huge knob costs no memory and leaves the model as it was."""

import re
import subprocess
import sys
import textwrap

import peft
import pytest
import torch
from torch import nn

import surm
from surm import structured


@pytest.mark.parametrize(
    ("family", "knobs", "message"),
    [
        ("ldr", {"rank": 65}, r"ldr: rank=65 is above .* displacement rank <= 64"),
        ("low_rank", {"rank": 17}, r"low_rank: rank=17 .* Use rank <= 16"),
        ("kronecker", {"terms": 100}, r"kronecker: terms=100 is above the Kronecker rank"),
        ("circulant", {"block_size": 128}, r"block_size=128 must divide"),
    ],
)
def test_knob_above_what_the_layer_can_use_is_refused(family, knobs, message):
    with pytest.raises(ValueError, match=message):
        structured.make(family, 16, 64, device="meta", **knobs)


@pytest.mark.parametrize(("family", "knobs"), [("ldr", {"rank": 64}), ("low_rank", {"rank": 16})])
def test_largest_usable_knob_is_accepted(family, knobs):
    S = structured.make(family, 16, 64, dtype=torch.float64, **knobs)
    assert S.knobs()["rank"] == knobs["rank"]


def test_get_peft_model_refuses_a_huge_rank_before_replacing_anything():
    base = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    with pytest.raises(ValueError, match=r"rank=1000000"):
        peft.get_peft_model(base, surm.SurmConfig(structure="ldr", rank=1_000_000, target_modules=["0", "1"]))
    assert all(type(m) is nn.Linear for m in base)


_EDITED = textwrap.dedent("""
    import json, resource, sys, tempfile, torch, peft, surm
    from torch import nn
    torch.manual_seed(0)
    base = nn.Sequential(*[nn.Linear(64, 64) for _ in range(4)])
    path = tempfile.mkdtemp()
    model = peft.get_peft_model(base, surm.SurmConfig(structure="ldr", target_modules=["0", "1", "2", "3"]))
    model.save_pretrained(path)
    base = model.unload()
    file = path + "/adapter_config.json"
    config = json.load(open(file)); config["rank"] = 1_000_000; json.dump(config, open(file, "w"))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        peft.PeftModel.from_pretrained(base, path)
        print("LOADED")
    except ValueError as err:
        print("ERROR", err)
    grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print("GREW_KB", grew)
    print("PLAIN", all(type(m) is nn.Linear for m in base))
""")


def test_edited_config_with_huge_rank_costs_no_memory():
    out = subprocess.run([sys.executable, "-c", _EDITED], capture_output=True, text=True, timeout=300).stdout
    assert "ERROR" in out and "rank=1000000" in out, out
    grew_kb = int(out.split("GREW_KB ")[1].split()[0])
    assert grew_kb < 100 * 1024, f"peak RSS grew {grew_kb} KB"
    assert "PLAIN True" in out


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_inference_mode_that_is_not_a_bool_is_refused(value):
    with pytest.raises((TypeError, ValueError), match="inference_mode"):
        surm.SurmConfig(target_modules=["fc1"], inference_mode=value)


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_alpha_is_refused_at_config_time(alpha):
    with pytest.raises(ValueError, match=r"alpha must be a finite number, got (nan|inf|-inf)"):
        surm.SurmConfig(target_modules=["fc1"], alpha=alpha)


@pytest.mark.parametrize("alpha", [1e30, -2e4])
def test_absurd_alpha_warns_naming_the_value(alpha):
    with pytest.warns(UserWarning, match=rf"alpha={re.escape(repr(alpha))} is above 10000 in magnitude.*alpha=1 fits"):
        config = surm.SurmConfig(target_modules=["fc1"], alpha=alpha)
    assert config.alpha == alpha


@pytest.mark.parametrize("alpha", [1e4, -1e4, 0.0, 16.0])
def test_alpha_within_the_bound_is_quiet(alpha):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        surm.SurmConfig(target_modules=["fc1"], alpha=alpha)
