"""The ``surm`` command line: the dispatcher, its help (instant, no torch), the one error
convention, ``python -m surm``, and ``surm approx``."""

import json
import subprocess
import sys
import types

import pytest

from surm._version import __version__
from surm.commands import main as cli
from surm.commands.errors import UsageError

HEAVY = ("torch", "peft", "transformers", "numpy", "matplotlib")
COMMANDS = ("approx", "finetune", "plan", "reproduce", "bench")

# prints "<command>|<heavy modules imported>|<help length>" per command, in one process
HELP_PROBE = """
import contextlib, io, sys
from surm.commands.main import main
for command in ([], *[[c] for c in sys.argv[1:]]):
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        try:
            main([*command, "--help"])
        except SystemExit as exit:
            assert exit.code == 0, exit.code
    heavy = [m for m in {heavy!r} if m in sys.modules]
    print(" ".join(command) or "surm", ",".join(heavy), len(text.getvalue()), sep="|")
"""


def _one_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"surm {__version__}"


def test_every_command_is_checked_here():
    assert [command.__name__.rsplit(".", 1)[-1] for command in cli.COMMANDS] == list(COMMANDS)


def test_no_command_prints_help_and_fails(capsys):
    assert cli.main([]) == 2
    out = capsys.readouterr().out
    assert "usage: surm" in out and all(name in out for name in COMMANDS)


def test_help_of_every_command_imports_neither_torch_nor_peft_nor_transformers():
    probe = HELP_PROBE.replace("{heavy!r}", repr(HEAVY))
    result = subprocess.run([sys.executable, "-c", probe, *COMMANDS], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split("|") for line in result.stdout.splitlines()]
    assert [row[0] for row in rows] == ["surm", *COMMANDS]
    for name, heavy, length in rows:
        assert heavy == "", f"surm {name} --help imported {heavy}"
        assert int(length) > 200, name  # the help was printed


def test_python_m_surm_help_and_version():
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "surm", "--help"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage: surm" in result.stdout and all(name in result.stdout for name in COMMANDS)
    modules = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert "surm.commands.main" in modules
    assert not {m for m in modules if m.split(".")[0] in HEAVY}, "python -m surm --help imported a heavy module"
    version = subprocess.run([sys.executable, "-m", "surm", "--version"], capture_output=True, text=True, timeout=300)
    assert version.returncode == 0 and version.stdout.strip() == f"surm {__version__}"


@pytest.mark.parametrize("argv, message", [
    (["nope"], "surm: error: argument <command>: invalid choice: 'nope'"),
    (["finetune", "--data"], "surm finetune: error: argument --data: expected one argument"),
    (["approx", "--trials", "many"], "surm approx: error: argument --trials: invalid int value: 'many'"),
    (["reproduce"], "surm reproduce: error: the following arguments are required: experiment"),
    (["finetune", "--method", "lora:8", "--adapter-config", "a.json"],
     "surm finetune: error: argument --adapter-config: not allowed with argument --method"),
])
def test_argparse_errors_are_one_line_with_status_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert _one_line(captured.err).startswith(message) and captured.out == ""


def _fake_command(run):
    fake = types.ModuleType("fake_command")

    def add_parser(subparsers):
        p = subparsers.add_parser("fake", help="a fake command")
        p.add_argument("--x", type=int, default=1)
        p.set_defaults(func=run)

    fake.add_parser = add_parser
    return fake


def test_a_usage_error_is_one_line_with_status_2(monkeypatch, capsys):
    def run(args):
        raise UsageError("bad value\n  on two lines")

    monkeypatch.setattr(cli, "COMMANDS", (*cli.COMMANDS, _fake_command(run)))
    assert cli.main(["fake"]) == 2
    captured = capsys.readouterr()
    assert captured.err == "surm fake: error: bad value on two lines\n" and captured.out == ""


def test_a_command_returns_a_status_or_a_record(monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", (_fake_command(lambda args: {"x": args.x}),))
    assert cli.main(["fake", "--x", "3"]) == 0
    monkeypatch.setattr(cli, "COMMANDS", (_fake_command(lambda args: args.x),))
    assert cli.main(["fake", "--x", "3"]) == 3


def test_other_errors_keep_their_traceback(monkeypatch):
    def run(args):
        raise ValueError("a bug, not a usage error")

    monkeypatch.setattr(cli, "COMMANDS", (_fake_command(run),))
    with pytest.raises(ValueError, match="a bug"):
        cli.main(["fake"])


def test_a_usage_error_from_the_shell_has_no_traceback(tmp_path):
    argv = [sys.executable, "-m", "surm", "approx", "--targets", "nope", "--output-dir", str(tmp_path)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert _one_line(result.stderr).startswith("surm approx: error: unknown target 'nope'; known targets: psd,")
    assert not (tmp_path / "approx.json").exists()


# --------------------------------------------------------------------------- surm approx


def test_approx_help_shows_the_studys_defaults(capsys):
    from surm.analysis import approximation as ap

    with pytest.raises(SystemExit):
        cli.main(["approx", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert f"square targets of size n x n (default: {ap.DEFAULT_SIZE})" in out
    assert f"(default: {list(ap.DEFAULT_FAMILIES)})".replace(" ", "") in out.replace(" ", "")
    assert f"L-BFGS iterations per LDR fit (default: {ap.DEFAULT_LDR_STEPS})" in out
    assert "(default: outputs/approx)" in out


def test_approx_smoke(tmp_path, capsys):
    out = tmp_path / "approx"
    argv = ["approx", "--n", "8", "--trials", "2", "--ldr-steps", "3", "--budgets", "1", "2", "--quiet",
            "--output-dir", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| target" in printed and "rel. error (mean ± std)" in printed
    for name in ("psd", "gaussian", "lowrank_noise", "near_toeplitz", "circulant", "toeplitz", "ldr"):
        assert name in printed
    data = json.loads((out / "approx.json").read_text())
    assert data["config"]["shape"] == [8, 8] and data["config"]["trials"] == 2
    assert data["config"]["budgets"] == [8, 16] and data["config"]["version"] == __version__
    assert all(len(r["errors"]) == 2 for r in data["records"])
    assert (out / "approx.png").read_bytes()[:4] == b"\x89PNG"


def test_approx_writes_under_outputs_by_default(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["approx", "--shape", "6", "9", "--targets", "gaussian", "--families", "toeplitz", "kronecker",
            "--trials", "1", "--no-plot", "--quiet"]
    assert cli.main(argv) == 0
    data = json.loads((tmp_path / "outputs" / "approx" / "approx.json").read_text())
    assert data["config"]["shape"] == [6, 9]
    assert {r["family"] for r in data["records"]} == {"toeplitz", "kronecker"}
    assert not (tmp_path / "outputs" / "approx" / "approx.png").exists()
    assert "outputs/approx/approx.json" in capsys.readouterr().out


def test_approx_old_out_flag_still_works(tmp_path, capsys):
    argv = ["approx", "--n", "4", "--targets", "gaussian", "--families", "circulant", "--trials", "1", "--no-plot",
            "--quiet", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    assert (tmp_path / "approx.json").is_file()


def test_approx_bad_name_is_a_one_line_error(tmp_path, capsys):
    assert cli.main(["approx", "--families", "circulant", "hexagonal", "--output-dir", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert _one_line(captured.err).startswith("surm approx: error: unknown family 'hexagonal'; known families:")
    assert not (tmp_path / "approx.json").exists()
