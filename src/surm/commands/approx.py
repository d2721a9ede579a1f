"""``surm approx``: the approximation study (paper Fig. 1 left) from the command line.

Every structured family approximates target matrices at matched parameter budgets; the
relative Frobenius errors go to a table on the terminal, ``approx.json`` and ``approx.png`` in
``--output-dir`` (default ``outputs/approx``). The study itself is
:mod:`surm.analysis.approximation`; this module only parses and prints.
"""

from __future__ import annotations

import argparse
import time

from surm.analysis import approximation_defaults as defaults
from surm.harness.outputs import default_dir

HELP = "approximation study: every family at matched parameter budgets (paper Fig. 1 left)"


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``approx`` on an ``argparse`` subparsers object; sets ``func=run``."""
    p = subparsers.add_parser(
        "approx",
        help=HELP,
        description=(
            "Approximate target matrices with every structured family at matched parameter "
            "budgets; report the relative Frobenius error ||M - P(M)||_F / ||M||_F (mean ± std "
            "over trials) as a table, a JSON file and a PNG plot."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--n", type=int, default=defaults.DEFAULT_SIZE, help="square targets of size n x n")
    p.add_argument("--shape", type=int, nargs=2, metavar=("M", "N"), help="rectangular targets M x N (overrides --n)")
    p.add_argument("--targets", nargs="+", default=list(defaults.DEFAULT_TARGETS),
                   help="psd, gaussian, lowrank_noise, near_toeplitz, near_circulant, near_kronecker")
    p.add_argument("--families", nargs="+", default=list(defaults.DEFAULT_FAMILIES), help="structured families to fit")
    p.add_argument("--budgets", type=float, nargs="+", default=list(defaults.DEFAULT_BUDGETS),
                   help="parameter budgets as multiples of max(M, N); each family takes its largest setting "
                        "within each")
    p.add_argument("--trials", type=int, default=defaults.DEFAULT_TRIALS, help="seeded target draws per target")
    p.add_argument("--seed", type=int, default=0, help="study seed")
    p.add_argument("--ldr-steps", type=int, default=defaults.DEFAULT_LDR_STEPS, help="L-BFGS iterations per LDR fit")
    p.add_argument("--noise", type=float, default=defaults.DEFAULT_NOISE,
                   help="relative noise of lowrank_noise and near_* targets")
    p.add_argument("--threads", type=int, default=1, help="torch threads (small matrices: 1 is fastest)")
    p.add_argument("--output-dir", "--out", dest="output_dir", default=str(default_dir("approx")),
                   help="output folder for approx.json and approx.png")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run the study the arguments describe; prints the table and writes the outputs."""
    from pathlib import Path

    from surm._version import __version__
    from surm.analysis import approximation as ap
    from surm.commands.errors import UsageError

    m, n = args.shape if args.shape else (args.n, args.n)
    try:
        ap.check_study(m, n, args.targets, args.families, args.trials)
    except ValueError as err:
        raise UsageError(err) from None
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
    out = Path(args.output_dir)
    print(f"\nrelative Frobenius error, {m} x {n} targets, {args.trials} trials (mean ± std)\n")
    print(ap.format_table(records))
    json_path = ap.save_json(records, out / "approx.json", config)
    print(f"\nwrote {json_path}")
    if not args.no_plot:
        title = f"relative Frobenius error, {m}x{n}, {args.trials} trials"
        print(f"wrote {ap.plot_records(records, out / 'approx.png', title=title)}")
    print(f"study time {config['wall_time_s']:.1f} s wall, {config['cpu_time_s']:.1f} s CPU")
    return 0
