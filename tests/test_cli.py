"""The ``surm`` command line: parser, ``surm approx`` smoke run, ``python -m surm``."""

import importlib.util
import json
import subprocess
import sys

import pytest

from surm import __version__, cli


def _module_exists(name):
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # its package is absent
        return False


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"surm {__version__}"


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "approx" in capsys.readouterr().out


def test_approx_defaults_match_the_study():
    from surm.analysis import approximation as ap

    d = cli.APPROX_DEFAULTS
    assert d["size"] == ap.DEFAULT_SIZE
    assert tuple(d["targets"]) == ap.DEFAULT_TARGETS
    assert tuple(d["families"]) == ap.DEFAULT_FAMILIES
    assert tuple(d["budgets"]) == ap.DEFAULT_BUDGETS
    assert d["trials"] == ap.DEFAULT_TRIALS
    assert d["ldr_steps"] == ap.DEFAULT_LDR_STEPS
    assert d["noise"] == ap.DEFAULT_NOISE


def test_approx_smoke(tmp_path, capsys):
    out = tmp_path / "approx"
    argv = ["approx", "--n", "8", "--trials", "2", "--ldr-steps", "3", "--budgets", "1", "2", "--quiet", "--out", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| target" in printed and "rel. error (mean ± std)" in printed
    for name in ("psd", "gaussian", "lowrank_noise", "near_toeplitz", "circulant", "toeplitz", "ldr"):
        assert name in printed
    data = json.loads((out / "approx.json").read_text())
    assert data["config"]["shape"] == [8, 8] and data["config"]["trials"] == 2
    assert data["config"]["budgets"] == [8, 16]
    assert all(len(r["errors"]) == 2 for r in data["records"])
    assert (out / "approx.png").read_bytes()[:4] == b"\x89PNG"


def test_approx_rectangular_without_plot(tmp_path, capsys):
    argv = ["approx", "--shape", "6", "9", "--targets", "gaussian", "--families", "toeplitz", "kronecker",
            "--trials", "1", "--no-plot", "--quiet", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    data = json.loads((tmp_path / "approx.json").read_text())
    assert data["config"]["shape"] == [6, 9]
    assert {r["family"] for r in data["records"]} == {"toeplitz", "kronecker"}
    assert not (tmp_path / "approx.png").exists()


def test_approx_bad_name_is_a_one_line_error(tmp_path, capsys):
    assert cli.main(["approx", "--targets", "nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown target 'nope'" in err and "Traceback" not in err


def test_python_m_surm_help_imports_no_subcommand_module():
    # -X importtime lists every module imported (on stderr): --help must not load the study
    cmd = [sys.executable, "-X", "importtime", "-m", "surm", "--help"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "approx" in result.stdout and "usage: surm" in result.stdout
    for name in cli.COMMAND_MODULES:  # the subcommands owned by other modules are listed too
        if _module_exists(name):
            assert name.rsplit(".", 1)[-1] in result.stdout
    modules = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert "surm.cli" in modules
    assert not {m for m in modules if m.split(".")[0] == "matplotlib" or m.startswith("surm.analysis")}


def test_module_commands_are_added_and_absent_ones_skipped(monkeypatch, capsys):
    import types

    fake = types.ModuleType("fake_surm_command")

    def add_parser(sub):
        p = sub.add_parser("fake", help="a fake command")
        p.add_argument("--x", type=int, default=1)
        p.set_defaults(func=lambda args: {"x": args.x})  # a result record, not a status

    fake.add_parser = add_parser
    monkeypatch.setitem(sys.modules, "fake_surm_command", fake)
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["surm.commands.does_not_exist", "fake_surm_command"])
    assert "fake" in cli.build_parser().format_help()
    assert cli.main(["fake", "--x", "3"]) == 0
