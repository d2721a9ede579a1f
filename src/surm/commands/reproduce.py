"""``surm reproduce EXPERIMENT``: run one of the paper's experiments, scaled to this machine.

Each experiment writes ``<name>.json``, ``<name>.md`` and PNG plots into ``--out`` (default
``outputs/<name>``) and prints its Markdown table. Training runs are kept in one run store,
``outputs/runs`` (``--store`` picks another), keyed by their settings and the code that ran
them, so ``cka`` and ``lowres`` reuse the ``nlp`` runs they share and a repeated command only
trains what is missing (``--fresh`` retrains).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from surm.commands.errors import UsageError

HELP = "run one of the paper's experiments (nlp, vision, lowres, cka, pinwheel, lr_sweep, plan, llm), scaled to a CPU"

EPILOG = """\
experiments:
  nlp       MiniLM on Rotten Tomatoes, election tweets, R8: full, head, BitFit, LoRA r=1/4/8,
            Houlsby/Pfeiffer adapters, SURM parallel (every family) and serial (Table 5 analog)
  vision    EfficientNet-Lite0 on MNIST-5k and digits, adapters on the 1x1 convolutions (Table 1 analog)
  lowres    1/5/10/25 % of Rotten Tomatoes: head, LoRA r=8, SURM circulant and Toeplitz
  cka       linear CKA and weight drift between full fine-tuning and LoRA / SURM (Table 8 analog)
  pinwheel  synthetic 2-D pinwheel: LoRA against SURM at equal parameters
  lr_sweep  the learning-rate sweep behind the per-method defaults (also --preset vision)
  plan      surm plan's configs against the best single family and LoRA at LoRA r=1's and r=8's budgets
  llm       SmolLM2-135M-Instruct on Grimm tales: LoRA against SURM on a causal LM (held-out
            perplexity, generations, the merge check)
  all       nlp, lowres, cka, vision and pinwheel, one after the other

presets: smoke (seconds, tests), quick (minutes, the default), full (the documented run,
docs/results.md; nlp takes about an hour). --show-preset lists an experiment's settings, with
their help, for --set.

examples:
  surm reproduce nlp
  surm reproduce nlp --preset full
  surm reproduce nlp --seeds 0 1 --set 'methods={"rotten_tomatoes": ["lora:8", "surm:ldr:rank=2"]}'
  surm reproduce pinwheel --set regime=pretrained --show-preset
"""

ALL = ("nlp", "lowres", "cka", "vision", "pinwheel")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``reproduce`` on an ``argparse`` subparsers object; sets ``func=run``."""
    from surm.experiments import names

    p = subparsers.add_parser("reproduce", help=HELP, description=HELP, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", choices=[*names(), "all"], help="which experiment")
    p.add_argument("--preset", default="quick", help="smoke, quick or full (lr_sweep also: vision); default: quick")
    p.add_argument("--quick", dest="preset", action="store_const", const="quick", help="same as --preset quick")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: outputs/EXPERIMENT; with 'all', the parent of each)")
    p.add_argument("--store", type=Path, default=None, help="run store (default: outputs/runs)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="the preset's seeds (same as --set seeds=...)")
    p.add_argument("--fresh", action="store_true", help="retrain runs found in the store")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="change a setting of the preset (VALUE: a Python literal or a word), repeatable")
    p.add_argument("--show-preset", action="store_true", help="print the settings (after --set) and exit")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="train N runs at once, each in its own process on one thread (default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--stored-only", action="store_true",
                   help="train nothing: the report of the runs the store holds, the others listed as left out "
                        "(llm only; for a comparison still running)")
    p.set_defaults(func=run)
    return p


def configs(args: argparse.Namespace) -> dict:
    """``{experiment name: (module, resolved preset)}``; UsageError on a bad preset or --set,
    before anything is trained."""
    from surm.experiments import load, presets

    sets = list(args.overrides)
    if args.seeds is not None:
        sets.append(f"seeds={tuple(args.seeds)!r}")
    out = {}
    for name in ALL if args.experiment == "all" else (args.experiment,):
        module = load(name)
        try:
            out[name] = (module, presets.resolve(name, module.PRESETS, args.preset, sets))
        except ValueError as err:
            raise UsageError(str(err)) from None
    return out


def run(args: argparse.Namespace) -> dict:
    """Run ``surm reproduce``; prints each experiment's table and returns ``{name: Outcome}``."""
    from surm.experiments import presets
    from surm.harness import outputs
    from surm.harness.runs import Runner, RunStore

    todo = configs(args)
    if args.show_preset:
        for name, (_, config) in todo.items():
            print(f"{name}: {presets.describe(config)}")
        return {}
    if args.jobs < 1:
        raise UsageError(f"--jobs must be at least 1, got {args.jobs}")
    partial_ok = all(getattr(module, "REPORTS_PARTIAL_RUNS", False) for module, _ in todo.values())
    if args.stored_only and (args.fresh or not partial_ok):
        raise UsageError("--stored-only: only for llm (whose report shows each method's seeds), and not with --fresh")
    runner = Runner(RunStore(args.store or outputs.RUN_STORE), fresh=args.fresh, progress=not args.quiet,
                    jobs=args.jobs, stored_only=args.stored_only)
    results = {}
    for name, (module, config) in todo.items():
        if args.experiment == "all":
            out = (args.out or outputs.OUTPUT_ROOT) / name
        else:
            out = args.out or outputs.default_dir(name)
        start = time.perf_counter()
        outcome = module.run(config, out, runner)
        print(outcome.markdown)
        print(f"[{name}, {config.name} preset: {(time.perf_counter() - start) / 60:.1f} min; outputs in {out}/]")
        results[name] = outcome
    return results

