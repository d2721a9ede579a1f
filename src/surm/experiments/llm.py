"""SURM on a causal LM: SmolLM2-135M-Instruct fine-tuned on prompt -> response data.

The packaged SmolLM2-135M-Instruct (:func:`surm.harness.models.load_causal_lm`, the Q4_1 GGUF
dequantized to float32) learns, through its chat template (:mod:`surm.harness.data.chat`: the
loss is on the response tokens only), to write Grimm tales from a title and a summary
(``grimm_tales``), the next line of a Friends scene (``friends``: the generative task, scored by
held-out response loss and perplexity on unseen episodes), or whether a movie review is positive
or negative (``rotten_tomatoes_instruct``: the accuracy task, the label word the model finds most
likely after the prompt; :mod:`surm.harness.data.instruct`). Each method and seed is a run of the
run core (:class:`~surm.harness.runs.RunSpec`: the catalog's Llama profile, the LM head frozen)
kept in the run store, trained with the loop of every experiment (AdamW, linear warm-up and
decay, clipping at 1) at the method's default rate (:func:`surm.harness.methods.default_lr`), or,
with ``lr_factors``, at the rate chosen on validation from the same-size grid around it
(:func:`.selection.choose`; validation accuracy for the accuracy task, validation loss
otherwise), the other seeds at the chosen rate.

Methods: ``base`` (the model as it is: the zero-shot floor), method strings such as ``lora:8``
(PEFT LoRA on q and v), ``surm:circulant`` (parallel SURM on the seven projections of every
block) and ``surm:circulant:targets=qv``; ``matched_lora`` adds a LoRA on the seven projections
whose rank gives the parameter count nearest that SURM method's; ``ceiling`` (``full``) trains
full fine-tuning once (the first seed, its default rate).

Reported per data set: a table of every method over seeds (trainable parameters, the rate, test
and validation quality as mean ± std, s/step, peak memory), the paired differences SURM - LoRA
r=8 seed by seed, quality against trainable parameters (log scale), the run-by-run table with
the validation curve, the merge check (``merge_and_unload()``'s plain model against the adapter
model: max logit difference, same greedy generations) and greedy generations.

``run(config, out_dir, runner)`` writes ``llm.json``, ``llm.md`` and PNG plots.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from surm.harness import methods as surm_methods
from surm.harness.data import instruct
from surm.harness.models import catalog
from surm.harness.runs import Runner, RunRecord, RunSpec, load_splits

from . import plots, report, selection
from .presets import Preset, setting

BASE = "base"  # the method that trains nothing
#: The reference of the paired differences.
LORA_8 = "lora:8"


@dataclass(frozen=True)
class LlmPreset(Preset):
    """Settings of ``surm reproduce llm``."""

    model: Literal["smollm2", "tiny-llama"] = setting("smollm2", "smollm2 (SmolLM2-135M-Instruct) or tiny-llama")
    datasets: tuple[str, ...] = setting(
        ("grimm_tales",), "prompt -> response data sets: grimm_tales, friends, rotten_tomatoes_instruct or a file")
    methods: tuple[str, ...] = setting(
        (BASE, "lora:8", "surm:circulant", "surm:toeplitz"),
        "base (no training) or method strings (lora:8, surm:circulant, surm:circulant:targets=qv, ...)")
    matched_lora: str | None = setting(
        None, "a SURM method string: also train LoRA on the seven projections at the rank whose parameter "
              "count is nearest that method's (None: no)")
    ceiling: Literal["full"] | None = setting(None, "full: also full fine-tuning once (first seed, default rate)")
    steps: int = setting(24, "optimizer steps per run")
    batch_size: int = setting(4, "examples per step")
    max_length: int = setting(256, "tokens per example, prompt included (the response is cut)")
    n_train: int | None = setting(None, "keep this many training examples (None: all)")
    n_eval: dict[str, int] = setting({}, "data set -> cap on validation and test (a fixed random subset); "
                                         "missing: all")
    eval_points: int = setting(4, "validation evaluations during training, plus one before (0: none)")
    eval_batch_size: int = setting(4, "examples per evaluation batch")
    lr: float | None = setting(None, "one learning rate for every method (None: each method's default)")
    lr_factors: tuple[float, ...] | None = setting(
        None, "choose each method's rate on validation (first seed) from default * factor for each factor, e.g. "
              "(1/3, 1, 3); None: train at lr / the default")
    seeds: tuple[int, ...] = setting((0,), "seeds (adapter initialisation, data order, training subsample); "
                                           "each method trains once per seed")
    n_prompts: int = setting(2, "test prompts to generate from, before and after fine-tuning")
    max_new_tokens: int = setting(40, "tokens per greedy generation")
    dtype: Literal["float32", "bfloat16"] = setting("float32", "the base model's dtype (adapters stay float32)")
    threads: int | None = setting(1, "torch threads")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.methods:
            raise ValueError("methods: give at least one (base, or a method string)")
        if not self.datasets:
            raise ValueError("datasets: give at least one")
        for text in self.methods:
            if text != BASE:
                _adapter_method(text)
        if self.matched_lora is not None and surm_methods.parse(self.matched_lora).kind != "surm":
            raise ValueError(f"matched_lora: a SURM method string, got {self.matched_lora!r}")
        for name in ("steps", "batch_size", "max_length", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lr is not None and self.lr_factors is not None:
            raise ValueError("lr and lr_factors: give one (lr_factors chooses the rates on validation)")
        unknown = sorted(set(self.n_eval) - set(self.datasets))
        if unknown:
            raise ValueError(f"n_eval names {', '.join(unknown)}, which is not among datasets")


def _adapter_method(text: str) -> surm_methods.Method:
    method = surm_methods.parse(text)  # ValueError with the grammar
    if method.kind in ("head", "full", "bitfit", "base"):
        raise ValueError(f"methods: {method.name} is not an adapter method; llm compares adapters "
                         f"(base: no training; ceiling=full: full fine-tuning once)")
    return method


#: The comparison's methods: LoRA r=8 on q, v (its usual setup) and on every linear map; LoRA
#: r=1 on every map (about SURM Toeplitz's count there); SURM circulant and Toeplitz on q, v and
#: on every map (its default); PEFT's structured methods at SURM circulant's q, v count (34,560:
#: FourierFT 576 and VeRA 192 exactly, LoKr r=4 36,480; C3A's smallest block that divides k/v's
#: 192 outputs gives 69,120).
LLM_METHODS = (
    BASE, "lora:8", "lora:8:targets=all", "lora:1:targets=all", "surm:circulant:targets=qv",
    "surm:toeplitz:targets=qv", "surm:circulant", "surm:toeplitz", "c3a:192", "lokr:4", "fourierft:576", "vera:192",
)

PRESETS: dict[str, LlmPreset] = {
    "smoke": LlmPreset(name="smoke", model="tiny-llama", datasets=("grimm_tales", "rotten_tomatoes_instruct"),
                       methods=(BASE, "lora:2", "surm:circulant"), matched_lora="surm:circulant", steps=4,
                       batch_size=2, max_length=160, n_train=8,
                       n_eval={"grimm_tales": 3, "rotten_tomatoes_instruct": 6},
                       eval_points=2, n_prompts=1, max_new_tokens=5),
    "quick": LlmPreset(name="quick"),
    # the comparison: 200 steps of 8 examples, 3 seeds, two tasks; the learning-rate grid is trimmed
    # (each method's default rate) to fit a CPU, --set lr_factors='(1/3, 1, 3)' adds it (the x1 runs
    # are shared through the run store)
    "full": LlmPreset(name="full", datasets=("friends", "rotten_tomatoes_instruct"), methods=LLM_METHODS,
                      ceiling="full", steps=200, batch_size=8, max_length=512,
                      n_eval={"friends": 1100, "rotten_tomatoes_instruct": 1000}, eval_points=0, eval_batch_size=8,
                      seeds=(0, 1, 2)),
}
# quick: about 13 min of one core (24 steps of about 8 s CPU for each of 3 methods, evaluations and
# generations).


# --------------------------------------------------------------------------- runs


#: the report lists each method's seeds, so it can be made from the runs a store holds so far
#: (``surm reproduce llm --stored-only``)
REPORTS_PARTIAL_RUNS = True


def is_choice_task(dataset: str) -> bool:
    """Whether ``dataset`` is scored by accuracy (a labelled set asked as a question)."""
    return dataset in instruct.TASKS


def spec(config: LlmPreset, dataset: str, method: str, seed: int) -> RunSpec:
    """The run of ``method`` on ``dataset`` with ``seed`` under ``config`` (scored on validation and
    test, the curve at ``eval_points`` steps, generations and the merge check on ``n_prompts``
    prompts)."""
    return RunSpec(dataset=dataset, method=method, seed=seed, lr=config.lr, epochs=0.0, min_steps=config.steps,
                   batch_size=config.batch_size, n_train=config.n_train, n_eval=config.n_eval.get(dataset),
                   max_length=config.max_length, model=config.model, eval_splits=("validation", "test"),
                   eval_points=config.eval_points, eval_batch_size=config.eval_batch_size,
                   n_generate=config.n_prompts, max_new_tokens=config.max_new_tokens, dtype=config.dtype)


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


def trained_methods(config: LlmPreset) -> list[str]:
    """The methods that train, the matched LoRA included."""
    methods = [m for m in config.methods if m != BASE]
    if config.matched_lora is not None:
        rank, _ = matched_lora_rank(config.model, surm_methods.parse(config.matched_lora))
        methods.append(f"lora:{rank}:targets=all")
    return methods


def run(config: LlmPreset, out_dir: Path, runner: Runner) -> report.Outcome:
    """Fine-tune with every method of ``config`` on every data set; writes llm.json / .md / .png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    methods = trained_methods(config)
    first_only = ([BASE] if BASE in config.methods else []) + ([config.ceiling] if config.ceiling else [])
    grids: dict[str, list[dict[str, Any]]] = {}
    # the base model (it does not depend on the seed) and the ceiling once, first
    once = [spec(config, d, m, config.seeds[0]) for m in first_only for d in config.datasets]
    records, wall = runner.run_all(once, "llm base and ceiling", config.threads)
    if config.lr_factors is None:  # seed by seed: a part of the runs is a whole table of a seed
        specs = [spec(config, d, m, s) for s in config.seeds for d in config.datasets for m in methods]
        trained, trained_wall = runner.run_all(specs, "llm", config.threads)
        records, wall = records + trained, wall + trained_wall
    else:
        for dataset in config.datasets:
            settings = {(dataset, m): [spec(config, dataset, m, s) for s in config.seeds] for m in methods}
            score = selection.validation_accuracy if is_choice_task(dataset) else selection.validation_loss
            chosen = selection.choose(runner, settings, config.lr_factors, f"llm {dataset}", config.threads,
                                      score=score)
            records, wall = records + chosen.final, wall + chosen.wall_seconds
            grids[dataset] = _grid_rows(chosen, dataset)
    order = {m: i for i, m in enumerate([BASE, *methods, config.ceiling])}
    rows = [{"dataset": r.spec.dataset, "seed": r.spec.seed, **_row(r)} for r in records]
    group = {BASE: 0, config.ceiling: 2}  # the base model first, the ceiling last, the methods by seed between
    rows.sort(key=lambda r: (config.datasets.index(r["dataset"]), group.get(r["method"], 1), r["seed"],
                             order.get(r["method"], len(order))))
    settings = {k: v for k, v in config.to_dict().items() if k != "name"}
    summary = {d: summarize([r for r in rows if r["dataset"] == d], d) for d in config.datasets}
    payload = {"experiment": "llm", "preset": config.name, "config": settings, "wall_seconds": wall,
               "prompts": {d: _prompts(config, d) for d in config.datasets}, "summary": summary,
               "paired": {d: paired(rows, d) for d in config.datasets}, "lr_grids": grids, "rows": rows,
               "left_out": list(runner.left_out)}
    figures = [plot_quality(summary, out_dir / "llm_quality.png", config)]
    for dataset in config.datasets:
        first = [r for r in rows if r["dataset"] == dataset and r["seed"] == config.seeds[0]]
        if any(len(r["curve"]) > 1 for r in first):
            figures.append(plot_curves(first, out_dir / f"llm_{dataset}.png" if len(config.datasets) > 1
                                       else out_dir / "llm.png",
                                       f"{_title(config.model)} on {dataset}: validation loss"
                                       + (f" (seed {config.seeds[0]})" if len(config.seeds) > 1 else "")))
    return report.write(out_dir, "llm", payload, markdown(payload), figures)


def _grid_rows(chosen: selection.Selection, dataset: str) -> list[dict[str, Any]]:
    out = []
    for key, lr in chosen.chosen.items():
        runs = chosen.grid_runs(key)
        out.append({"method": key[1], "default": chosen.defaults[key], "chosen": lr,
                    "rates": [r.lr for r in runs], "validation": [_quality(r.validation, dataset) for r in runs]})
    return out


def _prompts(config: LlmPreset, dataset: str) -> list[str]:
    return list(load_splits(spec(config, dataset, "lora:1", config.seeds[0])).test.prompts[: config.n_prompts])


def _row(record: RunRecord) -> dict[str, Any]:
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


def where(method: surm_methods.Method | str) -> str:
    """Which projections of each block the method adapts, in words."""
    method = surm_methods.parse(method)
    targets = method.knob("targets")
    if method.kind == "base":
        return "-"
    if method.kind == "full":
        return "every weight"
    if method.kind == "surm" and method.placement == "serial":
        return "after o, down (serial)"
    if targets == "all" or (method.kind == "surm" and targets is None):
        return "q k v o gate up down"
    return "q v"


# --------------------------------------------------------------------------- summaries


def _quality(metrics: dict[str, float], dataset: str) -> float:
    """The task's score: accuracy for the accuracy task, loss (nats per response token) otherwise."""
    return metrics["accuracy"] if is_choice_task(dataset) else metrics["loss"]


def summarize(rows: list[dict[str, Any]], dataset: str) -> list[dict[str, Any]]:
    """One entry per method over its seeds: parameters, rate, test and validation quality
    (mean, sample std), test perplexity, s/step and peak memory growth (means)."""
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        trained = method != BASE
        entry = {"method": method, "label": mine[0]["label"], "where": mine[0]["where"],
                 "trainable_params": mine[0]["trainable_params"], "lr": mine[0]["lr"],
                 "seeds": [r["seed"] for r in mine],
                 "test": report.mean_std(_quality(r["test"], dataset) for r in mine),
                 "validation": report.mean_std(_quality(r["validation"], dataset) for r in mine),
                 "test_perplexity": report.mean_std(r["test"]["perplexity"] for r in mine)}
        if trained:
            entry.update(seconds_per_step=sum(r["seconds_per_step"] for r in mine) / len(mine),
                         peak_memory_growth_mb=sum(r["peak_memory_growth_mb"] for r in mine) / len(mine),
                         stored=sum(bool(r.get("stored")) for r in mine))
        out.append(entry)
    return out


def paired(rows: list[dict[str, Any]], dataset: str) -> list[dict[str, Any]]:
    """SURM - LoRA r=8 seed by seed on the test split (accuracy points, or loss in nats: below 0 is
    SURM better), for every SURM method with a LoRA r=8 run of the same seed."""
    lora = {r["seed"]: _quality(r["test"], dataset) for r in rows if r["dataset"] == dataset and r["method"] == LORA_8}
    out = []
    surms = [r["method"] for r in rows if r["dataset"] == dataset and r["method"].startswith("surm:")]
    for method in dict.fromkeys(surms):
        diffs = {r["seed"]: _quality(r["test"], dataset) - lora[r["seed"]] for r in rows
                 if r["dataset"] == dataset and r["method"] == method and r["seed"] in lora}
        if diffs:
            out.append({"method": method, "by_seed": diffs, "mean": report.mean_std(diffs.values())})
    return out


def markdown(payload: dict[str, Any]) -> str:
    """Per data set: the summary over seeds, the paired differences, the learning-rate grids, the
    runs, the merge check and the generations."""
    config = payload["config"]
    datasets = list(payload["summary"])
    rates = ("each method's rate chosen on validation (first seed) from default × "
             + ", ".join(f"{f:.3g}" for f in config["lr_factors"]) if config.get("lr_factors")
             else "one rate for every method" if config.get("lr") is not None else "each method at its default rate")
    lines = [
        f"# {_title(config['model'])}: fine-tuning on {', '.join(datasets)} ({payload['preset']} preset)", "",
        f"{config['steps']} optimizer steps of {config['batch_size']} examples per run, the same linear schedule "
        f"(6 % warm-up) for every method, {rates}; seeds {config['seeds']}; base model in {config['dtype']}. "
        f"Wall time {payload['wall_seconds'] / 60:.1f} min (runs read from the store count nothing).", "",
    ]
    if payload.get("left_out"):
        lines += [f"Not run yet, left out of every table ({len(payload['left_out'])}): "
                  + "; ".join(payload["left_out"]) + ".", ""]
    for dataset in datasets:
        lines += _dataset_section(payload, dataset)
    return "\n".join(lines)


def _metric_words(dataset: str) -> tuple[str, str]:
    return ("accuracy %", "points") if is_choice_task(dataset) else ("loss (nats/token)", "nats")


def _fmt_quality(pair: tuple[float, float], dataset: str, std: bool) -> str:
    mean, sd = pair
    if is_choice_task(dataset):
        return f"{100 * mean:.1f}" + (f" ± {100 * sd:.1f}" if std else "")
    return f"{mean:.4f}" + (f" ± {sd:.4f}" if std else "")


def _dataset_section(payload: dict[str, Any], dataset: str) -> list[str]:
    config, rows = payload["config"], [r for r in payload["rows"] if r["dataset"] == dataset]
    summary, seeds = payload["summary"][dataset], sorted({r["seed"] for r in rows})
    metric, unit = _metric_words(dataset)
    trained = [r for r in rows if r["method"] != BASE]
    first = trained[0] if trained else rows[0]
    std = len(seeds) > 1
    scored = ("accuracy of the label word the model finds most likely after the prompt (one forward pass; every "
              "label word is one token), and the response loss" if is_choice_task(dataset)
              else "mean cross-entropy per response token (nats); ppl = exp(loss)")
    lines = [f"## {dataset}", "",
             f"Validation {first['validation']['n']} examples ({first['validation']['tokens']} response tokens), "
             f"test {first['test']['n']} ({first['test']['tokens']}), held out; scored by {scored}. "
             f"Mean ± sample std over seeds {seeds}. s/step: wall time per optimizer step (evaluations left out); "
             f"memory: growth of the process's peak resident size while training.", ""]
    header = ["method", "where", "trainable params", "lr", f"test {metric}", f"val {metric}", "test ppl", "s/step",
              "memory (MiB)"]
    table = []
    for s in summary:
        trained_row = s["method"] != BASE
        table.append([s["label"] + (f" ({len(s['seeds'])} seed{'s' if len(s['seeds']) > 1 else ''})"
                                    if len(s["seeds"]) != len(seeds) else ""),
                      s["where"], f"{s['trainable_params']:,}", f"{s['lr']:g}" if trained_row else "-",
                      _fmt_quality(s["test"], dataset, std and len(s["seeds"]) > 1),
                      _fmt_quality(s["validation"], dataset, std and len(s["seeds"]) > 1),
                      f"{s['test_perplexity'][0]:.2f}", _seconds(s["seconds_per_step"]) if trained_row else "-",
                      f"{s['peak_memory_growth_mb']:.0f}" if trained_row else "-"])
    lines += [report.markdown_table(header, table), ""]
    pairs = payload["paired"][dataset]
    if pairs:
        scale = 100 if is_choice_task(dataset) else 1
        fmt = (lambda v: f"{scale * v:+.1f}") if is_choice_task(dataset) else (lambda v: f"{v:+.4f}")
        lines += [f"Paired differences on test, SURM − LoRA r=8 on q, v, seed by seed ({unit}; "
                  + ("above 0: SURM better):" if is_choice_task(dataset) else "below 0: SURM better):"), ""]
        lines.append(report.markdown_table(
            ["method", *[f"seed {s}" for s in seeds], "mean ± std"],
            [[p["method"], *[fmt(p["by_seed"][s]) if s in p["by_seed"] else "-" for s in seeds],
              fmt(p["mean"][0]) + (f" ± {scale * p['mean'][1]:.{1 if scale == 100 else 4}f}" if len(p["by_seed"]) > 1
                                   else "")] for p in pairs]))
        lines.append("")
    grids = payload["lr_grids"].get(dataset)
    if grids:
        lines += [f"Validation {metric} over each method's learning-rate grid (seed {seeds[0]}; the chosen rate in "
                  f"bold):", ""]
        lines.append(report.markdown_table(
            ["method", "default lr", *[f"× {f:.3g}" for f in config["lr_factors"]]],
            [[g["method"], f"{g['default']:g}",
              *[(f"**{_fmt_quality((v, 0), dataset, False)}**" if lr == g["chosen"] else _fmt_quality((v, 0), dataset,
                                                                                                     False))
                for lr, v in zip(g["rates"], g["validation"])]] for g in grids]))
        lines.append("")
    lines += _runs_section(rows, dataset, seeds)
    lines += _generations_section(rows, payload["prompts"].get(dataset, []), seeds)
    return lines


def _runs_section(rows: list[dict[str, Any]], dataset: str, seeds: list[int]) -> list[str]:
    header = ["method", "seed", "lr", "val loss", "test loss", "test ppl"]
    if is_choice_task(dataset):
        header += ["val acc %", "test acc %"]
    header += ["s/step", "CPU s/step", "memory (MiB)"]
    table = []
    for r in rows:
        trained = r["method"] != BASE
        cells = [r["label"], r["seed"], f"{r['lr']:g}" if trained else "-", f"{r['validation']['loss']:.4f}",
                 f"{r['test']['loss']:.4f}", f"{r['test']['perplexity']:.2f}"]
        if is_choice_task(dataset):
            cells += [f"{100 * r['validation']['accuracy']:.1f}", f"{100 * r['test']['accuracy']:.1f}"]
        cells += [_seconds(r["seconds_per_step"]) if trained else "-",
                  _seconds(r["cpu_seconds_per_step"]) if trained and "cpu_seconds_per_step" in r else "-",
                  f"{r['peak_memory_mb']:.0f} (+{r['peak_memory_growth_mb']:.0f})" if trained else "-"]
        table.append(cells)
    lines = ["### Every run", "", report.markdown_table(header, table), ""]
    diverged = [f"{r['label']} (seed {r['seed']})" for r in rows if r.get("diverged")]
    if diverged:
        lines += [f"Diverged (non-finite validation loss): {', '.join(diverged)}.", ""]
    merges = [r for r in rows if "merge" in r]
    if merges:
        lines += ["### Merge check", "",
                  "`merge_and_unload()` against the adapter model on a held-out batch: max |logit difference| "
                  "(largest |logit| for scale), and whether both give the same greedy generations.", ""]
        lines.append(report.markdown_table(
            ["method", "seed", "merged model", "max abs logit diff", "max abs logit", "same generations"],
            [[r["label"], r["seed"], r["merge"]["merged_type"], f"{r['merge']['max_abs_logit_diff']:.2e}",
              f"{r['merge']['max_abs_logit']:.1f}", "yes" if r["merge"]["same_generations"] else "no"]
             for r in merges]))
        lines.append("")
    return lines


def _generations_section(rows: list[dict[str, Any]], prompts: list[str], seeds: list[int]) -> list[str]:
    if not prompts:
        return []
    lines = ["### Greedy generations (test prompts)" + (f", seed {seeds[0]}" if len(seeds) > 1 else ""), "",
             "The base model's before fine-tuning; each method's from its merged model after.", ""]
    for i, prompt in enumerate(prompts):
        lines += [f"**Prompt {i + 1}:** {prompt}", ""]
        for r in rows:
            if r["seed"] == seeds[0] and i < len(r["generations"]):
                lines += [f"- *{r['label']}*: {r['generations'][i]!r}"]
        lines.append("")
    return lines


def plot_quality(summary: dict[str, list[dict[str, Any]]], path: Path, config: LlmPreset) -> Path:
    """Test quality (mean ± std over seeds) against trainable parameters (log scale), one panel
    per data set; the base model (the floor) a dotted line."""
    plt = plots.pyplot()
    fig, axes = plt.subplots(1, len(summary), figsize=(5.6 * len(summary), 4.4), squeeze=False)
    entries = [s for rows in summary.values() for s in rows if s["method"] != BASE]
    styles = plots.method_styles(dict.fromkeys(surm_methods.parse(s["method"]) for s in entries))
    for ax, (dataset, rows) in zip(axes[0], summary.items()):
        scale = 100 if is_choice_task(dataset) else 1
        for s in rows:
            mean, sd = s["test"]
            if s["method"] == BASE:
                ax.axhline(scale * mean, color="0.5", linestyle=":", label=s["label"])
                continue
            style = styles[surm_methods.parse(s["method"])]
            ax.errorbar(s["trainable_params"], scale * mean, yerr=scale * sd, color=style["color"],
                        marker=style["marker"], markersize=7, capsize=3, linestyle="none", mec="black", mew=0.5,
                        label=f"{s['label']} ({s['where']})")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (log scale)")
        ax.set_ylabel("test accuracy (%)" if is_choice_task(dataset) else "test loss (nats per response token)")
        ax.set_title(dataset, fontsize=10)
        ax.grid(alpha=0.3, which="both")
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:
        for h, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(h)
                labels.append(label)
    fig.legend(handles, labels, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.suptitle(f"{_title(config.model)}: test quality against trainable parameters ({config.name} preset)",
                 fontsize=10)
    fig.tight_layout()
    return plots.save(fig, path)


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
