"""How close are LoRA and SURM to full fine-tuning? Linear CKA and weight drift (Table 8 analog).

MiniLM is fine-tuned on Rotten Tomatoes with full fine-tuning (the reference), LoRA and
parallel SURM of each family, with the same data, order and seed. For the attention query
and value weights of every layer (``W = W0 + ΔW``, adapters merged):

* ``CKA(W_full, W_m)`` and ``CKA(ΔW_full, ΔW_m)``: linear CKA (Kornblith et al. 2019) with the
  rows of a weight matrix (output units) as samples:
  ``CKA(X, Y) = ||Ycᵀ Xc||²_F / (||Xcᵀ Xc||_F ||Ycᵀ Yc||_F)`` with column-centred ``Xc, Yc``.
  The ``W`` version is dominated by the shared ``W0``; the row "pretrained W0" shows the value
  that not moving at all gets. ``ΔW`` compares the updates themselves.
* weight drift ``1 − cos(W_m, W0)`` (the paper's reference code plots it) and ``||ΔW||_F``.

The runs are the ``nlp`` experiment's Rotten Tomatoes runs (same specs, shared store), so after
``nlp`` this costs only the runs it lacks. Writes ``cka.json``, ``cka.md``, ``cka.png``
(per-layer CKA of ΔW) and ``cka_drift.png`` (per-layer 1 − cos drift, log scale).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from surm.harness.methods import Method
from surm.harness.runs import Runner, RunRecord, RunSpec, delta_names, make_model
from surm.harness.threads import torch_threads

from . import nlp, plots, report
from .presets import Preset, setting

PARALLEL_FAMILIES = ("surm:circulant", "surm:skew_circulant", "surm:toeplitz", "surm:symmetric_toeplitz",
                     "surm:kronecker", "surm:ldr:rank=1")
BASELINE = "pretrained W0"  # the row of no update at all


@dataclass(frozen=True, kw_only=True)
class CkaPreset(Preset):
    """The CKA experiment's settings: which of the ``nlp`` runs it compares."""

    source: Literal["smoke", "quick", "every_family"] = setting(
        "quick", "the nlp preset whose runs (and threads) it uses (every_family: each method at its default rate)")
    dataset: str = setting("rotten_tomatoes", "a data set of the source preset")
    reference: Method = setting("full", "the method the others are compared with")
    methods: tuple[Method, ...] = setting(("lora:8", "surm:circulant", "surm:toeplitz"), "methods to compare")
    seeds: tuple[int, ...] = setting((0,), "seeds (each method against the reference run of the same seed)")
    threads: int | None = setting(None, "torch threads (None: the source preset's)")


PRESETS: dict[str, CkaPreset] = {
    "smoke": CkaPreset(name="smoke", source="smoke", methods=("lora:2", "surm:circulant", "surm:toeplitz")),
    "quick": CkaPreset(name="quick"),
    "full": CkaPreset(name="full", source="every_family", methods=("lora:1", "lora:8", *PARALLEL_FAMILIES),
                      seeds=(0, 1, 2)),
}


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two ``(n, p)`` / ``(n, q)`` matrices whose rows are paired samples.

    In [0, 1]; invariant to orthogonal transforms and isotropic scaling of either side's
    features. Computed in float64; 0 when either side is constant.
    """
    x = x.double() - x.double().mean(0, keepdim=True)
    y = y.double() - y.double().mean(0, keepdim=True)
    cross = torch.linalg.matrix_norm(y.T @ x) ** 2
    norm = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    return float(cross / norm) if norm > 0 else 0.0


def drift(w: torch.Tensor, w0: torch.Tensor) -> float:
    """``1 − cos(vec W, vec W0)``, in float64."""
    w, w0 = w.double().flatten(), w0.double().flatten()
    return max(0.0, float(1 - torch.dot(w, w0) / (w.norm() * w0.norm())))


def base_weights(spec: RunSpec) -> dict[str, torch.Tensor]:
    """The pretrained query/value weights ``W0`` of ``spec``'s model (before any training)."""
    model, _ = make_model(spec, num_labels=2)
    return {n: p.detach().clone() for n, p in model.named_parameters() if n in delta_names(model)}


def compare(deltas: dict[str, dict[int, dict[str, torch.Tensor]]], w0: dict[int, dict[str, torch.Tensor]],
            reference: str) -> dict[str, dict[str, np.ndarray]]:
    """Per method string: arrays ``(seeds, weights)`` of ``cka_w``, ``cka_dw``, ``drift``, ``dw_norm``.

    ``deltas[method][seed][name]`` is ΔW; ``w0[seed][name]`` the pretrained weight. The row
    :data:`BASELINE` holds CKA(W_full, W0) (and zero drift).
    """
    seeds = sorted(deltas[reference])
    names = list(w0[seeds[0]])
    out = {}
    for method in [reference, *[m for m in deltas if m != reference], BASELINE]:
        cka_w, cka_dw, drifts, norms = [], [], [], []
        for seed in seeds:
            ref = deltas[reference][seed]
            dm = deltas[method][seed] if method != BASELINE else {n: torch.zeros_like(w0[seed][n]) for n in names}
            cka_w.append([linear_cka(w0[seed][n] + ref[n], w0[seed][n] + dm[n]) for n in names])
            cka_dw.append([linear_cka(ref[n], dm[n]) for n in names])
            drifts.append([drift(w0[seed][n] + dm[n], w0[seed][n]) for n in names])
            norms.append([float(dm[n].norm()) for n in names])
        out[method] = {"cka_w": np.array(cka_w), "cka_dw": np.array(cka_dw), "drift": np.array(drifts),
                       "dw_norm": np.array(norms)}
    return out


def specs(config: CkaPreset) -> list[RunSpec]:
    """The reference's and each method's runs, as the source ``nlp`` preset makes them (with deltas)."""
    base = nlp.base_spec(nlp.PRESETS[config.source], config.dataset).replace(save_deltas=True)
    return [base.replace(method=m, seed=s) for m in (config.reference, *config.methods) for s in config.seeds]


def run(config: CkaPreset, out_dir: Path, runner: Runner) -> report.Outcome:
    """Run the CKA comparison into ``out_dir``."""
    n_threads = config.threads if config.threads is not None else nlp.PRESETS[config.source].threads
    runs = specs(config)
    records, wall = runner.run_all(runs, "cka", n_threads)
    with torch_threads(n_threads):
        deltas: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
        for spec in runs:
            deltas.setdefault(spec.method.name, {})[spec.seed] = runner.deltas(spec)
        w0 = {s: base_weights(runs[0].replace(seed=s)) for s in config.seeds}
    stats = compare(deltas, w0, config.reference.name)
    names = list(w0[config.seeds[0]])
    rows = []
    for method, s in stats.items():
        mine = [r for r in records if r.method.name == method]
        layer_means = {k: v.mean(1) for k, v in s.items()}  # mean over weights, per seed
        rows.append({
            "method": method,
            "label": mine[0].label + report.stored_mark(sum(r.from_store for r in mine), len(mine)) if mine
            else f"{BASELINE} (no update)",
            "adapter_params": mine[0].adapter_params if mine else None,
            "accuracy": report.mean_std(r.test["accuracy"] for r in mine) if mine else None,
            **{k: report.mean_std(v) for k, v in layer_means.items()},
            "per_weight": {k: v.mean(0).tolist() for k, v in s.items()},
        })
    markdown = tables(rows, names, config, wall, records)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = plot(rows, names, config, out_dir)
    payload = {"experiment": "cka", "preset": config.name, "config": config, "wall_seconds": wall, "weights": names,
               "rows": rows, "runs": records}
    return report.write(out_dir, "cka", payload, markdown, figures)


def _short_name(name: str) -> str:
    """``bert.encoder.layer.3.attention.self.query.weight`` -> ``L3 query``."""
    parts = name.split(".")
    layer = next((parts[i + 1] for i, p in enumerate(parts) if p == "layer"), "?")
    return f"L{layer} {parts[-2]}"


def tables(rows: list[dict], names: list[str], config: CkaPreset, wall: float, records: list[RunRecord]) -> str:
    """Markdown: the averages per method, then CKA(ΔW, ΔW_full) weight by weight."""
    header = ["method", "params (no head)", "test acc %", "CKA(W, W_full)", "CKA(ΔW, ΔW_full)",
              "drift 1 − cos(W, W0)", "‖ΔW‖_F"]
    table = []
    for r in rows:
        acc = report.fmt_pct(r["accuracy"]) if r["accuracy"] else "—"
        params = report.fmt_params(r["adapter_params"]) if r["adapter_params"] is not None else "—"
        table.append([r["label"], params, acc, _fmt(r["cka_w"], 4), _fmt(r["cka_dw"], 3), _fmt(r["drift"], "e"),
                      _fmt(r["dw_norm"], 3)])
    per_layer = [[_short_name(n)] + [f"{r['per_weight']['cka_dw'][i]:.3f}" for r in rows[1:-1]]
                 for i, n in enumerate(names)]
    sizes = records[0].sizes
    return (
        f"# CKA to full fine-tuning ({config.name} preset): {records[0].spec.model} on {config.dataset}\n\n"
        f"Query and value weights of every layer ({len(names)} matrices), averaged over them; mean ± std over "
        f"seeds {list(config.seeds)} (each method compared with the full fine-tuning run of the same seed). "
        f"{sizes['train']} training examples, test accuracy on {sizes['test']}.\n\n"
        + report.markdown_table(header, table)
        + "\n## CKA(ΔW, ΔW_full) per weight (mean over seeds)\n\n"
        + report.markdown_table(["weight", *[r["label"] for r in rows[1:-1]]], per_layer)
        + f"\nWall time {report.fmt_duration(wall)} ({len(records)} runs, most from the store when `nlp` ran first).\n"
        + report.stored_note(records)
    )


def _fmt(pair, digits) -> str:
    mean, sd = pair
    if digits == "e":
        return f"{mean:.2e} ± {sd:.1e}"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def plot(rows: list[dict], names: list[str], config: CkaPreset, out_dir: Path) -> list[Path]:
    """``cka.png`` (CKA of ΔW to full fine-tuning's, weight by weight) and ``cka_drift.png``."""
    from surm.harness.methods import parse

    plt = plots.pyplot()
    styles = plots.method_styles(parse(r["method"]) for r in rows[:-1])
    x = np.arange(len(names))
    paths = []
    for key, ylabel, title, fname, log, subset in [
        ("cka_dw", "linear CKA(ΔW, ΔW_full)",
         "How alike are the updates? CKA of each method's ΔW to full fine-tuning's", "cka.png", False, rows[1:-1]),
        ("drift", "1 − cos(W, W0) (log scale)",
         "How far do the weights move? Drift from the pretrained weights", "cka_drift.png", True, rows[:-1]),
    ]:
        fig, ax = plt.subplots(figsize=(8, 4.4))
        for r in subset:
            ax.plot(x, r["per_weight"][key], label=r["label"], mec="black", mew=0.5, **styles[parse(r["method"])])
        ax.set_xticks(x, [_short_name(n) for n in names], rotation=60, fontsize=7)
        ax.set_xlabel("attention weight (layer, query or value)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title} ({config.name} preset)", fontsize=10)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, title="method", loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
        fig.tight_layout()
        paths.append(plots.save(fig, out_dir / fname))
    return paths
