"""``surm reproduce EXPERIMENT``: run one of the paper's experiments, scaled to this machine.

Each experiment writes ``<name>.json``, ``<name>.md`` and PNG plots into ``--out`` (default
``outputs/<name>``) and prints its Markdown table. Training runs are kept in a shared store
(default ``outputs/runs``), so ``cka`` and ``lowres`` reuse the ``nlp`` runs they share and a
repeated command only trains what is missing (``--fresh`` retrains).
"""

from __future__ import annotations

import argparse
import ast
import time
from pathlib import Path

HELP = "run one of the paper's experiments (nlp, vision, lowres, cka, pinwheel, lr_sweep), scaled to a CPU"

EPILOG = """\
experiments:
  nlp       MiniLM on Rotten Tomatoes, election tweets, R8: full, head, BitFit, LoRA r=1/4/8,
            Houlsby/Pfeiffer adapters, SURM parallel (every family) and serial (Table 5 analog)
  vision    EfficientNet-Lite0 on MNIST-5k and digits, adapters on the 1x1 convolutions (Table 1 analog)
  lowres    1/5/10/25 % of Rotten Tomatoes: head, LoRA r=8, SURM circulant and Toeplitz
  cka       linear CKA and weight drift between full fine-tuning and LoRA / SURM (Table 8 analog)
  pinwheel  synthetic 2-D pinwheel: LoRA against SURM at equal parameters
  lr_sweep  the learning-rate sweep behind the per-method defaults
  all       nlp, lowres, cka, vision and pinwheel, one after the other

presets: smoke (seconds, tests), quick (minutes), full (the documented run, docs/results.md).

examples:
  surm reproduce nlp --preset quick
  surm reproduce nlp --set seeds=[0] --set 'methods={"rotten_tomatoes": ["lora:8", "surm:ldr:rank=2"]}'
"""

ALL = ("nlp", "lowres", "cka", "vision", "pinwheel")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``reproduce`` on an ``argparse`` subparsers object; sets ``func=run``."""
    from surm.experiments import names

    p = subparsers.add_parser("reproduce", help=HELP, description=HELP, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", choices=[*names(), "all"], help="which experiment")
    p.add_argument("--preset", choices=["smoke", "quick", "full"], default="full", help="size (default: full)")
    p.add_argument("--quick", dest="preset", action="store_const", const="quick", help="same as --preset quick")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: outputs/EXPERIMENT; with 'all', the parent of each)")
    p.add_argument("--store", type=Path, default=None, help="run store (default: OUT/../runs)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="override the preset's seeds")
    p.add_argument("--fresh", action="store_true", help="retrain runs found in the store")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a preset key (Python literal), repeatable")
    p.set_defaults(func=run)
    return p


def parse_overrides(items: list[str]) -> dict:
    """``["seeds=[0, 1]", "lr=3e-3"]`` -> ``{"seeds": [0, 1], "lr": 0.003}`` (strings stay strings)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"surm reproduce: --set expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def run(args: argparse.Namespace) -> dict:
    """Run ``surm reproduce``; prints each experiment's table and returns ``{name: result}``."""
    from surm.experiments import load

    overrides = parse_overrides(args.overrides)
    names = ALL if args.experiment == "all" else (args.experiment,)
    results = {}
    for name in names:
        if args.experiment == "all":
            out = (args.out or Path("outputs")) / name
        else:
            out = args.out or Path("outputs") / name
        kwargs = dict(overrides)
        if args.seeds is not None:
            kwargs["seeds"] = args.seeds
        if name != "pinwheel":
            if args.store is not None:
                kwargs["store"] = args.store
            if args.fresh:
                kwargs["fresh"] = True
        start = time.perf_counter()
        try:
            result = load(name).run(out, args.preset, **kwargs)
        except (TypeError, ValueError) as err:
            if not str(err).startswith(f"{name}:"):  # a bad preset or override: a one-line message
                raise
            raise SystemExit(f"surm reproduce {err}") from None
        elapsed = time.perf_counter() - start
        markdown = result.get("markdown") if isinstance(result, dict) else None
        md_file = out / f"{name}.md"
        if markdown is None and md_file.is_file():
            markdown = md_file.read_text()
        print(markdown or "")
        print(f"[{name}, {args.preset} preset: {elapsed / 60:.1f} min; outputs in {out}/]")
        results[name] = result
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="surm")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
