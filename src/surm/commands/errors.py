"""The one error convention of the ``surm`` command line."""

from __future__ import annotations

import argparse
from typing import NoReturn


class UsageError(ValueError):
    """Bad input from the command line (an unknown data set, a bad method string, an unknown
    bench method, a bad ``--set``): the dispatcher prints it as one line on stderr,
    ``surm CMD: error: MESSAGE``, and exits with status 2, without a traceback. Raise it before
    any model is loaded."""


def error_line(prog: str, message: object) -> str:
    """``PROG: error: MESSAGE`` on one line (the message's line breaks become spaces)."""
    return f"{prog}: error: {' '.join(str(message).split())}"


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose own errors (an unknown choice, a missing argument)
    follow the convention too: one line on stderr, :func:`error_line`, exit status 2. Its
    subparsers are of this class as well."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, error_line(self.prog, message) + "\n")
