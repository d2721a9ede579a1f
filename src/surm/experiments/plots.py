"""Plots every experiment shares: one style per method, and accuracy against parameters.

A method's colour says its family (the SURM structure, or the kind: LoRA, BitFit, ...), its
marker says its kind and placement (SURM parallel ``o``, serial ``D``, LoRA ``s``, ...), and
members of one family in one plot (LoRA r=1, 4, 8) go from light to full colour, so points
that sit on top of each other stay apart and every point has its legend entry. Labels go in
a legend, never beside the points.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from surm.harness.methods import Method

__all__ = ["accuracy_vs_params", "count", "dodge", "log_axis", "method_styles", "pyplot", "save"]

FAMILY_COLOURS = {
    "full": "black", "head": "0.55", "bitfit": "saddlebrown", "lora": "tab:blue", "houlsby": "tab:purple",
    "pfeiffer": "orchid", "c3a": "tab:olive", "lokr": "tab:brown", "fourierft": "tab:pink", "vera": "slateblue",
    "circulant": "tab:red", "skew_circulant": "tab:orange", "toeplitz": "tab:green",
    "symmetric_toeplitz": "tab:cyan", "kronecker": "goldenrod", "ldr": "navy", "low_rank": "teal",
}
KIND_MARKERS = {"full": "*", "head": "X", "bitfit": "P", "lora": "s", "houlsby": "^", "pfeiffer": "v", "c3a": "h",
                "lokr": "p", "fourierft": "d", "vera": ">"}
SURM_MARKERS = {"parallel": "o", "serial": "D"}
#: kinds drawn as horizontal reference lines (with their line style) by :func:`accuracy_vs_params`
REFERENCE_LINES = {"head": ":", "full": "--"}


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path) -> Path:
    """Save ``fig`` as a PNG (legends outside the axes included) and close it."""
    fig.savefig(path, dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    return path


def method_styles(methods: Iterable[Method]) -> dict[Method, dict[str, Any]]:
    """``{method: {"color", "marker"}}`` for the methods of one plot (see the module docstring)."""
    from matplotlib import colors

    methods = list(dict.fromkeys(methods))
    groups: dict[tuple[str, str], list[Method]] = {}
    for m in methods:
        groups.setdefault((m.family, _marker(m)), []).append(m)
    styles = {}
    for (family, marker), members in groups.items():
        base = colors.to_rgb(FAMILY_COLOURS.get(family, f"C{sum(map(ord, family)) % 10}"))
        for i, m in enumerate(members):
            light = 0.55 * (len(members) - 1 - i) / max(len(members) - 1, 1)  # first lightest, last full
            styles[m] = {"color": tuple(c + (1 - c) * light for c in base), "marker": marker}
    return styles


def _marker(method: Method) -> str:
    return SURM_MARKERS[method.placement] if method.kind == "surm" else KIND_MARKERS.get(method.kind, "o")


def log_axis(ax) -> None:
    """A log x axis with ticks at 1, 2 and 5 of each decade, written 500, 2k, 1.5M."""
    from matplotlib import ticker

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: count(v)))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())


def count(n: float) -> str:
    """``500``, ``2k``, ``1.5M``."""
    for size, suffix in ((1e6, "M"), (1e3, "k")):
        if n >= size:
            return f"{n / size:g}{suffix}"
    return f"{n:g}"


def dodge(xs: Sequence[float], step: float = 0.06) -> list[float]:
    """Positions on a log axis that move points with equal ``xs`` a little apart, side by side
    (by ``10**step`` each), so that methods with the same parameter count do not hide each
    other."""
    out = list(xs)
    for x in set(xs):
        same = [i for i, v in enumerate(xs) if v == x]
        for k, i in enumerate(same):
            out[i] = x * 10 ** (step * (k - (len(same) - 1) / 2))
    return out


def accuracy_vs_params(panels: dict[str, Sequence[Any]], path: Path, title: str, metric: str = "accuracy") -> Path:
    """One panel per entry of ``panels`` (title -> rows of :func:`report.aggregate`): test
    ``metric`` (mean ± std over seeds) against trainable parameters without the head (log
    axis; equal counts :func:`dodge` d), with one legend for all panels. Head only (no such
    parameter) and full fine-tuning (all of them) are horizontal lines, mean ± std shaded, so
    that the axis spans the adapters."""
    plt = pyplot()
    rows = [r for rs in panels.values() for r in rs]
    styles = method_styles(r.method for r in rows)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.0 * len(panels), 4.4), squeeze=False)
    handles = {}
    for ax, (panel, prows) in zip(axes[0], panels.items()):
        points = [r for r in prows if r.method.kind not in REFERENCE_LINES]
        for x, r in zip(dodge([max(r.adapter_params, 1) for r in points]), points):
            mean, sd = getattr(r, metric)
            handle = ax.errorbar(x, 100 * mean, yerr=100 * sd, capsize=3, ms=7, lw=1,
                                 fmt=styles[r.method]["marker"], color=styles[r.method]["color"], mec="black", mew=0.5)
            handles.setdefault(r.label, handle)
        for r in prows:
            if r.method.kind in REFERENCE_LINES:
                mean, sd = getattr(r, metric)
                colour = styles[r.method]["color"]
                handle = ax.axhline(100 * mean, color=colour, lw=1.2, ls=REFERENCE_LINES[r.method.kind])
                ax.axhspan(100 * (mean - sd), 100 * (mean + sd), color=colour, alpha=0.08, lw=0)
                handles.setdefault(f"{r.label} ({r.adapter_params:,} parameters)", handle)
        log_axis(ax)
        ax.margins(x=0.08)
        ax.set_xlabel("trainable parameters without the head (log scale)")
        ax.set_ylabel(f"test {'accuracy' if metric == 'accuracy' else 'macro-F1'} (%)")
        ax.set_title(panel)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.legend(handles.values(), handles.keys(), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8,
               title="method", frameon=False)
    return save(fig, path)
