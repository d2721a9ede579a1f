"""The planner: which structure, with which knob, in which layer, for a parameter budget.

``surm.plan(model, batches, budget)`` returns a :class:`~surm.SurmConfig` that puts on each
target layer the structured update (or none) that buys the most first-order loss decrease for
the parameters, all layers together within ``budget``:

1. **Gradients.** ``G_l = dL/dW_l`` (``(out, in)``, ``nn.Linear`` orientation) for every target
   layer's frozen weight, averaged over a few batches: one forward and backward pass per batch,
   no optimizer step, the model left exactly as it was (:func:`gradients`).
2. **Captured energy.** A parallel adapter adds ``alpha S`` to ``W``; at ``S = 0`` the best
   first-order decrease of a step ``-eta D`` with ``D`` of family F and ``||D||_F = 1`` is
   ``eta * max <G, D> = eta * ||P_F(G)||_F``, where ``P_F(G)`` is the family's best Frobenius
   approximation of G (each family's ``project``). So every candidate (family x knob) of every
   layer is scored by ``||P_F(G)||_F^2`` (:func:`captured_energy`): an orthogonal projection for
   the linear families (circulant, skew-circulant, Toeplitz, symmetric Toeplitz); for the
   bilinear ones, which are cones and not subspaces, the best approximation A (truncated SVDs
   for low rank and Kronecker) has ``<G, A> = ||A||^2``, the same number.
3. **Knapsack.** One candidate (or none) per layer, maximising the summed energy with the
   summed parameter count at most the budget: a multiple-choice knapsack, solved exactly
   (:func:`knapsack`).

Candidates (:func:`candidates`), with parameter counts from ``structured.make(...,
device="meta").num_params``: circulant and skew-circulant with ``block_size=None`` and every
common divisor b of the layer's widths up to LoRA r=16's count (``m n / b <= 16 (m + n)``);
Toeplitz and symmetric Toeplitz; Kronecker with 1, 2 and 4 terms (the family's automatic
factors); low rank 1, 2, 4 and 8 (LoRA). LDR (ranks 1 and 2) only when named in
``structures``: it has no closed-form projection, its fit is an L-BFGS run (:data:`LDR_STEPS`
iterations) whose every step builds r dense ``N x N`` products (6-18 s per 1536 x 384 layer on
a 2-core CPU), and its score is then only a lower bound (``<G, A>^2 / ||A||^2`` for the fitted
A); its fit starts from, and so never loses to, the circulant of half its parameters.

The returned config targets exactly the chosen layers and names each by ``re.escape`` of its
full name in ``structure_pattern`` and ``knob_pattern``; placement is parallel. Add
``modules_to_save`` (a new classification head) before training, e.g. with
``dataclasses.replace``.
"""

from __future__ import annotations

import math
import numbers
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import numpy as np
import torch
from torch import nn

from surm import structured
from surm.harness.progress import bar
from surm.peft.config import SurmConfig
from surm.peft.layer import features, matrix_of
from surm.peft.model import matched_targets
from surm.peft.targets import default_targets, lora_default_targets

__all__ = [
    "DEFAULT_STRUCTURES",
    "LDR_STEPS",
    "Candidate",
    "LayerPlan",
    "Plan",
    "candidates",
    "captured_energy",
    "gradients",
    "knapsack",
    "lora_budget",
    "make_plan",
    "plan",
    "resolve_budget",
    "target_layers",
]

#: The families tried when ``structures`` is None: every family but LDR (see the module docstring).
DEFAULT_STRUCTURES = ("circulant", "skew_circulant", "toeplitz", "symmetric_toeplitz", "kronecker", "low_rank")
#: L-BFGS iterations of an LDR fit (only when LDR is asked for).
LDR_STEPS = 25
#: The largest candidate of the knob-ranged families costs about LoRA at this rank.
MAX_LORA_RANK = 16
_KRONECKER_TERMS = (1, 2, 4)
_LOW_RANKS = (1, 2, 4, 8)
_LDR_RANKS = (1, 2)


# ---------------------------------------------------------------------------------------
# targets and budgets
# ---------------------------------------------------------------------------------------


def target_layers(
    model: nn.Module, target_modules: Any = None, exclude_modules: Any = None
) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of the layers a SURM config with these targets adapts, in model order:
    names, a regex or ``"all-linear"`` as in :class:`SurmConfig`; None: the model type's
    default (parallel) targets."""
    if target_modules is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        target_modules = default_targets(model_type, "parallel")
        if target_modules is None:
            raise ValueError(
                f"surm.plan: no default target modules for model type {model_type!r}; pass target_modules=[...] "
                f"(module names, a regex or 'all-linear')"
            )
    probe = SurmConfig(target_modules=target_modules, exclude_modules=exclude_modules)
    return matched_targets(probe, model)


def lora_budget(model: nn.Module, rank: int, target_modules: Any = None) -> int:
    """The parameters of LoRA rank ``rank`` on ``target_modules`` (None: the model type's default
    LoRA targets, attention query and value for BERT): ``rank * (out + in)`` summed over them."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"surm.plan: a LoRA rank must be a positive integer, got {rank!r}")
    if target_modules is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        target_modules = lora_default_targets(model_type)
        if target_modules is None:
            raise ValueError(f"surm.plan: no default target modules for model type {model_type!r} (PEFT names no LoRA "
                             f"targets for it); give the budget as a parameter count")
    return sum(rank * sum(features(layer)) for _, layer in target_layers(model, target_modules))


def resolve_budget(budget: int | str, model: nn.Module) -> int:
    """A budget as a parameter count: an int as it is; ``"lora:R"``: :func:`lora_budget` at rank
    R on the model's default LoRA targets; a string of digits as that int."""
    if isinstance(budget, str):
        text = budget.strip()
        if text.isdigit():
            return int(text)
        kind, _, rank = text.partition(":")
        if kind.lower() == "lora" and rank.isdigit() and int(rank) >= 1:
            return lora_budget(model, int(rank))
    elif isinstance(budget, numbers.Integral) and not isinstance(budget, bool) and budget >= 0:
        return int(budget)
    raise ValueError(
        f"surm.plan: budget must be a parameter count (an int >= 0, e.g. 9216) or 'lora:R' (the parameters of "
        f"LoRA rank R on the model's default LoRA targets, e.g. 'lora:8'); got {budget!r}"
    )


# ---------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------


def _default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    if not isinstance(batch, dict):
        raise TypeError(
            f"surm.plan: the default loss calls model(**batch).loss, so a batch must be a dict (of input_ids, "
            f"attention_mask, labels, ...); got a {type(batch).__name__}. Pass loss_fn=lambda model, batch: ..."
        )
    loss = model(**batch).loss
    if loss is None:
        raise ValueError(
            "surm.plan: model(**batch).loss is None: the batches hold no labels. Add 'labels' to each batch or "
            "pass loss_fn=lambda model, batch: ..."
        )
    return loss


def gradients(
    model: nn.Module,
    batches: Iterable[Any],
    layers: Sequence[tuple[str, nn.Module]],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    max_batches: int | None = None,
    progress: bool = False,
) -> tuple[dict[str, torch.Tensor], int]:
    """``({name: G}, batches used)``: the mean over the batches of the loss gradient with
    respect to each layer's weight, as a float64 ``(out, in)`` matrix.

    The model runs in eval mode (no dropout: the gradient at the pretrained weights, not a noisy
    one) and is left exactly as it was: parameters, ``requires_grad`` flags, ``.grad`` tensors
    and every module's train/eval mode. Gradients come from ``torch.autograd.grad`` with the
    weights' ``requires_grad`` switched on for the pass, so nothing accumulates in ``.grad``.
    ``loss_fn(model, batch)`` returns a scalar loss (default ``model(**batch).loss``).
    """
    loss_fn = loss_fn or _default_loss
    weights = list({id(layer.weight): layer.weight for _, layer in layers}.values())
    modes = {module: module.training for module in model.modules()}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    grads = [(p, p.grad) for p in model.parameters()]
    sums = [torch.zeros(w.shape, dtype=torch.float64, device=w.device) for w in weights]
    used = 0
    total = max_batches if max_batches is not None else (len(batches) if hasattr(batches, "__len__") else None)
    shown = bar(total, "gradients", progress, inner=True)
    try:
        model.eval()
        for w in weights:
            w.requires_grad_(True)
        for batch in islice(batches, max_batches):
            with torch.enable_grad():
                loss = loss_fn(model, batch)
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    raise ValueError(f"surm.plan: the loss must be a scalar tensor; got {_describe(loss)}")
                if not loss.requires_grad:
                    raise ValueError("surm.plan: the loss does not depend on the weight of any target layer; "
                                     "check target_modules and that loss_fn runs the model")
                parts = torch.autograd.grad(loss.reshape(()), weights, allow_unused=True)
            for acc, part in zip(sums, parts):
                if part is not None:
                    acc += part.detach().to(torch.float64)
            used += 1
            if shown is not None:
                shown.update()
    finally:
        if shown is not None:
            shown.close()
        for module, training in modes.items():
            module.train(training)
        for p, flag in flags:
            p.requires_grad_(flag)
        for p, grad in grads:
            p.grad = grad
    if used == 0:
        raise ValueError("surm.plan: no batches: pass at least one batch (max_batches >= 1)")
    mean = {id(w): acc / used for w, acc in zip(weights, sums)}
    return {name: matrix_of(layer, mean[id(layer.weight)]) for name, layer in layers}, used


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


# ---------------------------------------------------------------------------------------
# candidates and their energies
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """One family at one knob setting for one layer: its parameters and captured energy."""

    structure: str
    knobs: dict[str, Any]
    params: int
    energy: float = 0.0

    @property
    def label(self) -> str:
        """``circulant block_size=64``, ``toeplitz``, ``kronecker terms=2``."""
        shown = {k: v for k, v in self.knobs.items() if k != "factors"}
        return " ".join([self.structure, *(f"{k}={v}" for k, v in shown.items())])

    def to_json(self) -> dict[str, Any]:
        knobs = {k: [list(f) for f in v] if k == "factors" else v for k, v in self.knobs.items()}
        return {"structure": self.structure, "knobs": knobs, "params": self.params, "energy": self.energy}


def candidates(m: int, n: int, structures: Sequence[str] | None = None) -> list[Candidate]:
    """The candidates for an ``m x n`` update, energy 0 (see the module docstring for the grid).

    Knobs are explicit (kronecker's ``factors`` included) so that a plan never depends on a
    default; circulant's ``block_size=None`` is the empty knob set.
    """
    names = _check_structures(structures)
    limit = MAX_LORA_RANK * (m + n)
    out = []
    for name in names:
        for knobs in _knob_grid(name, m, n, limit):
            params = structured.make(name, m, n, device="meta", **knobs).num_params
            out.append(Candidate(name, knobs, params))
    return out


def _check_structures(structures: Sequence[str] | None) -> list[str]:
    if structures is None:
        return list(DEFAULT_STRUCTURES)
    if isinstance(structures, str) or not structures:
        raise ValueError(f"surm.plan: structures must be a non-empty list of names, got {structures!r}; "
                         f"known: {', '.join(structured.names())}")
    for name in structures:
        structured.get(name)  # ValueError listing the known names
    return list(dict.fromkeys(structures))


def _knob_grid(name: str, m: int, n: int, limit: int) -> list[dict[str, Any]]:
    if name in ("circulant", "skew_circulant"):
        g = math.gcd(m, n)
        blocks = [b for b in range(1, g + 1) if g % b == 0 and m * n // b <= limit and not m == n == b]
        return [{}] + [{"block_size": b} for b in sorted(blocks, reverse=True)]
    if name == "kronecker":
        factors = structured.auto_factors(m, n)
        return [{"factors": factors, "terms": k} for k in _KRONECKER_TERMS]
    if name == "low_rank":
        return [{"rank": r} for r in _LOW_RANKS if r == 1 or r <= min(m, n)]
    if name == "ldr":
        return [{"rank": r} for r in _LDR_RANKS]
    return [{}]  # toeplitz, symmetric_toeplitz: no knobs


def captured_energy(G: torch.Tensor, structure: str, knobs: dict[str, Any]) -> float:
    """``||P(G)||_F^2`` for the family's approximation ``A = P(G)`` (``project``), computed as
    ``<G, A>^2 / ||A||^2``: the same number for a best approximation (a projection, or the
    truncated SVD of the bilinear families), and for any other fit (LDR) the energy of the best
    multiple of A, a lower bound."""
    if not torch.any(G):
        return 0.0
    extra = {"steps": LDR_STEPS} if structure == "ldr" else {}
    A = structured.get(structure).project(G, **knobs, **extra).dense().detach().to(G.dtype)
    norm2 = float((A * A).sum())
    return float((G * A).sum()) ** 2 / norm2 if norm2 > 0 else 0.0


# ---------------------------------------------------------------------------------------
# the knapsack
# ---------------------------------------------------------------------------------------


def knapsack(groups: Sequence[Sequence[tuple[int, float]]], budget: int) -> tuple[list[int | None], float]:
    """Pick at most one item ``(cost, value)`` of each group, maximising the summed value with
    the summed cost at most ``budget``: ``(choice per group, an item index or None; value)``.

    Exact (multiple-choice knapsack, integer costs): a dynamic programme over the Pareto
    frontier of reachable ``(cost, value)`` sums. After each group only the sums that no other
    sum beats (at most the cost and at least the value) are kept; a discarded partial sum is
    beaten by a kept one, and so is every completion of it, so an optimum survives. Costs are
    exact integers and nothing is bucketed: the result is the optimum (up to the rounding of
    float sums of the values), never over budget; among equal values the cheaper sum is kept.
    The frontier holds at most ``budget + 1`` sums, so the work is at most ``(budget + 1)`` times
    the number of items, and far less in practice (a few thousand sums for MiniLM at LoRA r=8).
    """
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 0:
        raise ValueError(f"knapsack: budget must be an integer >= 0, got {budget!r}")
    cost = np.zeros(1, dtype=np.int64)
    value = np.zeros(1, dtype=np.float64)
    steps = []
    for items in groups:
        item_cost = np.array([0] + [int(c) for c, _ in items], dtype=np.int64)
        item_value = np.array([0.0] + [float(v) for _, v in items], dtype=np.float64)
        if (item_cost < 0).any():
            raise ValueError("knapsack: costs must be >= 0")
        C = (cost[:, None] + item_cost[None, :]).ravel()
        V = (value[:, None] + item_value[None, :]).ravel()
        parent = np.repeat(np.arange(len(cost)), len(item_cost))
        item = np.tile(np.arange(len(item_cost)), len(cost))
        fits = C <= budget
        C, V, parent, item = C[fits], V[fits], parent[fits], item[fits]
        order = np.lexsort((-V, C))  # by cost, the highest value first among equal costs
        C, V, parent, item = C[order], V[order], parent[order], item[order]
        best_before = np.concatenate([[-np.inf], np.maximum.accumulate(V)[:-1]])
        keep = V > best_before  # strictly better than every cheaper (or equal-cost, listed earlier) sum
        cost, value = C[keep], V[keep]
        steps.append((parent[keep], item[keep]))
    k = len(cost) - 1  # values rise with cost along the frontier: the last is the best
    total = float(value[k])
    choices: list[int | None] = []
    for parent, item in reversed(steps):
        choices.append(int(item[k]) - 1 if item[k] > 0 else None)
        k = parent[k]
    return choices[::-1], total


# ---------------------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerPlan:
    """One target layer: its gradient's energy ``||G||_F^2``, every candidate, the choice."""

    name: str
    shape: tuple[int, int]
    grad_energy: float
    candidates: tuple[Candidate, ...]
    choice: Candidate | None

    @property
    def alternative(self) -> Candidate | None:
        """The best candidate of another family at no more parameters than the choice."""
        if self.choice is None:
            return None
        others = [c for c in self.candidates if c.structure != self.choice.structure and c.params <= self.choice.params]
        return max(others, key=lambda c: (c.energy, -c.params), default=None)

    def fraction(self, candidate: Candidate | None) -> float:
        """A candidate's share of ``||G||_F^2``."""
        if candidate is None or self.grad_energy == 0:
            return 0.0
        return candidate.energy / self.grad_energy


@dataclass(frozen=True)
class Plan:
    """The planner's result: per-layer choices, their totals and the config that builds them."""

    layers: tuple[LayerPlan, ...]
    budget: int
    config: SurmConfig
    batches: int
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def params(self) -> int:
        return sum(layer.choice.params for layer in self.layers if layer.choice is not None)

    @property
    def energy(self) -> float:
        return sum(layer.choice.energy for layer in self.layers if layer.choice is not None)

    @property
    def grad_energy(self) -> float:
        return sum(layer.grad_energy for layer in self.layers)

    def table(self) -> str:
        """The per-layer table: layer, shape, choice, parameters, captured energy (and share of
        ``||G||^2``), the best alternative of another family at no more parameters."""
        rows = [("layer", "shape", "choice", "params", "captured (of ||G||^2)", "best other family, <= params")]
        for layer in self.layers:
            choice, alt = layer.choice, layer.alternative
            rows.append((
                layer.name,
                f"{layer.shape[0]}x{layer.shape[1]}",
                choice.label if choice else "-",
                f"{choice.params:,}" if choice else "0",
                f"{choice.energy:.3e} ({100 * layer.fraction(choice):.1f} %)" if choice else "-",
                f"{alt.label} ({alt.params:,}): {alt.energy:.3e} ({100 * layer.fraction(alt):.1f} %)" if alt else "-",
            ))
        share = 100 * self.energy / self.grad_energy if self.grad_energy else 0.0
        rows.append(("total", "", "", f"{self.params:,}", f"{self.energy:.3e} ({share:.1f} %)",
                     f"budget {self.budget:,}"))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.insert(-1, lines[1])
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "budget": self.budget,
            "params": self.params,
            "energy": self.energy,
            "grad_energy": self.grad_energy,
            "batches": self.batches,
            "seconds": self.seconds,
            "layers": [
                {
                    "name": layer.name,
                    "shape": list(layer.shape),
                    "grad_energy": layer.grad_energy,
                    "choice": layer.choice.to_json() if layer.choice else None,
                    "alternative": layer.alternative.to_json() if layer.alternative else None,
                    "candidates": [c.to_json() for c in layer.candidates],
                }
                for layer in self.layers
            ],
        }


def make_plan(
    model: nn.Module,
    batches: Iterable[Any],
    budget: int | str,
    *,
    target_modules: Any = None,
    exclude_modules: Any = None,
    structures: Sequence[str] | None = None,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    max_batches: int | None = None,
    progress: bool = False,
) -> Plan:
    """:func:`plan` with everything it found: a :class:`Plan` (per-layer candidates and
    energies, the choice, the totals, the time taken, and ``.config``); ``progress``: bars on
    stderr for the batches and the layers scored."""
    start = time.perf_counter()
    names = _check_structures(structures)
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                    or max_batches < 1):
        raise ValueError(f"surm.plan: max_batches must be a positive integer or None, got {max_batches!r}")
    budget = resolve_budget(budget, model)
    layers = target_layers(model, target_modules, exclude_modules)
    grads, used = gradients(model, batches, layers, loss_fn, max_batches, progress)
    after_grads = time.perf_counter()

    planned = []
    cuda = sorted({G.device.index or 0 for G in grads.values() if G.device.type == "cuda"})
    shown = bar(len(grads), "scoring layers", progress, inner=True)
    with torch.random.fork_rng(devices=cuda):  # the projections draw (unused) factors: keep the caller's RNG
        for name, G in grads.items():
            m, n = G.shape
            scored = tuple(
                Candidate(c.structure, c.knobs, c.params, captured_energy(G, c.structure, c.knobs))
                for c in candidates(m, n, names)
            )
            planned.append((name, (m, n), float((G * G).sum()), scored))
            if shown is not None:
                shown.update()
    if shown is not None:
        shown.close()
    after_scores = time.perf_counter()
    choices, _ = knapsack([[(c.params, c.energy) for c in scored] for *_, scored in planned], budget)
    layer_plans = tuple(
        LayerPlan(name, shape, grad_energy, scored, None if k is None else scored[k])
        for (name, shape, grad_energy, scored), k in zip(planned, choices)
    )
    config = _config(layer_plans, budget)
    _check_builds(config, model, layer_plans)
    end = time.perf_counter()
    seconds = {"gradients": after_grads - start, "scores": after_scores - after_grads,
               "knapsack": end - after_scores, "total": end - start}
    return Plan(layer_plans, budget, config, used, seconds)


def plan(
    model: nn.Module,
    batches: Iterable[Any],
    budget: int | str,
    *,
    target_modules: Any = None,
    structures: Sequence[str] | None = None,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    max_batches: int | None = None,
    exclude_modules: Any = None,
) -> SurmConfig:
    """A :class:`SurmConfig` that gives each target layer the structured update (or none) that
    captures the most loss-gradient energy, all layers together within ``budget`` parameters.

    Args:
        model: the model to fine-tune (left unchanged: parameters, ``requires_grad``, ``.grad``,
            train/eval mode; the global RNG too).
        batches: an iterable of batches; each is passed to ``loss_fn``. For a transformers model,
            dicts such as ``{"input_ids": ..., "attention_mask": ..., "labels": ...}``.
        budget: the most parameters all structured matrices together may have: an int, or
            ``"lora:R"`` for the parameters of LoRA rank R on the model type's default LoRA
            targets (``R * (out + in)`` summed over them; query and value for BERT).
        target_modules: the layers to plan for, as ``SurmConfig.target_modules`` (names, a regex
            or ``"all-linear"``); None: the model type's default (parallel) targets.
        structures: the families to choose from (default :data:`DEFAULT_STRUCTURES`, every
            family but LDR, which is slow to fit; name ``"ldr"`` to include it).
        loss_fn: ``loss_fn(model, batch)`` returns the scalar loss; default ``model(**batch).loss``.
        max_batches: use at most this many batches (default: all of ``batches``).
        exclude_modules: names or a regex to leave out, as ``SurmConfig.exclude_modules`` (e.g.
            the classification head with ``"all-linear"``).

    Returns:
        A parallel :class:`SurmConfig` whose ``target_modules`` are the chosen layers and whose
        ``structure_pattern`` / ``knob_pattern`` give each its family and knobs (keys:
        ``re.escape`` of the full module names); its adapters hold exactly the planned number
        of parameters. ``structure`` is the most common chosen family.

    The choice is the exact optimum of the multiple-choice knapsack over the candidates'
    captured energies (:func:`knapsack`); it costs one forward and backward pass per batch
    plus one projection per candidate and layer. Raises ValueError when the budget is too small
    for any candidate or every gradient is zero.
    """
    return make_plan(
        model, batches, budget, target_modules=target_modules, exclude_modules=exclude_modules,
        structures=structures, loss_fn=loss_fn, max_batches=max_batches,
    ).config


def _config(layers: Sequence[LayerPlan], budget: int) -> SurmConfig:
    chosen = [(layer.name, layer.choice) for layer in layers if layer.choice is not None]
    if not chosen:
        cheapest = min((c.params for layer in layers for c in layer.candidates), default=0)
        if all(layer.grad_energy == 0 for layer in layers):
            reason = "the loss gradient is zero at every target layer"
        else:
            reason = f"the budget of {budget:,} parameters is below the cheapest candidate ({cheapest:,})"
        raise ValueError(f"surm.plan: nothing to adapt: {reason}")
    structure = Counter(choice.structure for _, choice in chosen).most_common(1)[0][0]  # ties: first seen
    return SurmConfig(
        structure=structure,
        target_modules=[name for name, _ in chosen],
        structure_pattern={re.escape(name): choice.structure for name, choice in chosen},
        knob_pattern={re.escape(name): dict(choice.knobs) for name, choice in chosen},
    )


def _check_builds(config: SurmConfig, model: nn.Module, layers: Sequence[LayerPlan]) -> None:
    """The config targets exactly the chosen layers, each with its family, knobs and size."""
    import copy

    planned = {layer.name: layer.choice for layer in layers if layer.choice is not None}
    targets = matched_targets(copy.deepcopy(config), model)
    built = {}
    for name, layer in targets:
        n_in, n_out = features(layer)
        S = structured.make(config.structure_for(name), n_out, n_in, device="meta", **config.knobs_for(name))
        built[name] = (S.name, S.num_params)
    expected = {name: (c.structure, c.params) for name, c in planned.items()}
    if built != expected:  # pragma: no cover - the config is written to give exactly this
        raise RuntimeError(f"surm.plan: the config builds {built}, but the plan is {expected}")
