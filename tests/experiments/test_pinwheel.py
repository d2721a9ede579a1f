"""The pinwheel experiment: data generator, parameter matching, and a smoke run on the
experiments' protocol (typed preset, runner, report)."""

import json

import pytest
import torch

from surm.experiments import pinwheel as pw
from surm.experiments import presets, report
from surm.harness.methods import parse
from surm.harness.runs import Runner

QUIET = Runner(None, progress=False)


def test_data_is_seeded_balanced_and_shaped():
    x, y = pw.pinwheel(n_per_class=30, seed=3)
    x2, y2 = pw.pinwheel(n_per_class=30, seed=3)
    x3, _ = pw.pinwheel(n_per_class=30, seed=4)
    assert x.shape == (150, 2) and x.dtype == torch.float32
    assert y.shape == (150,) and y.dtype == torch.int64
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, x3)
    assert torch.bincount(y).tolist() == [30] * 5
    radius = x.norm(dim=1)
    assert 0.8 < radius.mean().item() < 1.2  # arms start at radius 1 (radial_std 0.3)


def test_arms_turn_with_radius():
    # the angle of class k is 2*pi*k/5 + rate*exp(r): outer points of an arm are rotated further
    x, y = pw.pinwheel(n_per_class=400, tangential_std=0.0, seed=0)
    arm = x[y == 0]
    r, angle = arm.norm(dim=1), torch.atan2(arm[:, 1], arm[:, 0])
    expected = 0.25 * torch.exp(r)
    assert torch.allclose(angle, expected, atol=1e-4)


def test_parameter_counts_match_the_claims_at_width_64():
    counts = pw.parameter_counts(64)
    adapted = {m: c["adapted"] for m, c in counts.items()}
    assert adapted == {
        "head": 0,
        "full": 64 * 64,
        "lora:1:alpha=1": 128,
        "lora:4:alpha=4": 512,
        "surm:circulant": 64,
        "surm:symmetric_toeplitz": 64,
        "surm:toeplitz": 127,
        "surm:ldr:rank=1": 128,
    }
    assert all(c["trainable"] == c["adapted"] for c in counts.values())  # nothing else trains


def test_others_trainable_adds_the_input_and_output_layers():
    counts = pw.parameter_counts(64, methods=("head", "surm:circulant", "lora:1"), regime="others_trainable")
    others = (2 * 64 + 64) + (64 * 5 + 5)
    assert {m: c["trainable"] - c["adapted"] for m, c in counts.items()} == dict.fromkeys(counts, others)
    assert counts["surm:circulant"]["adapted"] == 64


@pytest.mark.parametrize("method", ["lora:1:alpha=1", "surm:circulant", "surm:toeplitz", "surm:ldr:rank=1"])
def test_updates_start_at_zero_and_base_stays_frozen(method):
    base = pw.PinwheelMLP(16)
    model = pw.adapt(base, method)
    x, _ = pw.pinwheel(n_per_class=5)
    torch.testing.assert_close(model(x), base(x))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".hidden." in n and "base_layer" not in n for n in trainable)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("pinwheel")
    outcome = pw.run(pw.PRESETS["smoke"], out, QUIET)
    assert isinstance(outcome, report.Outcome) and outcome.experiment == "pinwheel"
    return out, outcome.payload["summary"]


def test_smoke_run_writes_sane_files(smoke):
    out, summary = smoke
    assert {p.name for p in out.iterdir()} >= {"pinwheel.json", "pinwheel.md", "pinwheel.png"}
    payload = json.loads((out / "pinwheel.json").read_text())
    assert payload["summary"] == json.loads(json.dumps(summary))
    assert list(payload["curves"]) == list(pw.METHODS)
    assert payload["config"]["methods"] == list(pw.METHODS) and payload["summary"]["preset"] == "smoke"
    n = len(payload["steps"])
    assert payload["steps"][0] == 0 and payload["steps"][-1] == summary["steps"]
    for c in payload["curves"].values():
        assert len(c["mean"]) == len(c["std"]) == n and all(len(r) == n for r in c["runs"])
        assert all(v > 0 for v in c["mean"])
    for m in summary["methods"].values():
        assert 0 < m["final_loss_mean"] < 10 and 0 <= m["train_acc_mean"] <= 1 and 0 <= m["test_acc_mean"] <= 1
    table = (out / "pinwheel.md").read_text()
    assert all(f"| {m['label']} | {m['adapted_params']} |" in table for m in summary["methods"].values())
    assert (out / "pinwheel.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_smoke_run_every_method_starts_at_the_frozen_loss_and_full_goes_below_it(smoke):
    # zero-initialised updates: step 0 of every curve is the frozen network's loss
    out, summary = smoke
    curves = json.loads((out / "pinwheel.json").read_text())["curves"]
    frozen = curves["head"]["mean"][0]
    assert all(c["mean"][0] == pytest.approx(frozen, rel=1e-4) for c in curves.values())
    assert summary["methods"]["full"]["final_loss_mean"] < summary["methods"]["head"]["final_loss_mean"]


def test_pretrained_regime_reports_the_pretrained_loss(tmp_path):
    config = pw.PRESETS["smoke"].replace(regime="pretrained", methods=("head", "full"), plot=False)
    summary = pw.run(config, tmp_path, QUIET).payload["summary"]
    assert summary["regime"] == "pretrained" and summary["pretrained_loss_mean"] > 0
    assert not (tmp_path / "pinwheel.png").exists()


def test_methods_are_the_shared_vocabulary():
    config = pw.PRESETS["quick"]
    assert all(m == parse(m.name) for m in config.methods)
    assert pw.lr_of(config, parse("surm:toeplitz")) == 0.3 and pw.lr_of(config, parse("head")) == config.lr_default
    assert pw.lr_of(config.replace(lr=0.01), parse("full")) == 0.01
    assert pw.label(parse("head")) == "frozen (no update)" and pw.label(parse("lora:1:alpha=1")) == "LoRA r=1 alpha=1"


def test_lora_scale_is_one_as_the_method_string_says():
    model = pw.adapt(pw.PinwheelMLP(16), "lora:4:alpha=4")
    assert model.base_model.model.hidden.scaling["default"] == 1.0


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="unknown preset"):
        presets.resolve("pinwheel", pw.PRESETS, "huge")
    with pytest.raises(ValueError, match="unknown setting 'epochs'"):
        presets.resolve("pinwheel", pw.PRESETS, "smoke", ["epochs=3"])
    with pytest.raises(ValueError, match="regime"):
        pw.PRESETS["smoke"].replace(regime="pretend")
    with pytest.raises(ValueError, match="the pinwheel applies head, full, lora, surm"):
        pw.PRESETS["smoke"].replace(methods=("surm:circulant:serial",))
