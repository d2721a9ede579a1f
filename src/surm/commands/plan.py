"""``surm plan``: choose each layer's structure and knob for a parameter budget.

Runs the planner (:mod:`surm.analysis.plan`) on a packaged model and a few training batches of a
packaged data set: one forward and backward pass per batch, then every candidate family and
knob of every target layer scored by the loss-gradient energy it captures, and the best
combination within the budget chosen exactly. Prints a per-layer table and writes
``adapter_config.json`` (a SurmConfig that ``surm finetune --adapter-config`` takes) and
``plan.json`` (every candidate's parameters and energy, the timings) into ``--output-dir``
(default ``outputs/plan``).

Every input is checked before the model's weights are loaded.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from surm.commands.errors import UsageError
from surm.harness.outputs import default_dir

HELP = "choose a structure and knob per layer for a parameter budget, from the loss gradient"

EPILOG = """\
budget (--budget): a parameter count (9216) or lora:R, the parameters of LoRA rank R on the
model's default LoRA targets (query and value for MiniLM: lora:1 = 9,216, lora:8 = 73,728).

structures (--structures): the families to choose from, default every family but ldr
(circulant skew_circulant toeplitz symmetric_toeplitz kronecker low_rank); ldr has no closed-form
projection, so naming it costs an L-BFGS fit per layer (6-18 s per FFN-sized layer on a CPU).

What it optimises: the first-order loss decrease a step restricted to each family can buy,
||P(G)||_F^2 for the layer's gradient G, summed over layers, with the adapters' parameters
within the budget (an exact multiple-choice knapsack). Cost: --batches forward+backward
passes plus the projections (a few seconds on MiniLM).

examples:
  surm plan --budget lora:1
  surm plan --data rotten_tomatoes --budget 20000 --batches 8 --structures circulant toeplitz low_rank
  surm finetune --data rotten_tomatoes --adapter-config outputs/plan/adapter_config.json
"""

DEFAULT_BUDGET = "lora:1"
_BUDGET = re.compile(r"(\d+)|lora:(\d+)", re.IGNORECASE)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``plan`` on an ``argparse`` subparsers object; sets ``func=run``."""
    p = subparsers.add_parser("plan", help=HELP, description=HELP, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_argument_group("what to plan")
    what.add_argument("--data", default="rotten_tomatoes",
                      help="data set the batches come from (default: rotten_tomatoes)")
    what.add_argument("--model",
                      help="minilm | tiny-bert (random, for tests) | efficientnet | a local transformers directory "
                           "(default: minilm for text, efficientnet for images)")
    what.add_argument("--budget", default=DEFAULT_BUDGET, metavar="N|lora:R",
                      help=f"parameters of all structured matrices together (default: {DEFAULT_BUDGET})")
    what.add_argument("--structures", nargs="+", metavar="NAME",
                      help="families to choose from (default: all but ldr)")
    what.add_argument("--target-modules", nargs="+", metavar="NAME",
                      help="layers to plan for: names, one regex or all-linear (the head left out); "
                           "default: the model type's defaults (query and value for MiniLM)")

    grad = p.add_argument_group("the gradient")
    grad.add_argument("--batches", type=int, default=4, metavar="N",
                      help="training batches the gradient is averaged over (default: 4)")
    grad.add_argument("--per-device-train-batch-size", "--batch-size", dest="per_device_train_batch_size", type=int,
                      default=16, metavar="N", help="examples per batch (default: 16, as surm finetune)")
    grad.add_argument("--max-seq-length", "--max-length", dest="max_seq_length", type=int, default=64, metavar="N",
                      help="max tokens per text (default: 64)")
    grad.add_argument("--image-size", type=int, default=64, metavar="PX", help="image side in pixels (default: 64)")
    grad.add_argument("--seed", type=int, default=0, help="which training examples, and the new head's init")
    grad.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    grad.add_argument("--threads", type=int, metavar="N",
                      help="torch threads (default: torch's; 1 is fastest on a busy machine)")

    out = p.add_argument_group("output")
    out.add_argument("--output-dir", "--out", dest="output_dir", type=Path, metavar="DIR",
                     help="folder for adapter_config.json and plan.json (default: outputs/plan)")
    out.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    return p


# --------------------------------------------------------------------------- checking the input


def parse_budget(text: str) -> int | str:
    """``"9216"`` -> 9216; ``"lora:8"`` -> ``"lora:8"`` (resolved on the model); UsageError otherwise."""
    match = _BUDGET.fullmatch(text.strip())
    if match is None or (match.group(2) is not None and int(match.group(2)) < 1):
        raise UsageError(f"--budget must be a parameter count (e.g. 9216) or lora:R with R >= 1 (e.g. lora:8), "
                         f"got {text!r}")
    return int(match.group(1)) if match.group(1) is not None else f"lora:{int(match.group(2))}"


def check_args(args: argparse.Namespace):
    """``(spec, budget, structures, targets)``, or UsageError, found without loading weights:
    the data set, model, budget, structures and that the targets exist in the model's skeleton."""
    from surm import structured
    from surm.analysis.plan import target_layers
    from surm.harness.runs import RunSpec

    budget = parse_budget(args.budget)
    sizes = (("--batches", args.batches), ("--per-device-train-batch-size", args.per_device_train_batch_size))
    if args.threads is not None:
        sizes += (("--threads", args.threads),)
    for flag, value in sizes:
        if value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    for name in args.structures or ():
        try:
            structured.get(name)
        except ValueError as err:
            raise UsageError(f"--structures: {err}") from None
    try:
        spec = RunSpec(dataset=args.data, method="surm:circulant", seed=args.seed, model=args.model,
                       max_length=args.max_seq_length, image_size=args.image_size, device=args.device)
        if spec.modality == "causal_lm":
            raise ValueError(f"surm plan takes labelled data; {args.data} is prompt -> response pairs")
        skeleton = spec.model_entry.skeleton()
    except ValueError as err:
        raise UsageError(err) from None
    targets = _targets(args.target_modules, spec)
    try:
        target_layers(skeleton, targets, _exclude(targets, spec))
    except (ValueError, TypeError) as err:
        raise UsageError(f"--target-modules on {spec.model}: {err}") from None
    return spec, budget, args.structures, targets


def _targets(given: list[str] | None, spec):
    """``--target-modules`` as SurmConfig takes it: None (the defaults), a name list, or one
    string (a regex, or all-linear)."""
    if given is None:
        return spec.profile.parallel
    if len(given) == 1 and (given[0] == "all-linear" or not re.fullmatch(r"[\w.]+", given[0])):
        return given[0]
    return list(given)


def _exclude(targets, spec):
    """With all-linear, the classification head (it is trained in full) is no target."""
    return [spec.profile.head] if targets == "all-linear" and spec.profile.head else None


# --------------------------------------------------------------------------- running


def run(args: argparse.Namespace) -> dict:
    """Run ``surm plan``; prints the table and returns the plan (as JSON)."""
    spec, budget, structures, targets = check_args(args)

    import dataclasses
    import time

    import torch

    from surm.analysis.plan import lora_budget, make_plan
    from surm.harness.runs import planning_batches
    from surm.harness.threads import torch_threads

    threads = args.threads or torch.get_num_threads()
    with torch_threads(threads):
        start = time.perf_counter()
        model, batches, loss_fn = planning_batches(spec, args.batches, args.per_device_train_batch_size)
        loaded = time.perf_counter()
        if isinstance(budget, str) and spec.modality == "image":  # no model type: LoRA at the harness's positions
            budget = lora_budget(model, int(budget.split(":")[1]), spec.profile.lora)
        result = make_plan(model, batches, budget, target_modules=targets, exclude_modules=_exclude(targets, spec),
                           structures=structures, loss_fn=loss_fn, progress=not args.quiet)
    config = result.config
    if spec.profile.head is not None:
        config = dataclasses.replace(config, modules_to_save=[spec.profile.head])

    out = args.output_dir or default_dir("plan")
    out.mkdir(parents=True, exist_ok=True)
    config_file = out / "adapter_config.json"
    config_file.write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True, default=_jsonable) + "\n")
    record = {
        "data": spec.dataset, "model": spec.model, "budget": args.budget,
        "batch_size": args.per_device_train_batch_size, "max_seq_length": spec.max_length, "seed": spec.seed,
        "threads": threads, "load_seconds": loaded - start, **result.to_json(),
    }
    (out / "plan.json").write_text(json.dumps(record, indent=1, default=_jsonable) + "\n")
    print(summary(result, spec, args, config_file))
    return record


def _jsonable(value):
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def summary(result, spec, args: argparse.Namespace, config_file: Path) -> str:
    """The table, the totals, the cost, and how to train with the config."""
    from collections import Counter

    chosen = Counter(layer.choice.structure for layer in result.layers if layer.choice is not None)
    families = ", ".join(f"{name} x{count}" for name, count in chosen.most_common())
    seconds = result.seconds
    model_flag = f" --model {spec.model}" if args.model else ""
    return "\n".join([
        f"plan for {spec.model} on {spec.dataset}: budget {result.budget:,} parameters ({args.budget}), "
        f"gradient over {result.batches} batches of {args.per_device_train_batch_size}",
        "",
        result.table(),
        "",
        f"chosen: {families}; {result.params:,} parameters",
        f"planner time {seconds['total']:.1f} s (gradients {seconds['gradients']:.1f} s, scores "
        f"{seconds['scores']:.1f} s, knapsack {seconds['knapsack']:.2f} s)",
        f"config: {config_file}",
        f"train it: surm finetune --data {spec.dataset}{model_flag} --adapter-config {config_file}",
    ])
