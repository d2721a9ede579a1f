"""The synthetic pinwheel experiment (the paper's section 5.2): LoRA against SURM at equal parameters.

A small MLP ``2 -> d -> d -> 5`` on the 5-class 2-D pinwheel data set. The hidden ``d x d``
layer ("hidden") is frozen at its base value W0 and only an update on it is trained:

    h2 = act((W0 + dW) h1 + b0),   dW = LoRA B A, or alpha * S with S structured (SURM).

Everything else is frozen too (``regime="random"``, the default), so the only thing that can
lower the loss is dW: the experiment measures what an update of a given family and parameter
budget can do to one layer. At d = 64 the budgets line up as

    circulant 64 = symmetric Toeplitz 64  <  Toeplitz 127 ~ LoRA r=1 128 = LDR r=1 128,

against 4096 for training the layer fully (the reference). Training is full-batch Adam on the
cross-entropy with a learning rate per method (``LEARNING_RATES``); every method sees the same
data, base networks, steps and seeds. ``act`` is tanh by default (``activation="relu"`` and
``"gelu"`` are variants): a ReLU network whose layers are all frozen can lose every hidden
unit to one large step and then never move again, which is a failure of the activation, not
of the update family (docs/pinwheel.md).

Regimes (what the frozen base network is):

- ``"random"``: the MLP at its (seeded) random initialisation; phase 1 is "take a random
  init", phase 2 trains dW only. The cleanest test of the update's expressiveness.
- ``"pretrained"``: phase 1 trains the whole MLP on the pinwheel, then the hidden layer is
  redrawn at random and frozen; phase 2 trains dW only, with the pretrained input and output
  layers frozen around it (the update must "repair" one layer of a pretrained model).
- ``"others_trainable"``: random init, hidden layer frozen plus dW, but the input and output
  layers are trained as well. Shows that with trainable neighbours the adapted layer's
  capacity hardly matters on this task.

Methods are strings of :func:`surm.harness.methods.parse` applied to the one layer: ``head`` (no
update: in this MLP nothing trains, or in regime ``others_trainable`` only the neighbours),
``full`` (the layer's weight trains), ``lora:R:alpha=A`` (PEFT's LoRA) and
``surm:STRUCTURE[:knobs]`` (parallel SURM, alpha 1).

``run(config, out_dir, runner)`` writes ``pinwheel.json`` (settings, summary, loss curves),
``pinwheel.md`` (the table) and ``pinwheel.png`` (data, loss curves, decision regions).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from surm.harness import methods as surm_methods
from surm.harness import progress
from surm.harness.methods import Method, parse
from surm.harness.models.profiles import Profile
from surm.harness.runs import Runner
from surm.harness.threads import torch_threads

from . import plots, report
from .presets import Preset, setting

CLASSES = 5
LAYER = "hidden"  # the adapted layer's module name in PinwheelMLP
REGIMES = ("random", "pretrained", "others_trainable")
#: Where LoRA and SURM go: the hidden layer; the MLP has no head that every method trains.
PROFILE = Profile(head=None, parallel=[LAYER], lora=[LAYER])
KINDS = ("head", "full", "lora", "surm")

#: the methods, in table order; LoRA's alpha equals its rank (scale 1), SURM's alpha is 1
METHODS = ("head", "full", "lora:1:alpha=1", "lora:4:alpha=4", "surm:circulant", "surm:symmetric_toeplitz",
           "surm:toeplitz", "surm:ldr:rank=1")

#: Adam learning rates per method: the best final training loss of a sweep over {3e-3, 1e-2,
#: 3e-2, 1e-1, 3e-1} (full preset, tanh, regime "random") on seeds 100 and 101, disjoint from
#: the reported seeds 0-4; docs/pinwheel.md has the sweep. Unlisted methods take ``lr_default``.
LEARNING_RATES: dict[str, float] = {
    "full": 1e-1,
    "lora:1:alpha=1": 3e-2,
    "lora:4:alpha=4": 1e-1,
    "surm:circulant": 3e-2,
    "surm:symmetric_toeplitz": 3e-1,
    "surm:toeplitz": 3e-1,
    "surm:ldr:rank=1": 3e-2,
}


@dataclass(frozen=True, kw_only=True)
class PinwheelPreset(Preset):
    """The pinwheel experiment's settings."""

    width: int = setting(64, "hidden width d of the MLP 2 -> d -> d -> 5")
    n_per_class: int = setting(200, "training points per class (the test set is a second draw)")
    steps: int = setting(300, "full-batch Adam steps on the update")
    seeds: tuple[int, ...] = setting((0, 1), "seeds: base network, adapter initialisation")
    log_every: int = setting(5, "record the training loss every this many steps")
    pretrain_steps: int = setting(500, "steps of phase 1 in regime pretrained")
    grid: int = setting(120, "decision-region grid points per side")
    regime: Literal["random", "pretrained", "others_trainable"] = setting(
        "random", "the frozen base network: random, pretrained or others_trainable (module docstring)")
    activation: Literal["tanh", "relu", "gelu"] = setting("tanh", "the MLP's activation")
    methods: tuple[Method, ...] = setting(METHODS, "method strings: head, full, lora:R[:alpha=A], surm:STRUCTURE")
    lr: float | dict[Method, float] = setting(LEARNING_RATES, "Adam rate: one for every method, or {method: lr}")
    lr_default: float = setting(3e-2, "the rate of a method that lr (a dict) does not list")
    radial_std: float = setting(0.3, "pinwheel: radial noise of the arms")
    tangential_std: float = setting(0.05, "pinwheel: tangential noise of the arms")
    rate: float = setting(0.25, "pinwheel: how fast the arms turn with the radius")
    data_seed: int = setting(0, "seed of the training points (data_seed + 1: the test points)")
    pretrain_lr: float = setting(1e-2, "Adam rate of phase 1 in regime pretrained")
    regions: tuple[Method, ...] = setting(
        ("full", "lora:1:alpha=1", "surm:circulant", "surm:toeplitz"), "methods whose decision regions are drawn")
    threads: int | None = setting(1, "torch threads (small matrices: 1 is fastest)")
    plot: bool = setting(True, "draw pinwheel.png")

    def __post_init__(self) -> None:
        super().__post_init__()
        for method in self.methods:
            if method.kind not in KINDS or method.placement != "parallel":
                raise ValueError(f"methods: the pinwheel applies {', '.join(KINDS)} (parallel) to one layer, "
                                 f"not {method.name}")


PRESETS: dict[str, PinwheelPreset] = {
    "smoke": PinwheelPreset(name="smoke", width=16, n_per_class=20, steps=20, seeds=(0,), log_every=1,
                            pretrain_steps=20, grid=40),
    "quick": PinwheelPreset(name="quick"),
    "full": PinwheelPreset(name="full", steps=1000, seeds=(0, 1, 2, 3, 4), pretrain_steps=1000, grid=200),
}


# -- data ------------------------------------------------------------------------------------
def pinwheel(
    n_per_class: int = 200,
    classes: int = CLASSES,
    radial_std: float = 0.3,
    tangential_std: float = 0.05,
    rate: float = 0.25,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pinwheel data set: ``classes`` arms, ``n_per_class`` points each, in class order.

    Each point starts as ``(1 + radial_std * e1, tangential_std * e2)`` (Gaussian e), so an
    arm is a blob elongated along the radius, and is rotated by ``2*pi*k/classes + rate *
    exp(radius)``: the further out, the more it turns, which bends the arms into a pinwheel.
    Returns ``x (N, 2)`` float32 (radius about 1) and ``y (N,)`` int64, N = classes *
    n_per_class. Deterministic for a given seed.
    """
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(classes).repeat_interleave(n_per_class)
    e = torch.randn(classes * n_per_class, 2, generator=g, dtype=torch.float64)
    radial = 1.0 + radial_std * e[:, 0]
    tangential = tangential_std * e[:, 1]
    angle = 2 * math.pi * y.double() / classes + rate * torch.exp(radial)
    c, s = torch.cos(angle), torch.sin(angle)
    x = torch.stack([radial * c - tangential * s, radial * s + tangential * c], dim=1)
    return x.float(), y


# -- model -----------------------------------------------------------------------------------
ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh, "gelu": nn.functional.gelu}


class PinwheelMLP(nn.Module):
    """``2 -> width -> width -> classes`` with ``activation``; the middle layer is called ``hidden``."""

    def __init__(self, width: int = 64, classes: int = CLASSES, activation: str = "tanh") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"pinwheel: activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
        self.activation = activation
        self.inp = nn.Linear(2, width)
        self.hidden = nn.Linear(width, width)
        self.out = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = ACTIVATIONS[self.activation]
        return self.out(act(self.hidden(act(self.inp(x)))))


def label(method: Method) -> str:
    """The method's label, with the pinwheel's words for ``head`` and ``full``."""
    return {"head": "frozen (no update)", "full": "full layer"}.get(method.kind, method.label)


def _is_adapted(param_name: str) -> bool:
    """Whether a parameter belongs to the adapted layer (its weight or an adapter on it)."""
    return param_name.startswith(f"{LAYER}.") or f".{LAYER}." in param_name


def adapt(base: nn.Module, method: Method | str, regime: str = "random", adapter_seed: int = 0) -> nn.Module:
    """A copy of ``base`` set up for ``method``: the requested update on the hidden layer, and
    ``requires_grad`` exactly on what trains (plus the input and output layers in regime
    ``"others_trainable"``)."""
    import peft

    method = parse(method)
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(adapter_seed)
    if method.kind == "full":
        model.hidden.weight.requires_grad_(True)
    elif method.kind != "head":
        model = peft.get_peft_model(model, surm_methods.peft_config(method, PROFILE))
    if regime == "others_trainable":
        for n, p in model.named_parameters():
            if not _is_adapted(n):
                p.requires_grad_(True)
    return model


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters in the adapted layer, all trainable parameters)."""
    adapted = total = 0
    for n, p in model.named_parameters():
        if p.requires_grad:
            total += p.numel()
            adapted += p.numel() if _is_adapted(n) else 0
    return adapted, total


def parameter_counts(width: int = 64, methods: Sequence[Method | str] = METHODS,
                     regime: str = "random") -> dict[str, dict[str, int]]:
    """``{method string: {"adapted": n, "trainable": n}}`` read off the actual models."""
    base = PinwheelMLP(width)
    out = {}
    for method in map(parse, methods):
        adapted, total = count_params(adapt(base, method, regime))
        out[method.name] = {"adapted": adapted, "trainable": total}
    return out


# -- training --------------------------------------------------------------------------------
def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        logits = model(x)
        return nn.functional.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float, log_every: int = 1) -> list[float]:
    """Full-batch Adam on the parameters with ``requires_grad``; returns the training loss at
    steps 0, log_every, 2*log_every, ... and after the last step (always the last entry)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params or steps == 0:
        return [_evaluate(model, x, y)[0]]
    opt = torch.optim.Adam(params, lr=lr)
    curve = []
    for step in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        if step % log_every == 0:
            curve.append(loss.item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    curve.append(_evaluate(model, x, y)[0])
    return curve


def base_model(
    seed: int, width: int, regime: str, x: torch.Tensor, y: torch.Tensor, pretrain_steps: int, pretrain_lr: float,
    activation: str = "tanh",
) -> tuple[nn.Module, float | None]:
    """Phase 1: the frozen base network for one seed, and its pretrained loss (regime "pretrained")."""
    torch.manual_seed(seed)
    base = PinwheelMLP(width, activation=activation)
    if regime != "pretrained":
        return base, None
    curve = train(base, x, y, pretrain_steps, pretrain_lr, log_every=max(pretrain_steps, 1))
    torch.manual_seed(seed + 5_000)
    fresh = nn.Linear(width, width)  # the hidden layer is redrawn at random and then frozen
    base.hidden.load_state_dict(fresh.state_dict())
    return base, curve[-1]


def lr_of(config: PinwheelPreset, method: Method) -> float:
    """The Adam rate of ``method``: ``config.lr`` (one value, or its entry), else ``lr_default``."""
    if isinstance(config.lr, dict):
        return float(config.lr.get(method, config.lr_default))
    return float(config.lr)


# -- the experiment --------------------------------------------------------------------------
def run(config: PinwheelPreset, out_dir: Path, runner: Runner) -> report.Outcome:
    """Run the pinwheel comparison; writes pinwheel.json / .md / .png into ``out_dir``.

    The runs are small and quick, so they are not kept in the run store; ``runner`` gives the
    progress setting. The outcome's payload holds the ``summary`` (per method: parameters,
    final loss, accuracies), the logged ``steps`` and the loss ``curves``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with torch_threads(config.threads):
        data_kw = dict(n_per_class=config.n_per_class, radial_std=config.radial_std,
                       tangential_std=config.tangential_std, rate=config.rate)
        x, y = pinwheel(seed=config.data_seed, **data_kw)
        x_test, y_test = pinwheel(seed=config.data_seed + 1, **data_kw)
        runs: dict[Method, list[dict[str, Any]]] = {m: [] for m in config.methods}
        counts: dict[Method, tuple[int, int]] = {}
        pretrained: list[float] = []
        kept: dict[Method, nn.Module] = {}
        bar = progress.bar(len(config.seeds) * len(config.methods), "pinwheel", disable=not runner.progress)
        for seed in config.seeds:
            base, pre_loss = base_model(seed, config.width, config.regime, x, y, config.pretrain_steps,
                                        config.pretrain_lr, config.activation)
            if pre_loss is not None:
                pretrained.append(pre_loss)
            for method in config.methods:
                bar.set_postfix_str(f"seed {seed} {method}", refresh=False)
                model = adapt(base, method, config.regime, adapter_seed=seed + 10_000)
                counts[method] = count_params(model)
                t0 = time.perf_counter()
                curve = train(model, x, y, config.steps, lr_of(config, method), config.log_every)
                loss, acc = _evaluate(model, x, y)
                _, test_acc = _evaluate(model, x_test, y_test)
                runs[method].append(dict(seed=seed, curve=curve, loss=loss, acc=acc, test_acc=test_acc,
                                         seconds=time.perf_counter() - t0))
                if seed == config.seeds[0] and method in config.regions:
                    kept[method] = model
                bar.update()
        bar.close()
        wall = time.perf_counter() - start

    summary = _summarise(config, runs, counts, pretrained, wall)
    steps_logged = list(range(0, config.steps, config.log_every)) + [config.steps]
    curves = {}
    for method, rs in runs.items():
        stack = torch.tensor([r["curve"] for r in rs], dtype=torch.float64)
        if stack.shape[1] == 1:  # nothing trained: a flat line
            stack = stack.expand(-1, len(steps_logged))
        curves[method.name] = {
            "mean": _round(stack.mean(0).tolist()),
            "std": _round((stack.std(0) if len(rs) > 1 else torch.zeros(stack.shape[1])).tolist()),
            "runs": [_round(row) for row in stack.tolist()],
        }
    settings = {k: v for k, v in config.to_dict().items() if k not in ("name", "plot")}
    payload = {"experiment": "pinwheel", "preset": config.name, "config": settings, "versions": _versions(),
               "summary": summary,
               "steps": steps_logged, "curves": curves}
    figures = []
    if config.plot:
        figures.append(plot(out_dir / "pinwheel.png", x, y, steps_logged, curves, summary, kept, grid=config.grid))
    return report.write(out_dir, "pinwheel", payload, tables(summary), figures,
                        one_line=[k for k in payload if k != "summary"])


def _versions() -> dict[str, str]:
    import peft

    import surm

    return {"surm": surm.__version__, "torch": torch.__version__, "peft": peft.__version__}


def _round(values: Sequence[float], digits: int = 4) -> list[float]:
    return [float(f"{v:.{digits}g}") for v in values]


def _summarise(config: PinwheelPreset, runs, counts, pretrained, wall) -> dict[str, Any]:
    methods = {}
    for method, rs in runs.items():
        loss_mean, loss_std = report.mean_std(r["loss"] for r in rs)
        acc_mean, acc_std = report.mean_std(r["acc"] for r in rs)
        test_mean, test_std = report.mean_std(r["test_acc"] for r in rs)
        methods[method.name] = dict(
            label=label(method),
            adapted_params=counts[method][0],
            trainable_params=counts[method][1],
            lr=lr_of(config, method) if counts[method][1] else None,
            final_loss_mean=loss_mean,
            final_loss_std=loss_std,
            train_acc_mean=acc_mean,
            train_acc_std=acc_std,
            test_acc_mean=test_mean,
            test_acc_std=test_std,
            final_losses=[r["loss"] for r in rs],
            seconds_per_run=sum(r["seconds"] for r in rs) / len(rs),
        )
    summary = dict(
        experiment="pinwheel",
        preset=config.name,
        regime=config.regime,
        activation=config.activation,
        width=config.width,
        n_train=CLASSES * config.n_per_class,
        steps=config.steps,
        seeds=list(config.seeds),
        wall_time_s=wall,
        methods=methods,
    )
    if pretrained:
        summary["pretrained_loss_mean"], summary["pretrained_loss_std"] = report.mean_std(pretrained)
    return summary


def tables(summary: dict[str, Any]) -> str:
    """The results table (and a one-paragraph description of the run) as Markdown."""
    s = summary
    lines = [
        f"# pinwheel ({s['preset']} preset, regime `{s['regime']}`)",
        "",
        f"MLP 2-{s['width']}-{s['width']}-5 ({s['activation']}), {s['n_train']} training points, full-batch Adam, "
        f"{s['steps']} steps, seeds {s['seeds']}; the hidden {s['width']}x{s['width']} layer is frozen and only "
        f"the update on it trains"
        f"{' (input and output layers train too)' if s['regime'] == 'others_trainable' else ''}. "
        f"Mean ± std over seeds. Wall time {s['wall_time_s']:.0f} s.",
        "",
    ]
    if "pretrained_loss_mean" in s:
        lines += [f"Pretrained network's loss before the hidden layer is redrawn: "
                  f"{s['pretrained_loss_mean']:.4f} ± {s['pretrained_loss_std']:.4f}.", ""]
    header = ["method", "params (adapted layer)", "trainable params (all)", "lr", "final train loss", "train acc",
              "test acc"]
    rows = [[m["label"], m["adapted_params"], m["trainable_params"], "–" if m["lr"] is None else f"{m['lr']:g}",
             f"{m['final_loss_mean']:.3f} ± {m['final_loss_std']:.3f}",
             f"{m['train_acc_mean']:.3f} ± {m['train_acc_std']:.3f}",
             f"{m['test_acc_mean']:.3f} ± {m['test_acc_std']:.3f}"] for m in s["methods"].values()]
    return "\n".join(lines) + "\n" + report.markdown_table(header, rows, align="lrrrlll")


# -- plot ------------------------------------------------------------------------------------
def plot(path: Path, x, y, steps, curves, summary, kept: dict[Method, nn.Module], grid: int = 160) -> Path:
    """Data set, mean ± std loss curves, and (first seed) decision regions of a few methods."""
    from matplotlib import ticker

    plt = plots.pyplot()
    styles = plots.method_styles(parse(m) for m in curves)
    n_regions = len(kept)
    cols = max(n_regions, 3)
    fig = plt.figure(figsize=(3.2 * cols, 6.8 if n_regions else 3.6))
    gs = fig.add_gridspec(2 if n_regions else 1, cols, height_ratios=[1.15, 1] if n_regions else [1])
    ax = fig.add_subplot(gs[0, 0])
    palette = torch.tensor(plt.get_cmap("tab10").colors)  # class k has colour k everywhere
    ax.scatter(x[:, 0], x[:, 1], c=palette[y].numpy(), s=4)
    ax.set_title(f"the pinwheel data ({len(y)} points, {CLASSES} classes)", fontsize=9)
    ax.set_aspect("equal")
    ax = fig.add_subplot(gs[0, 1:])
    for method, c in curves.items():
        m = summary["methods"][method]
        mean, std = torch.tensor(c["mean"]), torch.tensor(c["std"])
        color = styles[parse(method)]["color"]
        legend = f"{m['label']} ({m['adapted_params']} p): {m['final_loss_mean']:.3f}"
        ax.plot(steps, mean, color=color, lw=1.5, label=legend)
        ax.fill_between(steps, (mean - std).clamp_min(1e-6), mean + std, color=color, alpha=0.2, lw=0)
    ax.set_yscale("log")
    lowest = min(min(c["mean"]) for c in curves.values())
    ax.set_ylim(bottom=max(lowest, 1e-6) / 6)  # room for the legend below the curves
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    low, high = ax.get_ylim()
    if high / low < 10:
        ax.yaxis.set_minor_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    else:
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlabel("step (full batch)")
    ax.set_ylabel("training cross-entropy (log scale)")
    seeds = len(summary["seeds"])
    ax.set_title(f"Training loss when only an update on the hidden {summary['width']}x{summary['width']} layer trains "
                 f"(regime {summary['regime']}, mean ± std over {seeds} seed{'s' if seeds > 1 else ''})", fontsize=9)
    ax.legend(fontsize=7, loc="lower left", ncol=2, title="method (parameters): final loss", title_fontsize=7)
    ax.grid(alpha=0.3, which="both")
    if n_regions:
        lo, hi = x.min(0).values - 0.3, x.max(0).values + 0.3
        g = torch.linspace(0, 1, grid)
        gx, gy = torch.meshgrid(lo[0] + (hi[0] - lo[0]) * g, lo[1] + (hi[1] - lo[1]) * g, indexing="xy")
        pts = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)
        for i, (method, model) in enumerate(kept.items()):
            ax = fig.add_subplot(gs[1, i])
            with torch.no_grad():
                pred = model(pts).argmax(1).reshape(gx.shape)
            extent = (lo[0].item(), hi[0].item(), lo[1].item(), hi[1].item())
            ax.imshow((0.6 + 0.4 * palette[pred]).numpy(), origin="lower", extent=extent, interpolation="nearest")
            ax.scatter(x[:, 0], x[:, 1], c=palette[y].numpy(), s=2)
            ax.set_title(f"{label(method)}: decision regions (seed {summary['seeds'][0]})", fontsize=8)
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    return plots.save(fig, path)
