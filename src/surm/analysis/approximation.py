"""The approximation study (the paper's Fig. 1, left).

Approximate target matrices M (m x n) with every structured family at matched parameter
budgets and report the relative Frobenius error ``||M - P(M)||_F / ||M||_F`` over trials.

Pieces, each usable on its own:

- :func:`make_target`: the target matrices (``psd``, ``gaussian``, ``lowrank_noise``,
  ``near_toeplitz``, ``near_circulant``, ``near_kronecker``), float64, seeded;
- :func:`candidates` / :func:`match_budget` / :func:`plan`: which knob setting each family
  gets for a parameter budget (the largest setting whose parameter count fits);
- :func:`fit` / :func:`relative_error`: one projection and its error;
- :func:`run_study`: the whole grid, returning :class:`Record` s (per-trial errors, mean, std);
- :func:`format_table`, :func:`save_json`, :func:`plot_records`: the outputs.

Budgets are absolute parameter counts; :func:`budgets_from_multiples` turns multiples of
``N = max(m, n)`` (the size of one circulant) into them.
"""

from __future__ import annotations

import json
import math
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from surm import structured
from surm.analysis.approximation_defaults import (  # noqa: F401  (part of this module's API)
    DEFAULT_BUDGETS,
    DEFAULT_FAMILIES,
    DEFAULT_LDR_STEPS,
    DEFAULT_NOISE,
    DEFAULT_SIZE,
    DEFAULT_TARGETS,
    DEFAULT_TRIALS,
)

# ---------------------------------------------------------------------------------------
# targets
# ---------------------------------------------------------------------------------------


def _randn(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=generator, dtype=torch.float64)


def _add_noise(M: torch.Tensor, noise: float, generator: torch.Generator) -> torch.Tensor:
    """M plus Gaussian noise E scaled so that ``||E||_F = noise * ||M||_F``."""
    if noise == 0:
        return M
    E = _randn(generator, *M.shape)
    return M + E * (noise * M.norm() / E.norm())


def _psd(m: int, n: int, generator: torch.Generator, noise: float) -> torch.Tensor:
    """Wishart ``G G^T / N`` with G Gaussian N x N, N = max(m, n); its top-left m x n corner
    when m != n (a PSD matrix is square)."""
    N = max(m, n)
    G = _randn(generator, N, N)
    return (G @ G.T / N)[:m, :n]


def _gaussian(m: int, n: int, generator: torch.Generator, noise: float) -> torch.Tensor:
    """iid N(0, 1) entries."""
    return _randn(generator, m, n)


def lowrank_rank(m: int, n: int) -> int:
    """The rank of the ``lowrank_noise`` target's low-rank part: max(1, min(m, n) // 16)."""
    return max(1, min(m, n) // 16)


def _lowrank_noise(m: int, n: int, generator: torch.Generator, noise: float) -> torch.Tensor:
    """``U V^T`` of rank k = :func:`lowrank_rank` (U, V Gaussian) plus relative noise."""
    k = lowrank_rank(m, n)
    L = _randn(generator, m, k) @ _randn(generator, k, n) / math.sqrt(k)
    return _add_noise(L, noise, generator)


def _toeplitz_from(t: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """t (m+n-1) -> T (m, n) with ``T[i, j] = t[i - j + n - 1]``."""
    index = torch.arange(m).unsqueeze(1) - torch.arange(n).unsqueeze(0) + (n - 1)
    return t[index]


def _near_toeplitz(m: int, n: int, generator: torch.Generator, noise: float) -> torch.Tensor:
    """A Toeplitz matrix with N(0, 1) diagonals plus relative noise."""
    return _add_noise(_toeplitz_from(_randn(generator, m + n - 1), m, n), noise, generator)


def _near_circulant(m: int, n: int, generator: torch.Generator, noise: float) -> torch.Tensor:
    """The m x n corner of an N x N circulant (N = max(m, n), N(0, 1) column) plus relative noise."""
    N = max(m, n)
    c = _randn(generator, N)
    C = c[(torch.arange(N).unsqueeze(1) - torch.arange(N).unsqueeze(0)) % N]
    return _add_noise(C[:m, :n], noise, generator)


def _near_kronecker(m: int, n: int, generator: torch.Generator, noise: float) -> torch.Tensor:
    """``A (x) B`` with Gaussian factors of the shapes :func:`surm.structured.auto_factors`
    picks, plus relative noise."""
    (a1, a2), (b1, b2) = structured.auto_factors(m, n)
    return _add_noise(torch.kron(_randn(generator, a1, a2), _randn(generator, b1, b2)), noise, generator)


_TARGETS: dict[str, Callable[[int, int, torch.Generator, float], torch.Tensor]] = {
    "psd": _psd,
    "gaussian": _gaussian,
    "lowrank_noise": _lowrank_noise,
    "near_toeplitz": _near_toeplitz,
    "near_circulant": _near_circulant,
    "near_kronecker": _near_kronecker,
}


def target_names() -> list[str]:
    """The known target names."""
    return list(_TARGETS)


def trial_seed(seed: int, trial: int, target: str) -> int:
    """A seed for (study seed, trial, target): a target's matrices do not depend on which
    other targets are in the study."""
    return int(np.random.SeedSequence([seed, trial, zlib.crc32(target.encode())]).generate_state(1)[0])


def make_target(name: str, m: int, n: int, seed: int, noise: float = DEFAULT_NOISE) -> torch.Tensor:
    """Target matrix ``name`` of shape (m, n), float64, from ``seed``.

    ``noise`` is the relative Frobenius size of the Gaussian noise added to the
    ``lowrank_noise`` and ``near_*`` targets (ignored by ``psd`` and ``gaussian``).
    """
    if name not in _TARGETS:
        raise ValueError(f"unknown target {name!r}; known targets: {', '.join(_TARGETS)}")
    generator = torch.Generator().manual_seed(seed)
    return _TARGETS[name](m, n, generator, noise)


# ---------------------------------------------------------------------------------------
# budgets -> knobs
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One family at one knob setting, with its parameter count for an m x n matrix."""

    family: str
    knobs: tuple[tuple[str, Any], ...]  # hashable (name, value) pairs, passed to project()
    params: int

    @property
    def knob_dict(self) -> dict[str, Any]:
        return dict(self.knobs)

    @property
    def label(self) -> str:
        """The knobs as text, e.g. ``block_size=16`` or ``-`` for none."""
        return ", ".join(f"{k}={v}" for k, v in self.knobs) or "-"


def _divisors(k: int) -> list[int]:
    return [d for d in range(1, k + 1) if k % d == 0]


def candidates(family: str, m: int, n: int) -> list[Setting]:
    """Every knob setting of ``family`` for an m x n matrix, by increasing parameter count.

    circulant: ``block_size=None`` (max(m, n) params) and every block size b dividing m and
    n (m*n/b params); skew_circulant, toeplitz, symmetric_toeplitz: their one size;
    kronecker: auto factors with 1.. terms; low_rank: rank 1..min(m, n); ldr: rank 1..N;
    the product forms as their plain counterparts with twice the parameters (circulant_product
    with the block sizes, skew_circulant_product and toeplitz_product their one size).
    """
    N = max(m, n)
    if family == "circulant":
        out = [Setting(family, (("block_size", None),), N)]
        out += [Setting(family, (("block_size", b),), m * n // b) for b in reversed(_divisors(math.gcd(m, n)))]
    elif family == "skew_circulant":
        out = [Setting(family, (), N)]
    elif family == "toeplitz":
        out = [Setting(family, (), m + n - 1)]
    elif family == "symmetric_toeplitz":
        out = [Setting(family, (), N)]
    elif family == "kronecker":
        (a1, a2), (b1, b2) = structured.auto_factors(m, n)
        per_term = a1 * a2 + b1 * b2
        out = [Setting(family, (("terms", k),), k * per_term) for k in range(1, min(a1 * a2, b1 * b2) + 1)]
    elif family == "low_rank":
        out = [Setting(family, (("rank", r),), r * (m + n)) for r in range(1, min(m, n) + 1)]
    elif family == "ldr":
        out = [Setting(family, (("rank", r),), 2 * r * N) for r in range(1, N + 1)]
    elif family == "circulant_product":
        out = [Setting(family, (("block_size", None),), 2 * N)]
        out += [Setting(family, (("block_size", b),), 2 * m * n // b) for b in reversed(_divisors(math.gcd(m, n)))]
    elif family in ("skew_circulant_product", "toeplitz_product"):
        out = [Setting(family, (), 2 * N)]
    else:
        raise ValueError(f"unknown family {family!r}; known families: {', '.join(structured.names())}")
    return sorted(out, key=lambda s: s.params)  # stable: ties keep the order above


def match_budget(family: str, m: int, n: int, budget: int) -> Setting | None:
    """The setting of ``family`` with the most parameters not above ``budget`` (None if even
    the smallest setting is over budget). Ties go to the simplest setting (e.g. one padded
    circulant before a grid of blocks of the same size)."""
    best = None
    for s in candidates(family, m, n):
        if s.params <= budget and (best is None or s.params > best.params):
            best = s
    return best


def budgets_from_multiples(multiples: Iterable[float], m: int, n: int) -> list[int]:
    """Parameter budgets ``round(k * N)``, N = max(m, n), for each multiple k (sorted, unique)."""
    N = max(m, n)
    return sorted({int(round(k * N)) for k in multiples})


def plan(families: Sequence[str], m: int, n: int, budgets: Sequence[int]) -> list[tuple[Setting, int]]:
    """The distinct (setting, budget) points of the study: for each family and budget the
    matched setting; a setting matched by several budgets appears once, with the smallest."""
    points: list[tuple[Setting, int]] = []
    seen: set[Setting] = set()
    for family in families:
        for budget in sorted(budgets):
            s = match_budget(family, m, n, budget)
            if s is not None and s not in seen:
                seen.add(s)
                points.append((s, budget))
    return points


# ---------------------------------------------------------------------------------------
# fitting
# ---------------------------------------------------------------------------------------


def fit(M: torch.Tensor, setting: Setting, *, ldr_steps: int = DEFAULT_LDR_STEPS, seed: int = 0) -> torch.Tensor:
    """The dense (m, n) approximation of M by ``setting``'s family (its ``project``).

    LDR is fitted by L-BFGS for ``ldr_steps`` iterations; its random start (rank >= 3) is
    drawn from ``seed`` without touching the global torch RNG.
    """
    cls = structured.get(setting.family)
    knobs = setting.knob_dict
    if setting.family == "ldr":
        knobs["steps"] = ldr_steps
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.enable_grad():
            P = cls.project(M, **knobs)
    with torch.no_grad():
        return P.dense().to(M.dtype)


def relative_error(M: torch.Tensor, P: torch.Tensor) -> float:
    """``||M - P||_F / ||M||_F`` (float64)."""
    M64, P64 = M.detach().to(torch.float64), P.detach().to(torch.float64)
    return float((M64 - P64).norm() / M64.norm())


def check_study(m: int, n: int, targets: Sequence[str], families: Sequence[str], trials: int) -> None:
    """ValueError naming the problem (and the valid choices) if the study cannot run."""
    if m < 1 or n < 1:
        raise ValueError(f"the target shape must be positive, got {m} x {n}")
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    for t in targets:
        if t not in _TARGETS:
            raise ValueError(f"unknown target {t!r}; known targets: {', '.join(_TARGETS)}")
    for f in families:
        if f not in structured.names():
            raise ValueError(f"unknown family {f!r}; known families: {', '.join(structured.names())}")


@dataclass
class Record:
    """One study point: a family setting on one target, over all trials."""

    target: str
    family: str
    knobs: dict[str, Any]
    knob: str
    params: int
    budget: int
    errors: list[float] = field(default_factory=list)  # one per trial
    seconds: list[float] = field(default_factory=list)  # fit time per trial

    @property
    def mean(self) -> float:
        return float(np.mean(self.errors)) if self.errors else float("nan")

    @property
    def std(self) -> float:
        """Sample standard deviation over trials (0 for one trial)."""
        return float(np.std(self.errors, ddof=1)) if len(self.errors) > 1 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = self.mean, self.std
        return d


def run_study(
    m: int,
    n: int,
    *,
    targets: Sequence[str] = DEFAULT_TARGETS,
    families: Sequence[str] = DEFAULT_FAMILIES,
    budgets: Sequence[int] | None = None,
    trials: int = DEFAULT_TRIALS,
    seed: int = 0,
    ldr_steps: int = DEFAULT_LDR_STEPS,
    noise: float = DEFAULT_NOISE,
    threads: int | None = 1,
    progress: bool = True,
) -> list[Record]:
    """Fit every (target, family setting) pair on ``trials`` seeded target draws.

    ``budgets`` are absolute parameter counts (default: :data:`DEFAULT_BUDGETS` times
    max(m, n)). ``threads``: torch threads during the study (restored afterwards; None keeps
    the current setting). The default 1 is deliberate: the matrices are small, and the LDR
    fits ran 10x slower with 2 threads on a busy 2-core machine.
    Returns records ordered by target, then family (as given), then params.
    """
    check_study(m, n, targets, families, trials)
    if budgets is None:
        budgets = budgets_from_multiples(DEFAULT_BUDGETS, m, n)
    points = plan(families, m, n, budgets)
    records = {
        (t, s): Record(t, s.family, s.knob_dict, s.label, s.params, b) for t in targets for s, b in points
    }
    from surm.harness.progress import bar as progress_bar
    from surm.harness.threads import torch_threads

    bar = progress_bar(trials * len(records), "approx", progress, unit="fit")
    try:
        with torch_threads(threads):
            for trial in range(trials):
                for t in targets:
                    s_trial = trial_seed(seed, trial, t)
                    M = make_target(t, m, n, s_trial, noise)
                    for s, _ in points:
                        start = time.perf_counter()
                        P = fit(M, s, ldr_steps=ldr_steps, seed=s_trial)
                        records[(t, s)].seconds.append(time.perf_counter() - start)
                        records[(t, s)].errors.append(relative_error(M, P))
                        if bar is not None:
                            bar.update()
    finally:
        if bar is not None:
            bar.close()
    return list(records.values())


# ---------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------


def format_table(records: Sequence[Record]) -> str:
    """A plain-text table: target, family, knob, params, rel. error mean ± std (a markdown
    pipe table, readable in a terminal too)."""
    header = ["target", "family", "knob", "params", "rel. error (mean ± std)"]
    rows = [[r.target, r.family, r.knob, str(r.params), f"{r.mean:.4f} ± {r.std:.4f}"] for r in records]
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    right = {3}

    def line(cells: Sequence[str]) -> str:
        padded = (c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
        return "| " + " | ".join(padded) + " |"

    sep = "|" + "|".join("-" * (w + 1) + (":" if i in right else "-") for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def save_json(records: Sequence[Record], path: str | Path, config: dict[str, Any] | None = None) -> Path:
    """Write ``{"config": ..., "records": [...]}`` (per-trial errors included) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"config": config or {}, "records": [r.to_dict() for r in records]}
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path


_STYLE = {  # family -> (marker, colour)
    "low_rank": ("o", "tab:red"),
    "kronecker": ("s", "tab:purple"),
    "circulant": ("^", "tab:blue"),
    "skew_circulant": ("v", "tab:cyan"),
    "symmetric_toeplitz": ("D", "tab:olive"),
    "toeplitz": ("P", "tab:green"),
    "ldr": ("X", "tab:orange"),
}


def plot_records(records: Sequence[Record], path: str | Path, title: str = "") -> Path:
    """One panel per target: mean relative error (± std) against params (log x), one
    line or marker per family. Saved as PNG with the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = list(dict.fromkeys(r.target for r in records))
    families = list(dict.fromkeys(r.family for r in records))
    cols = min(len(targets), 2) or 1
    rows = math.ceil(len(targets) / cols) or 1
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False, sharex=True)
    for ax, target in zip(axes.flat, targets):
        for family in families:
            pts = sorted((r for r in records if r.target == target and r.family == family), key=lambda r: r.params)
            if not pts:
                continue
            marker, colour = _STYLE.get(family, ("o", None))
            ax.errorbar(
                [r.params for r in pts],
                [r.mean for r in pts],
                yerr=[r.std for r in pts],
                label=family,
                marker=marker,
                color=colour,
                capsize=3,
                linestyle="-" if len(pts) > 1 else "none",
                markersize=6,
            )
        ax.set_xscale("log")
        ticks = sorted({r.budget for r in records})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_title(target)
        ax.set_xlabel("parameters")
        ax.set_ylabel("relative Frobenius error")
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(targets) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 7), frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.07 if rows == 1 else 0.04, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
