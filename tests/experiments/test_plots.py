"""Shared plots: a style per method that tells families apart, legends instead of labels."""

from types import SimpleNamespace

from surm.experiments import plots
from surm.harness.methods import parse

NLP_METHODS = [parse(m) for m in (
    "full", "head", "bitfit", "lora:1", "lora:4", "lora:8", "houlsby:32", "pfeiffer:24", "surm:circulant",
    "surm:skew_circulant", "surm:toeplitz", "surm:symmetric_toeplitz", "surm:kronecker", "surm:ldr:rank=1",
    "surm:circulant:serial", "surm:toeplitz:serial", "c3a:64")]


def test_every_method_of_a_plot_has_its_own_style():
    styles = plots.method_styles(NLP_METHODS)
    looks = {(s["color"], s["marker"]) for s in styles.values()}
    assert len(looks) == len(NLP_METHODS)
    # the families that share 4,608 parameters differ in colour
    same_point = ["surm:circulant", "surm:skew_circulant", "surm:symmetric_toeplitz"]
    assert len({styles[parse(m)]["color"] for m in same_point}) == 3
    # placement changes the marker, the family keeps its colour
    parallel, serial = styles[parse("surm:circulant")], styles[parse("surm:circulant:serial")]
    assert parallel["color"] == serial["color"] and parallel["marker"] != serial["marker"]


def test_dodge_moves_equal_counts_apart_and_keeps_the_others():
    xs = plots.dodge([4608, 4608, 4608, 9216])
    assert len(set(xs)) == 4 and xs[3] == 9216 and xs[1] == 4608 and xs[0] < 4608 < xs[2]


def test_count_labels():
    assert [plots.count(v) for v in (500, 2000, 1.5e6)] == ["500", "2k", "1.5M"]


def test_accuracy_vs_params_has_a_legend_and_no_point_labels(tmp_path, monkeypatch):
    rows = [SimpleNamespace(method=m, label=m.label, adapter_params=1000 * (i + 1), accuracy=(0.7, 0.01))
            for i, m in enumerate(NLP_METHODS)]
    saved = {}
    monkeypatch.setattr(plots, "save", lambda fig, path: saved.update(fig=fig) or path)
    plots.accuracy_vs_params({"panel": rows}, tmp_path / "p.png", title="Accuracy against parameters")
    fig = saved["fig"]
    (legend,) = fig.legends
    assert len(legend.get_texts()) == len(rows)
    assert not fig.axes[0].texts  # nothing written beside the points
    assert fig._suptitle.get_text() == "Accuracy against parameters"
    plots.pyplot().close(fig)
