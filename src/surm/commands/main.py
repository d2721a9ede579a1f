"""The ``surm`` command line: ``surm <command> ...``, also ``python -m surm``.

Each command is one module of :mod:`surm.commands` with ``add_parser(subparsers)``, which
declares its arguments and sets ``func=run``, and ``run(args)``, which does the work and
returns an exit status (an int) or a result record (meaning 0). A module imports nothing
heavy at module level or in ``add_parser``: torch, PEFT and transformers are imported inside
``run``, so ``surm --help`` is instant.

Errors follow one convention: a usage error is one line on stderr, ``surm CMD: error: ...``,
with exit status 2 and no traceback; ``run`` raises :class:`~surm.commands.errors.UsageError`
for it, before any model is loaded.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from surm._version import __version__
from surm.commands import approx, bench, finetune, plan, reproduce
from surm.commands.errors import ArgumentParser, UsageError, error_line

COMMANDS = (approx, finetune, plan, reproduce, bench)


def build_parser() -> ArgumentParser:
    """The ``surm`` parser with every command of :data:`COMMANDS`."""
    parser = ArgumentParser(
        prog="surm",
        description="Structured unrestricted-rank matrices (SURM) for parameter-efficient fine-tuning.",
    )
    parser.add_argument("--version", action="version", version=f"surm {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="<command>", title="commands")
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``surm`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        status = args.func(args)
    except UsageError as err:
        print(error_line(f"surm {args.command}", err), file=sys.stderr)
        return 2
    return status if isinstance(status, int) else 0


if __name__ == "__main__":
    sys.exit(main())
