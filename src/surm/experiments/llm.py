"""SURM on a causal LM: SmolLM2-135M-Instruct fine-tuned on prompt -> response pairs.

The packaged SmolLM2-135M-Instruct (:func:`surm.harness.models.load_causal_lm`, the Q4_1 GGUF
dequantized to float32) learns to write Grimm tales from a title and a one-line summary
(``grimm_tales``) or the next line of a Friends scene (``friends``), through its chat template
(:mod:`surm.harness.data.chat`: the loss is on the response tokens only). Each method is a run
of the run core (:class:`~surm.harness.runs.RunSpec`: the catalog's Llama profile, the LM head
frozen), trained with the loop of every experiment (AdamW, linear warm-up and decay, clipping
at 1) at the method's default rate (:func:`surm.harness.methods.default_lr`: LoRA 3e-3, SURM
:func:`surm.recommended_lr`, 3e-2 for the parallel width-scaled families).

Methods: ``base`` (the model as it is, no training), method strings such as ``lora:8`` (PEFT
LoRA on q and v), ``surm:circulant`` (parallel SURM on the seven projections of every block)
and ``surm:circulant:targets=qv`` (attention q and v only); ``matched_lora`` adds a LoRA on
the seven projections whose rank gives the parameter count nearest that SURM method's.

Reported per method: trainable parameters, held-out (validation and test) mean response-token
loss and perplexity, seconds per step, peak memory while training, the validation loss curve,
greedy generations for the first test prompts before and after fine-tuning, and the merge
check: the logits of ``merge_and_unload()``'s plain model against the adapter model's (max
absolute difference) on a held-out batch, and whether both generate the same greedy text.

``run(config, out_dir, runner)`` writes ``llm.json``, ``llm.md`` and ``llm.png`` (validation
loss against steps). The runs are kept in the run store like every other; the base model's row
is evaluated each time (nothing trains).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from surm.harness import methods as surm_methods
from surm.harness.models import catalog
from surm.harness.runs import Runner, RunSpec, load_splits, make_model
from surm.harness.threads import torch_threads

from . import plots, report
from .presets import Preset, setting

BASE = "base"  # the method that trains nothing
DATASETS = ("grimm_tales", "friends")


@dataclass(frozen=True)
class LlmPreset(Preset):
    """Settings of ``surm reproduce llm``."""

    model: Literal["smollm2", "tiny-llama"] = setting("smollm2", "smollm2 (SmolLM2-135M-Instruct) or tiny-llama")
    dataset: Literal["grimm_tales", "friends"] = setting("grimm_tales", "prompt -> response data set")
    methods: tuple[str, ...] = setting(
        (BASE, "lora:8", "surm:circulant", "surm:toeplitz"),
        "base (no training) or method strings (lora:8, surm:circulant, surm:circulant:targets=qv, ...)")
    matched_lora: str | None = setting(
        None, "a SURM method string: also train LoRA on the seven projections at the rank whose parameter "
              "count is nearest that method's (None: no)")
    steps: int = setting(24, "optimizer steps per method")
    batch_size: int = setting(4, "examples per step")
    max_length: int = setting(256, "tokens per example, prompt included (the response is cut)")
    n_train: int | None = setting(None, "keep this many training examples (None: all)")
    n_eval: int | None = setting(None, "cap validation and test at this many examples (None: all)")
    eval_points: int = setting(4, "validation evaluations during training (plus one before)")
    eval_batch_size: int = setting(4, "examples per evaluation batch")
    lr: float | None = setting(None, "one learning rate for every method (None: each method's default)")
    seeds: tuple[int, ...] = setting((0,), "seeds (adapter initialisation, data order, training subsample); "
                                           "each method trains once per seed")
    n_prompts: int = setting(2, "test prompts to generate from, before and after fine-tuning")
    max_new_tokens: int = setting(40, "tokens per greedy generation")
    threads: int | None = setting(1, "torch threads")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.methods:
            raise ValueError("methods: give at least one (base, or a method string)")
        for text in self.methods:
            if text != BASE:
                _adapter_method(text)
        if self.matched_lora is not None and surm_methods.parse(self.matched_lora).kind != "surm":
            raise ValueError(f"matched_lora: a SURM method string, got {self.matched_lora!r}")
        for name in ("steps", "batch_size", "max_length", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


def _adapter_method(text: str) -> surm_methods.Method:
    method = surm_methods.parse(text)  # ValueError with the grammar
    if method.kind in ("head", "full", "bitfit"):
        raise ValueError(f"methods: {method.name} is not an adapter method; llm compares adapters "
                         f"(base: no training)")
    return method


PRESETS: dict[str, LlmPreset] = {
    "smoke": LlmPreset(name="smoke", model="tiny-llama", methods=(BASE, "lora:2", "surm:circulant"),
                       matched_lora="surm:circulant", steps=4, batch_size=2, max_length=160, n_train=8, n_eval=3,
                       eval_points=2, n_prompts=1, max_new_tokens=5),
    "quick": LlmPreset(name="quick"),
    "full": LlmPreset(name="full", methods=(BASE, "lora:8", "surm:circulant", "surm:toeplitz", "surm:kronecker",
                                            "surm:ldr", "surm:skew_circulant", "surm:circulant:targets=qv",
                                            "surm:toeplitz:targets=qv"),
                      matched_lora="surm:toeplitz", steps=48, seeds=(0, 1, 2), eval_points=8),
}
# quick: about 13 min of one core (24 steps of about 8 s CPU for each of 3 methods, evaluations and
# generations); full: 10 methods x 3 seeds x 48 steps, about 3.5 h of one core (not run yet).


# --------------------------------------------------------------------------- runs


def spec(config: LlmPreset, method: str, seed: int) -> RunSpec:
    """The run of ``method`` with ``seed`` under ``config`` (scored on validation and test, the
    curve at ``eval_points`` steps, generations and the merge check on ``n_prompts`` prompts)."""
    return RunSpec(dataset=config.dataset, method=method, seed=seed, lr=config.lr, epochs=0.0, min_steps=config.steps,
                   batch_size=config.batch_size, n_train=config.n_train, n_eval=config.n_eval,
                   max_length=config.max_length, model=config.model, eval_splits=("validation", "test"),
                   eval_points=config.eval_points, eval_batch_size=config.eval_batch_size,
                   n_generate=config.n_prompts, max_new_tokens=config.max_new_tokens)


def adapter_params(model: str, method: surm_methods.Method) -> int:
    """Trainable parameters of ``method`` on catalog model ``model``'s skeleton (no weights)."""
    entry = catalog.entry(model, "causal_lm")
    return surm_methods.count_trainable(surm_methods.apply(entry.skeleton(), method, entry.profile))


def matched_lora_rank(model: str, method: surm_methods.Method) -> tuple[int, int]:
    """``(rank, params)`` of the LoRA on the seven projections whose parameter count is nearest
    ``method``'s (rank at least 1), and ``method``'s own count."""
    target = adapter_params(model, method)
    per_rank = adapter_params(model, surm_methods.parse("lora:1:targets=all"))
    return max(1, round(target / per_rank)), target


def run(config: LlmPreset, out_dir: Path, runner: Runner) -> report.Outcome:
    """Fine-tune with every method of ``config``; writes llm.json / .md / .png into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    methods = [m for m in config.methods if m != BASE]
    if config.matched_lora is not None:
        rank, _ = matched_lora_rank(config.model, surm_methods.parse(config.matched_lora))
        methods.append(f"lora:{rank}:targets=all")
    specs = [spec(config, m, seed) for seed in config.seeds for m in methods]
    records, wall = runner.run_all(specs, "llm", config.threads)
    by_key = {r.spec.key: r for r in records}
    rows: list[dict[str, Any]] = []
    prompts: list[str] = []
    for seed in config.seeds:
        if BASE in config.methods:
            base_row, prompts = _base_row(config, seed, runner.progress)
            rows.append({"seed": seed, **base_row})
        rows += [{"seed": seed, **_row(by_key[spec(config, m, seed).key])} for m in methods]
    settings = {k: v for k, v in config.to_dict().items() if k != "name"}
    payload = {"experiment": "llm", "preset": config.name, "config": settings, "wall_seconds": wall,
               "prompts": prompts or _prompts(config), "rows": rows}
    first = [r for r in rows if r["seed"] == config.seeds[0]]
    figure = plot_curves(first, out_dir / "llm.png",
                         f"{_title(config.model)} on {config.dataset}: validation loss"
                         + (f" (seed {config.seeds[0]})" if len(config.seeds) > 1 else ""))
    return report.write(out_dir, "llm", payload, markdown(payload), [figure])


def _prompts(config: LlmPreset) -> list[str]:
    return list(load_splits(spec(config, "lora:1", config.seeds[0])).test.prompts[: config.n_prompts])


def _base_row(config: LlmPreset, seed: int, progress: bool) -> tuple[dict[str, Any], list[str]]:
    """The base model as it is (nothing trained): held-out metrics and generations."""
    from surm.harness.training.causal_lm import evaluate_lm, generate

    run = spec(config, "lora:1", seed)
    splits = load_splits(run)
    model, batcher = make_model(run)
    prompts = list(splits.test.prompts[: config.n_prompts])
    with torch_threads(config.threads):
        metrics = {name: evaluate_lm(model, batcher, getattr(splits, name), run.effective_eval_batch_size)
                   for name in ("validation", "test")}
        generations = generate(model, batcher.tokenizer, prompts, config.max_new_tokens)
    curve = [{"step": 0, "loss": metrics["validation"]["loss"], "perplexity": metrics["validation"]["perplexity"]}]
    row = {"method": BASE, "label": "base model (no training)", "where": "-", "lr": None, "trainable_params": 0,
           **metrics, "curve": curve, "generations": generations}
    return row, prompts


def _row(record) -> dict[str, Any]:
    """A table row of a trained run."""
    row = {"method": record.method.name, "label": record.label, "where": where(record.method), "lr": record.lr,
           "trainable_params": record.trainable_params, "validation": record.validation, "test": record.test,
           "curve": record.curve, "steps": record.train["steps"], "train_seconds": record.train_seconds,
           "seconds_per_step": record.seconds_per_step,
           "cpu_seconds_per_step": record.train_cpu_seconds / max(1, record.train["steps"]),
           "peak_memory_mb": record.peak_memory_mb, "peak_memory_growth_mb": record.peak_memory_growth_mb,
           "generations": record.checks.get("generations", []), "stored": record.from_store}
    if "merge" in record.checks:
        row["merge"] = record.checks["merge"]
    if record.diverged:
        row["diverged"] = True
    return row


def where(method: surm_methods.Method) -> str:
    """Which projections of each block the method adapts, in words."""
    targets = method.knob("targets")
    if method.kind == "surm" and method.placement == "serial":
        return "after o, down (serial)"
    if targets == "all" or (method.kind == "surm" and targets is None):
        return "q k v o gate up down"
    return "q v"


# --------------------------------------------------------------------------- outputs


def markdown(payload: dict[str, Any]) -> str:
    """The table, the merge check and the generations."""
    config, rows = payload["config"], payload["rows"]
    seeds = sorted({r.get("seed", 0) for r in rows})
    header = ["method", *(["seed"] if len(seeds) > 1 else []), "where", "trainable params", "lr", "val loss",
              "val ppl", "test loss", "test ppl", "s/step", "CPU s/step", "train memory (MiB)"]
    table = []
    for r in rows:
        trained = r["method"] != BASE
        table.append([
            r["label"], *([r.get("seed", 0)] if len(seeds) > 1 else []), r["where"], f"{r['trainable_params']:,}",
            f"{r['lr']:g}" if trained else "-",
            f"{r['validation']['loss']:.3f}", f"{r['validation']['perplexity']:.2f}",
            f"{r['test']['loss']:.3f}", f"{r['test']['perplexity']:.2f}",
            _seconds(r["seconds_per_step"]) if trained else "-",
            _seconds(r["cpu_seconds_per_step"]) if trained and "cpu_seconds_per_step" in r else "-",
            f"{r['peak_memory_mb']:.0f} (+{r['peak_memory_growth_mb']:.0f})" if trained else "-",
        ])
    first = rows[0]
    lines = [
        f"# {_title(config['model'])} on {config['dataset']} ({payload['preset']} preset)",
        "",
        f"{config['steps']} steps of {config['batch_size']} examples, max_length {config['max_length']}, each "
        f"method at its default learning rate; validation {first['validation']['n']} examples "
        f"({first['validation']['tokens']} response tokens), test {first['test']['n']} "
        f"({first['test']['tokens']}). Loss: mean cross-entropy (nats) per response token; ppl = exp(loss). "
        f"s/step: wall time per optimizer step, CPU s/step: the process's CPU time per step (which does not "
        f"grow when other processes share the cores; evaluations left out of both). "
        f"Memory: peak resident size of the process while training (growth over its size at the start in "
        f"brackets); the process also holds the base model and what earlier methods left to the allocator, "
        f"so compare the growth, and that loosely. "
        f"Wall time {payload['wall_seconds'] / 60:.1f} min.",
        "",
        report.markdown_table(header, table),
        "",
    ]
    diverged = [r["label"] for r in rows if r.get("diverged")]
    if diverged:
        lines += [f"Diverged (non-finite validation loss): {', '.join(diverged)}.", ""]
    merges = [r for r in rows if "merge" in r]
    if merges:
        lines += ["## Merge check", "",
                  "`merge_and_unload()` against the adapter model on a held-out batch: max |logit difference| "
                  "(largest |logit| for scale), and whether both give the same greedy generations.", ""]
        lines.append(report.markdown_table(
            ["method", "merged model", "max abs logit diff", "max abs logit", "same generations"],
            [[r["label"], r["merge"]["merged_type"], f"{r['merge']['max_abs_logit_diff']:.2e}",
              f"{r['merge']['max_abs_logit']:.1f}", "yes" if r["merge"]["same_generations"] else "no"]
             for r in merges]))
        lines.append("")
    lines += ["## Greedy generations (test prompts)" + (f", seed {seeds[0]}" if len(seeds) > 1 else ""), "",
              "The base model's before fine-tuning; each method's from its merged model after.", ""]
    for i, prompt in enumerate(payload["prompts"]):
        lines += [f"**Prompt {i + 1}:** {prompt}", ""]
        for r in rows:
            if r.get("seed", 0) != seeds[0]:
                continue
            lines += [f"- *{r['label']}*: {r['generations'][i]!r}"]
        lines.append("")
    return "\n".join(lines)


def _title(model: str) -> str:
    try:
        return catalog.entry(model, "causal_lm").title
    except ValueError:
        return model


def _seconds(value: float) -> str:
    return f"{value:.1f}" if value >= 1 else f"{value:.3f}"


def plot_curves(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Validation loss against steps, one line per method (the base model a horizontal line)."""
    plt = plots.pyplot()
    trained = [r for r in rows if r["method"] != BASE]
    styles = plots.method_styles([surm_methods.parse(r["method"]) for r in trained])
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    last = max((r["curve"][-1]["step"] for r in trained), default=1)
    for r in rows:
        if r["method"] == BASE:
            ax.axhline(r["validation"]["loss"], color="0.5", linestyle=":", label=r["label"])
            continue
        steps = [p["step"] for p in r["curve"]]
        losses = [p["loss"] for p in r["curve"]]
        style = styles[surm_methods.parse(r["method"])]
        ax.plot(steps, losses, label=f"{r['label']} ({r['where']}, {plots.count(r['trainable_params'])})",
                color=style["color"], marker=style["marker"], linestyle="--" if r["where"] == "q v" else "-")
    ax.set_xlim(0, max(last, 1))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss (nats / response token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return plots.save(fig, path)
