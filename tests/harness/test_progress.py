"""Progress off a terminal (a log, a pipe, CI): about one line per run, not one per step."""

from surm.commands.main import main


def test_an_experiment_logs_about_two_lines_per_run(tmp_path, capfd):
    status = main(["reproduce", "nlp", "--preset", "smoke", "--out", str(tmp_path / "out"),
                   "--store", str(tmp_path / "store")])
    assert status == 0
    err = capfd.readouterr().err
    redraws = err.count("\r") + err.count("\n")
    assert "nlp [1/4] rotten_tomatoes head seed 0" in err and "nlp [4/4]" in err
    assert "\x1b[A" not in err  # no cursor-up of nested bars
    assert redraws <= 4 * 4  # the smoke preset has 4 runs; before: 84 updates


def test_a_single_bar_redraws_rarely_off_a_terminal(tmp_path, capfd):
    status = main(["reproduce", "pinwheel", "--preset", "smoke", "--out", str(tmp_path / "pw")])
    assert status == 0
    err = capfd.readouterr().err
    assert err.count("\r") <= 3
