"""How close are LoRA and SURM to full fine-tuning? Linear CKA and weight drift (Table 8 analog).

MiniLM is fine-tuned on Rotten Tomatoes with full fine-tuning (the reference), LoRA and
parallel SURM of each family, with the same data, order and seed. For the attention query
and value weights of every layer (``W = W0 + ΔW``, adapters merged):

* ``CKA(W_full, W_m)`` and ``CKA(ΔW_full, ΔW_m)``: linear CKA (Kornblith et al. 2019) with the
  rows of a weight matrix (output units) as samples:
  ``CKA(X, Y) = ||Ycᵀ Xc||²_F / (||Xcᵀ Xc||_F ||Ycᵀ Yc||_F)`` with column-centred ``Xc, Yc``.
  The ``W`` version is dominated by the shared ``W0``; the row "pretrained W0" shows the value
  that not moving at all gets. ``ΔW`` compares the updates themselves.
* weight drift ``1 − cos(W_m, W0)`` (the reference code's plot, SPEC §5.6) and ``||ΔW||_F``.

The runs are the ``nlp`` experiment's Rotten Tomatoes runs (same specs, shared store), so after
``nlp`` this costs only the runs it lacks. Writes ``cka.json``, ``cka.md``, ``cka.png``
(per-layer CKA of ΔW) and ``cka_drift.png`` (per-layer 1 − cos drift, log scale).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import common, nlp

PARALLEL_FAMILIES = ["surm:circulant", "surm:skew_circulant", "surm:toeplitz", "surm:symmetric_toeplitz",
                     "surm:kronecker", "surm:ldr:rank=1"]

PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(source="smoke", methods=["lora:2", "surm:circulant", "surm:toeplitz"], seeds=[0]),
    "quick": dict(source="quick", methods=["lora:8", "surm:circulant", "surm:toeplitz"], seeds=[0]),
    "full": dict(source="full", methods=["lora:1", "lora:8", *PARALLEL_FAMILIES], seeds=[0, 1, 2]),
}
for _config in PRESETS.values():
    # threads=None: the source nlp preset's setting
    _config.update(dataset="rotten_tomatoes", reference="full", threads=None, store=None, fresh=False, progress=True)


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


def base_weights(spec: common.RunSpec) -> dict[str, torch.Tensor]:
    """The pretrained query/value weights ``W0`` of ``spec``'s model (before any training)."""
    model, _, _ = common.make_model(spec, num_labels=2)
    return {n: p.detach().clone() for n, p in model.named_parameters() if n in common.delta_names(model)}


def compare(deltas: dict[str, dict[int, dict[str, torch.Tensor]]], w0: dict[int, dict[str, torch.Tensor]],
            reference: str) -> dict[str, dict[str, np.ndarray]]:
    """Per method: arrays ``(seeds, weights)`` of ``cka_w``, ``cka_dw``, ``drift``, ``dw_norm``.

    ``deltas[method][seed][name]`` is ΔW; ``w0[seed][name]`` the pretrained weight. The row
    ``"pretrained W0"`` holds CKA(W_full, W0) (and zero drift).
    """
    seeds = sorted(deltas[reference])
    names = list(w0[seeds[0]])
    out = {}
    for method in [reference, *[m for m in deltas if m != reference], "pretrained W0"]:
        cka_w, cka_dw, drifts, norms = [], [], [], []
        for seed in seeds:
            ref = deltas[reference][seed]
            dm = deltas[method][seed] if method != "pretrained W0" else {n: torch.zeros_like(w0[seed][n]) for n in names}
            cka_w.append([linear_cka(w0[seed][n] + ref[n], w0[seed][n] + dm[n]) for n in names])
            cka_dw.append([linear_cka(ref[n], dm[n]) for n in names])
            drifts.append([drift(w0[seed][n] + dm[n], w0[seed][n]) for n in names])
            norms.append([float(dm[n].norm()) for n in names])
        out[method] = {"cka_w": np.array(cka_w), "cka_dw": np.array(cka_dw), "drift": np.array(drifts),
                       "dw_norm": np.array(norms)}
    return out


def run(out_dir: Path | str, preset: str = "full", **overrides: Any) -> dict[str, Any]:
    """Run the CKA comparison into ``out_dir``; returns ``{"rows", "markdown", "files", ...}``."""
    config = common.resolve_preset("cka", PRESETS, preset, overrides)
    out_dir = Path(out_dir)
    store = common.store_dir(out_dir, config["store"])
    nlp_config = nlp.PRESETS[config["source"]]
    base = nlp.base_spec(nlp_config, config["dataset"]).replace(save_deltas=True)
    methods = [config["reference"], *config["methods"]]
    specs = [base.replace(method=m, seed=s) for m in methods for s in config["seeds"]]
    start = time.perf_counter()
    threads = config["threads"] if config["threads"] is not None else nlp_config["threads"]
    with common.threads(threads):
        records = common.run_many(specs, store, "cka", config["progress"], config["fresh"])
        deltas: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
        for spec, record in zip(specs, records):
            deltas.setdefault(record["method"], {})[spec.seed] = common.load_deltas(spec, store)
        w0 = {s: base_weights(base.replace(seed=s)) for s in config["seeds"]}
    wall = time.perf_counter() - start
    stats = compare(deltas, w0, config["reference"])
    names = list(w0[config["seeds"][0]])
    labels = {r["method"]: r["label"] for r in records}
    labels["pretrained W0"] = "pretrained W0 (no update)"
    accuracy = {m: common.mean_std(r["test"]["accuracy"] for r in records if r["method"] == m) for m in methods}
    params = {r["method"]: r["adapter_params"] for r in records}
    rows = []
    for method, s in stats.items():
        layer_means = {k: v.mean(1) for k, v in s.items()}  # mean over weights, per seed
        rows.append({
            "method": method, "label": labels[method], "adapter_params": params.get(method),
            "accuracy": accuracy.get(method),
            **{k: common.mean_std(v) for k, v in layer_means.items()},
            "per_weight": {k: v.mean(0).tolist() for k, v in s.items()},
        })
    markdown = report(rows, names, config, preset, wall, records)
    out_dir.mkdir(parents=True, exist_ok=True)
    pngs = plot(rows, names, out_dir)
    payload = {"experiment": "cka", "preset": preset, "config": config, "wall_seconds": wall, "weights": names,
               "rows": rows, "runs": records}
    files = common.write_outputs(out_dir, "cka", payload, markdown)
    return {"experiment": "cka", "rows": rows, "markdown": markdown, "wall_seconds": wall,
            "files": [*files.values(), *pngs]}


def _short_name(name: str) -> str:
    """``bert.encoder.layer.3.attention.self.query.weight`` -> ``L3 query``."""
    parts = name.split(".")
    layer = next((parts[i + 1] for i, p in enumerate(parts) if p == "layer"), "?")
    return f"L{layer} {parts[-2]}"


def report(rows, names, config, preset, wall, records) -> str:
    header = ["method", "params (no head)", "test acc %", "CKA(W, W_full)", "CKA(ΔW, ΔW_full)",
              "drift 1 − cos(W, W0)", "‖ΔW‖_F"]
    table = []
    for r in rows:
        acc = common.fmt_pct(r["accuracy"]) if r["accuracy"] else "—"
        params = common.fmt_params(r["adapter_params"]) if r["adapter_params"] is not None else "—"
        table.append([r["label"], params, acc, _fmt(r["cka_w"], 4), _fmt(r["cka_dw"], 3), _fmt(r["drift"], "e"),
                      _fmt(r["dw_norm"], 3)])
    per_layer = [[_short_name(n)] + [f"{r['per_weight']['cka_dw'][i]:.3f}" for r in rows[1:-1]] for i, n in enumerate(names)]
    sizes = records[0]["sizes"]
    return (
        f"# CKA to full fine-tuning ({preset} preset): {records[0]['spec']['model']} on {config['dataset']}\n\n"
        f"Query and value weights of every layer ({len(names)} matrices), averaged over them; mean ± std over "
        f"seeds {config['seeds']} (each method compared with the full fine-tuning run of the same seed). "
        f"{sizes['train']} training examples, test accuracy on {sizes['test']}.\n\n"
        + common.markdown_table(header, table)
        + "\n## CKA(ΔW, ΔW_full) per weight (mean over seeds)\n\n"
        + common.markdown_table(["weight", *[r["label"] for r in rows[1:-1]]], per_layer)
        + f"\nWall time {common.fmt_duration(wall)} ({len(records)} runs, most from the store when `nlp` ran first).\n"
    )


def _fmt(pair, digits) -> str:
    mean, sd = pair
    if digits == "e":
        return f"{mean:.2e} ± {sd:.1e}"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def plot(rows, names, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(len(names))
    paths = []
    for key, ylabel, fname, log, subset in [
        ("cka_dw", "linear CKA(ΔW, ΔW_full)", "cka.png", False, rows[1:-1]),
        ("drift", "1 − cos(W, W0)", "cka_drift.png", True, rows[:-1]),
    ]:
        fig, ax = plt.subplots(figsize=(8, 4.4))
        for r in subset:
            style = common.method_style(r["method"])
            ax.plot(x, r["per_weight"][key], marker=style["marker"], label=r["label"],
                    color="black" if r["method"] == "full" else None)
        ax.set_xticks(x, [_short_name(n) for n in names], rotation=60, fontsize=7)
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=110)
        plt.close(fig)
        paths.append(out_dir / fname)
    return paths
