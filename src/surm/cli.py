"""The ``surm`` command line: ``surm <subcommand> ...`` (also ``python -m surm``).

Two ways to add a subcommand, both keeping ``surm --help`` light (heavy imports happen only
when the subcommand runs):

- here: ``_add_<name>(subparsers)`` declares its arguments and sets ``func=_run_<name>``;
  ``_run_<name>(args)`` imports its module *inside* the function and does the work. Append the
  ``_add_`` function to :data:`SUBCOMMANDS`.
- in its own module (``surm.commands.<name>``): ``add_parser(subparsers)`` sets ``func=run``
  and imports nothing heavy at module level; list the module in :data:`COMMAND_MODULES`.

A ``func`` returns an exit status (int) or anything else (a result record), which means 0.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from typing import Callable, Sequence

from surm import __version__

# The defaults of ``surm approx``, written out here so that building the parser does not
# import torch; tests/test_cli.py holds them equal to surm.analysis.approximation's.
APPROX_DEFAULTS = {
    "size": 64,
    "targets": ("psd", "gaussian", "lowrank_noise", "near_toeplitz"),
    "families": ("low_rank", "kronecker", "circulant", "skew_circulant", "symmetric_toeplitz", "toeplitz", "ldr"),
    "budgets": (1.0, 2.0, 4.0, 8.0, 16.0),
    "trials": 10,
    "ldr_steps": 200,
    "noise": 0.1,
}


# ---------------------------------------------------------------------------------------
# surm approx
# ---------------------------------------------------------------------------------------


def _add_approx(sub: argparse._SubParsersAction) -> None:
    d = APPROX_DEFAULTS
    p = sub.add_parser(
        "approx",
        help="approximation study: every family at matched parameter budgets (paper Fig. 1 left)",
        description=(
            "Approximate target matrices with every structured family at matched parameter "
            "budgets; report the relative Frobenius error ||M - P(M)||_F / ||M||_F (mean ± std "
            "over trials) as a table, a JSON file and a PNG plot."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--n", type=int, default=d["size"], help="square targets of size n x n")
    p.add_argument("--shape", type=int, nargs=2, metavar=("M", "N"), help="rectangular targets M x N (overrides --n)")
    p.add_argument("--targets", nargs="+", default=list(d["targets"]),
                   help="psd, gaussian, lowrank_noise, near_toeplitz, near_circulant, near_kronecker")
    p.add_argument("--families", nargs="+", default=list(d["families"]), help="structured families to fit")
    p.add_argument("--budgets", type=float, nargs="+", default=list(d["budgets"]),
                   help="parameter budgets as multiples of max(M, N); each family takes its largest setting within each")
    p.add_argument("--trials", type=int, default=d["trials"], help="seeded target draws per target")
    p.add_argument("--seed", type=int, default=0, help="study seed")
    p.add_argument("--ldr-steps", type=int, default=d["ldr_steps"], help="L-BFGS iterations per LDR fit")
    p.add_argument("--noise", type=float, default=d["noise"], help="relative noise of lowrank_noise and near_* targets")
    p.add_argument("--threads", type=int, default=1, help="torch threads (small matrices: 1 is fastest)")
    p.add_argument("--out", default="runs/approx", help="output folder for approx.json and approx.png")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_approx)


def _run_approx(args: argparse.Namespace) -> int:
    from pathlib import Path

    from surm.analysis import approximation as ap

    m, n = args.shape if args.shape else (args.n, args.n)
    try:
        ap.check_study(m, n, args.targets, args.families, args.trials)
    except ValueError as exc:
        print(f"surm approx: error: {exc}", file=sys.stderr)
        return 2
    budgets = ap.budgets_from_multiples(args.budgets, m, n)
    config = {
        "shape": [m, n],
        "targets": args.targets,
        "families": args.families,
        "budget_multiples": args.budgets,
        "budgets": budgets,
        "trials": args.trials,
        "seed": args.seed,
        "ldr_steps": args.ldr_steps,
        "noise": args.noise,
        "threads": args.threads,
        "version": __version__,
    }
    start, cpu_start = time.perf_counter(), time.process_time()
    records = ap.run_study(
        m, n,
        targets=args.targets,
        families=args.families,
        budgets=budgets,
        trials=args.trials,
        seed=args.seed,
        ldr_steps=args.ldr_steps,
        noise=args.noise,
        threads=args.threads,
        progress=not args.quiet,
    )
    config["wall_time_s"] = round(time.perf_counter() - start, 2)
    config["cpu_time_s"] = round(time.process_time() - cpu_start, 2)
    out = Path(args.out)
    print(f"\nrelative Frobenius error, {m} x {n} targets, {args.trials} trials (mean ± std)\n")
    print(ap.format_table(records))
    json_path = ap.save_json(records, out / "approx.json", config)
    print(f"\nwrote {json_path}")
    if not args.no_plot:
        title = f"relative Frobenius error, {m}x{n}, {args.trials} trials"
        print(f"wrote {ap.plot_records(records, out / 'approx.png', title=title)}")
    print(f"study time {config['wall_time_s']:.1f} s wall, {config['cpu_time_s']:.1f} s CPU")
    return 0


# ---------------------------------------------------------------------------------------
# the parser
# ---------------------------------------------------------------------------------------

SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_approx]

#: subcommands living in their own modules, each with ``add_parser(subparsers)``; a module
#: that does not exist (yet) is skipped
COMMAND_MODULES: list[str] = ["surm.commands.finetune", "surm.commands.reproduce", "surm.commands.bench"]


def _add_module_commands(sub: argparse._SubParsersAction) -> None:
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and name.startswith(exc.name):  # the module itself is absent
                continue
            raise
        module.add_parser(sub)


def build_parser() -> argparse.ArgumentParser:
    """The ``surm`` parser with every subcommand of :data:`SUBCOMMANDS` and :data:`COMMAND_MODULES`."""
    parser = argparse.ArgumentParser(
        prog="surm",
        description="Structured unrestricted-rank matrices (SURM) for parameter-efficient fine-tuning.",
    )
    parser.add_argument("--version", action="version", version=f"surm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for add in SUBCOMMANDS:
        add(sub)
    _add_module_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``surm`` with ``argv`` (default: sys.argv[1:]); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    status = args.func(args)
    return status if isinstance(status, int) else 0


if __name__ == "__main__":
    sys.exit(main())
