"""``surm reproduce``: defaults, the one run store, ``--set`` errors, every experiment alike."""

import argparse
import subprocess
import sys

import pytest

from surm.commands import reproduce
from surm.commands.errors import UsageError
from surm.harness import outputs


def _args(argv):
    parser = argparse.ArgumentParser()
    reproduce.add_parser(parser.add_subparsers())
    return parser.parse_args(["reproduce", *argv])


def _reproduce(argv):
    args = _args(argv)
    return args.func(args)


def test_defaults_quick_preset_outputs_folder_and_the_shared_store():
    args = _args(["nlp"])
    assert args.preset == "quick" and args.out is None and args.store is None
    ((module, config),) = reproduce.configs(args).values()
    assert config == module.PRESETS["quick"]
    assert _args(["nlp", "--quick"]).preset == "quick"


def test_building_the_parser_imports_nothing_heavy():
    code = ("import sys, argparse; from surm.commands import reproduce; "
            "reproduce.add_parser(argparse.ArgumentParser().add_subparsers()); "
            "print(sorted(m for m in ('torch', 'peft', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_prints_the_table_and_uses_the_store_whatever_the_output_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    results = _reproduce(["lowres", "--preset", "smoke", "--out", "elsewhere/lowres", "--seeds", "1", "--quiet",
                          "--set", "methods=['head', 'surm:circulant']"])
    printed = capsys.readouterr().out
    assert "| SURM circulant |" in printed and "Low-resource" in printed
    assert results["lowres"].payload["rows"][0].seeds == [1]
    assert (tmp_path / "elsewhere/lowres/lowres.md").is_file()
    assert list((tmp_path / outputs.RUN_STORE).glob("*.json"))  # outputs/runs, not elsewhere/runs
    assert not (tmp_path / "elsewhere/runs").exists()


def test_pinwheel_runs_like_the_others(tmp_path, capsys):
    results = _reproduce(["pinwheel", "--preset", "smoke", "--out", str(tmp_path / "pw"), "--store",
                          str(tmp_path / "runs"), "--quiet", "--set", "methods=['head', 'surm:circulant']",
                          "--set", "plot=False"])
    assert "| SURM circulant | 16 |" in capsys.readouterr().out
    assert list(results["pinwheel"].payload["curves"]) == ["head", "surm:circulant"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["nlp", "--set", "nope=1"], "nlp: unknown setting 'nope' in --set nope=1; settings: model, methods"),
        (["nlp", "--set", "epochs=many"], "nlp: --set epochs: expected a number, got 'many'"),
        (["nlp", "--set", "methods={'rotten_tomatoes': ['lora']}"], "give a positive rank, e.g. lora:8"),
        (["nlp", "--preset", "huge"], "nlp: unknown preset 'huge'; presets: smoke, quick, full"),
        (["all", "--set", "fractions=[0.1]"], "nlp: unknown setting 'fractions'"),
        (["pinwheel", "--set", "regime=pretend"], "pinwheel: --set regime: expected one of 'random', 'pretrained'"),
        (["nlp", "--stored-only"], "--stored-only: only for llm"),
        (["llm", "--stored-only", "--fresh"], "not with --fresh"),
    ],
)
def test_bad_input_is_a_usage_error_before_anything_runs(argv, message):
    with pytest.raises(UsageError) as err:
        _reproduce(argv)
    assert message in str(err.value)


def test_show_preset_prints_the_settings_with_their_help(capsys):
    assert _reproduce(["lr_sweep", "--preset", "vision", "--set", "seeds=[7]", "--show-preset"]) == {}
    printed = capsys.readouterr().out
    assert printed.startswith("lr_sweep: vision preset:") and "seeds" in printed and "[7]" in printed
    assert "method -> learning rates to try" in printed
