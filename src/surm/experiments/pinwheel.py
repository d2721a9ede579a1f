"""The synthetic pinwheel experiment (SPEC §5.2): LoRA against SURM at equal parameters.

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

``run(out_dir, preset)`` writes ``pinwheel.json`` (config, summary, loss curves),
``pinwheel.md`` (the table) and ``pinwheel.png`` (data, loss curves, decision regions).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

CLASSES = 5
LAYER = "hidden"  # the adapted layer's module name in PinwheelMLP
REGIMES = ("random", "pretrained", "others_trainable")

#: methods, in table order: "full" trains the layer's weight, "frozen" trains no update,
#: "lora:r" is PEFT's LoRA of rank r, any other name is a SURM structure ("ldr:r" with rank r).
METHODS = ("frozen", "full", "lora:1", "lora:4", "circulant", "symmetric_toeplitz", "toeplitz", "ldr:1")

#: Adam learning rates per method: the best final training loss of a sweep over {3e-3, 1e-2,
#: 3e-2, 1e-1, 3e-1} (full preset, tanh, regime "random") on seeds 100 and 101, disjoint from
#: the reported seeds 0-4; docs/pinwheel.md has the sweep. Unlisted methods use "default".
LEARNING_RATES: dict[str, float] = {
    "default": 3e-2,
    "full": 1e-1,
    "lora:1": 3e-2,
    "lora:4": 1e-1,
    "circulant": 3e-2,
    "symmetric_toeplitz": 3e-1,
    "toeplitz": 3e-1,
    "ldr:1": 3e-2,
}

PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(width=16, n_per_class=20, steps=20, seeds=(0,), log_every=1, pretrain_steps=20, grid=40),
    "quick": dict(width=64, n_per_class=200, steps=300, seeds=(0, 1), log_every=5, pretrain_steps=500, grid=120),
    "full": dict(width=64, n_per_class=200, steps=1000, seeds=(0, 1, 2, 3, 4), log_every=5, pretrain_steps=1000, grid=200),
}

DEFAULTS: dict[str, Any] = dict(
    regime="random",
    activation="tanh",
    methods=METHODS,
    lr=LEARNING_RATES,
    radial_std=0.3,
    tangential_std=0.05,
    rate=0.25,
    data_seed=0,
    pretrain_lr=1e-2,
    regions=("full", "lora:1", "circulant", "toeplitz"),
    threads=1,
    progress=True,
    plot=True,
)


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


def parse_method(method: str) -> tuple[str, dict[str, int]]:
    """``"lora:4"`` -> ``("lora", {"rank": 4})``; ``"circulant"`` -> ``("circulant", {})``."""
    name, _, rank = method.partition(":")
    return name, ({"rank": int(rank)} if rank else {})


def label(method: str) -> str:
    name, knobs = parse_method(method)
    fixed = {"full": "full layer", "frozen": "frozen (no update)", "lora": "LoRA", "ldr": "LDR"}
    text = fixed.get(name, name.replace("_", " "))
    return f"{text} r={knobs['rank']}" if knobs else text


def _is_adapted(param_name: str) -> bool:
    """Whether a parameter belongs to the adapted layer (its weight or an adapter on it)."""
    return param_name.startswith(f"{LAYER}.") or f".{LAYER}." in param_name


def adapt(base: nn.Module, method: str, regime: str = "random", adapter_seed: int = 0) -> nn.Module:
    """A copy of ``base`` set up for ``method``: the requested update on the hidden layer, and
    ``requires_grad`` exactly on what trains (plus the input and output layers in regime
    ``"others_trainable"``)."""
    import peft  # heavy; imported where needed

    import surm  # registers SURM with PEFT

    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(False)
    name, knobs = parse_method(method)
    torch.manual_seed(adapter_seed)
    if name == "full":
        model.hidden.weight.requires_grad_(True)
    elif name == "lora":
        r = knobs["rank"]
        cfg = peft.LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=[LAYER])
        model = peft.get_peft_model(model, cfg)
    elif name != "frozen":
        cfg = surm.SurmConfig(structure=name, target_modules=[LAYER], alpha=1.0, **knobs)
        model = peft.get_peft_model(model, cfg)
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


def parameter_counts(width: int = 64, methods: Sequence[str] = METHODS, regime: str = "random") -> dict[str, dict[str, int]]:
    """``{method: {"adapted": n, "trainable": n}}`` read off the actual models."""
    base = PinwheelMLP(width)
    out = {}
    for method in methods:
        adapted, total = count_params(adapt(base, method, regime))
        out[method] = {"adapted": adapted, "trainable": total}
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


def _lr_for(method: str, lr: float | dict[str, float]) -> float:
    if isinstance(lr, dict):
        return float(lr.get(method, lr.get("default", 1e-2)))
    return float(lr)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return t.mean().item(), (t.std(unbiased=True).item() if len(values) > 1 else 0.0)


# -- the experiment --------------------------------------------------------------------------
def run(out_dir: Path | str, preset: str = "full", **overrides: Any) -> dict[str, Any]:
    """Run the pinwheel comparison, write pinwheel.json / .md / .png into ``out_dir``, return the summary.

    Presets: "smoke" (seconds, for tests), "quick" (2 seeds, 300 steps), "full" (5 seeds,
    1000 steps). Any key of the preset or of ``DEFAULTS`` can be overridden, e.g.
    ``run(out, "quick", regime="pretrained", seeds=(7,))``; ``lr`` takes a float or a dict
    ``{method: lr, "default": lr}``.
    """
    if preset not in PRESETS:
        raise ValueError(f"pinwheel: unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    cfg = {**DEFAULTS, **PRESETS[preset]}
    unknown = set(overrides) - set(cfg)
    if unknown:
        raise TypeError(f"pinwheel: unknown override(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(cfg))}")
    cfg.update(overrides)
    if cfg["regime"] not in REGIMES:
        raise ValueError(f"pinwheel: regime must be one of {REGIMES}, got {cfg['regime']!r}")
    cfg["methods"], cfg["seeds"], cfg["regions"] = list(cfg["methods"]), list(cfg["seeds"]), list(cfg["regions"])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    from tqdm.auto import tqdm

    threads = torch.get_num_threads()
    torch.set_num_threads(cfg["threads"])
    start = time.perf_counter()
    try:
        data_kw = {k: cfg[k] for k in ("n_per_class", "radial_std", "tangential_std", "rate")}
        x, y = pinwheel(seed=cfg["data_seed"], **data_kw)
        x_test, y_test = pinwheel(seed=cfg["data_seed"] + 1, **data_kw)
        runs: dict[str, list[dict[str, Any]]] = {m: [] for m in cfg["methods"]}
        counts: dict[str, tuple[int, int]] = {}
        pretrained: list[float] = []
        kept: dict[str, nn.Module] = {}
        bar = tqdm(total=len(cfg["seeds"]) * len(cfg["methods"]), desc="pinwheel", disable=not cfg["progress"])
        for seed in cfg["seeds"]:
            base, pre_loss = base_model(seed, cfg["width"], cfg["regime"], x, y, cfg["pretrain_steps"], cfg["pretrain_lr"],
                                        cfg["activation"])
            if pre_loss is not None:
                pretrained.append(pre_loss)
            for method in cfg["methods"]:
                bar.set_postfix_str(f"seed {seed} {method}")
                model = adapt(base, method, cfg["regime"], adapter_seed=seed + 10_000)
                counts[method] = count_params(model)
                t0 = time.perf_counter()
                curve = train(model, x, y, cfg["steps"], _lr_for(method, cfg["lr"]), cfg["log_every"])
                loss, acc = _evaluate(model, x, y)
                _, test_acc = _evaluate(model, x_test, y_test)
                runs[method].append(dict(seed=seed, curve=curve, loss=loss, acc=acc, test_acc=test_acc,
                                         seconds=time.perf_counter() - t0))
                if seed == cfg["seeds"][0] and method in cfg["regions"]:
                    kept[method] = model
                bar.update()
        bar.close()
        wall = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)

    summary = _summarise(cfg, preset, runs, counts, pretrained, wall)
    steps_logged = list(range(0, cfg["steps"], cfg["log_every"])) + [cfg["steps"]]
    curves = {}
    for method, rs in runs.items():
        stack = torch.tensor([r["curve"] for r in rs], dtype=torch.float64)
        if stack.shape[1] == 1:  # nothing trained: a flat line
            stack = stack.expand(-1, len(steps_logged))
        curves[method] = {
            "mean": _round(stack.mean(0).tolist()),
            "std": _round((stack.std(0) if len(rs) > 1 else torch.zeros(stack.shape[1])).tolist()),
            "runs": [_round(row) for row in stack.tolist()],
        }
    config = {k: (v if not isinstance(v, tuple) else list(v)) for k, v in cfg.items() if k not in ("progress", "plot")}
    payload = {"experiment": "pinwheel", "config": config, "versions": _versions(), "summary": summary,
               "steps": steps_logged, "curves": curves}
    # one line per top-level key: the summary stays readable, the curves stay small
    lines = [f" {json.dumps(k)}: {json.dumps(v, indent=1 if k == 'summary' else None)}" for k, v in payload.items()]
    (out_dir / "pinwheel.json").write_text("{\n" + ",\n".join(lines) + "\n}\n")
    (out_dir / "pinwheel.md").write_text(markdown_table(summary))
    if cfg["plot"]:
        plot(out_dir / "pinwheel.png", x, y, steps_logged, curves, summary, kept, grid=cfg["grid"])
    return summary


def _versions() -> dict[str, str]:
    import peft

    import surm

    return {"surm": surm.__version__, "torch": torch.__version__, "peft": peft.__version__}


def _round(values: Sequence[float], digits: int = 4) -> list[float]:
    return [float(f"{v:.{digits}g}") for v in values]


def _summarise(cfg, preset, runs, counts, pretrained, wall) -> dict[str, Any]:
    methods = {}
    for method, rs in runs.items():
        loss_mean, loss_std = _mean_std([r["loss"] for r in rs])
        acc_mean, acc_std = _mean_std([r["acc"] for r in rs])
        test_mean, test_std = _mean_std([r["test_acc"] for r in rs])
        methods[method] = dict(
            label=label(method),
            adapted_params=counts[method][0],
            trainable_params=counts[method][1],
            lr=_lr_for(method, cfg["lr"]) if counts[method][1] else None,
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
        preset=preset,
        regime=cfg["regime"],
        activation=cfg["activation"],
        width=cfg["width"],
        n_train=CLASSES * cfg["n_per_class"],
        steps=cfg["steps"],
        seeds=list(cfg["seeds"]),
        wall_time_s=wall,
        methods=methods,
    )
    if pretrained:
        summary["pretrained_loss_mean"], summary["pretrained_loss_std"] = _mean_std(pretrained)
    return summary


def _fmt_lr(lr: float | None) -> str:
    return "–" if lr is None else f"{lr:g}"


def markdown_table(summary: dict[str, Any]) -> str:
    """The results table (and a one-paragraph description of the run) as Markdown."""
    s = summary
    lines = [
        f"# pinwheel ({s['preset']} preset, regime `{s['regime']}`)",
        "",
        f"MLP 2-{s['width']}-{s['width']}-5 ({s['activation']}), {s['n_train']} training points, full-batch Adam, "
        f"{s['steps']} steps, seeds {s['seeds']}; the hidden {s['width']}x{s['width']} layer is frozen and only "
        f"the update on it trains{' (input and output layers train too)' if s['regime'] == 'others_trainable' else ''}. "
        f"Mean ± std over seeds. Wall time {s['wall_time_s']:.0f} s.",
        "",
    ]
    if "pretrained_loss_mean" in s:
        lines += [f"Pretrained network's loss before the hidden layer is redrawn: "
                  f"{s['pretrained_loss_mean']:.4f} ± {s['pretrained_loss_std']:.4f}.", ""]
    lines += [
        "| method | params (adapted layer) | trainable params (all) | lr | final train loss | train acc | test acc |",
        "|---|---:|---:|---:|---|---|---|",
    ]
    for m in s["methods"].values():
        lines.append(
            f"| {m['label']} | {m['adapted_params']} | {m['trainable_params']} | {_fmt_lr(m['lr'])} | "
            f"{m['final_loss_mean']:.3f} ± {m['final_loss_std']:.3f} | "
            f"{m['train_acc_mean']:.3f} ± {m['train_acc_std']:.3f} | {m['test_acc_mean']:.3f} ± {m['test_acc_std']:.3f} |"
        )
    return "\n".join(lines) + "\n"


# -- plot ------------------------------------------------------------------------------------
_COLORS = {"frozen": "0.6", "full": "k", "lora:1": "tab:red", "lora:4": "tab:pink", "circulant": "tab:blue",
           "symmetric_toeplitz": "tab:cyan", "toeplitz": "tab:green", "ldr:1": "tab:purple"}


def plot(path: Path, x, y, steps, curves, summary, kept: dict[str, nn.Module], grid: int = 160) -> None:
    """Data set, mean ± std loss curves, and (seed 0) decision regions of a few methods."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_regions = len(kept)
    cols = max(n_regions, 3)
    fig = plt.figure(figsize=(3.2 * cols, 6.8 if n_regions else 3.6))
    gs = fig.add_gridspec(2 if n_regions else 1, cols, height_ratios=[1.15, 1] if n_regions else [1])
    ax = fig.add_subplot(gs[0, 0])
    palette = torch.tensor(plt.get_cmap("tab10").colors)  # class k has colour k everywhere
    ax.scatter(x[:, 0], x[:, 1], c=palette[y].numpy(), s=4)
    ax.set_title(f"pinwheel data ({len(y)} points)")
    ax.set_aspect("equal")
    ax = fig.add_subplot(gs[0, 1:])
    for method, c in curves.items():
        m = summary["methods"][method]
        mean, std = torch.tensor(c["mean"]), torch.tensor(c["std"])
        color = _COLORS.get(method)
        ax.plot(steps, mean, color=color, lw=1.5,
                label=f"{m['label']} ({m['adapted_params']} p): {m['final_loss_mean']:.3f}")
        ax.fill_between(steps, (mean - std).clamp_min(1e-6), mean + std, color=color, alpha=0.2, lw=0)
    ax.set_yscale("log")
    lowest = min(min(c["mean"]) for c in curves.values())
    ax.set_ylim(bottom=max(lowest, 1e-6) / 6)  # room for the legend below the curves
    from matplotlib import ticker

    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    low, high = ax.get_ylim()
    if high / low < 10:
        ax.yaxis.set_minor_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    else:
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlabel("step (full batch)")
    ax.set_ylabel("training cross-entropy")
    ax.set_title(f"only the update on the hidden {summary['width']}x{summary['width']} layer trains "
                 f"(regime {summary['regime']}, {len(summary['seeds'])} seed{'s' if len(summary['seeds']) > 1 else ''}, mean ± std)", fontsize=9)
    ax.legend(fontsize=7, loc="lower left", ncol=2)
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
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="pinwheel: LoRA vs SURM at equal parameters on one frozen MLP layer")
    parser.add_argument("--out", type=Path, default=Path("results/pinwheel"))
    parser.add_argument("--preset", choices=list(PRESETS), default="full")
    parser.add_argument("--regime", choices=REGIMES, default="random")
    parser.add_argument("--activation", choices=list(ACTIVATIONS), default=DEFAULTS["activation"])
    args = parser.parse_args(argv)
    summary = run(args.out, args.preset, regime=args.regime, activation=args.activation)
    print(markdown_table(summary))


if __name__ == "__main__":
    main()
