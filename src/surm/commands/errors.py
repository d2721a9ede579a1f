"""The one error convention of the ``surm`` command line."""

from __future__ import annotations


class UsageError(ValueError):
    """Bad input from the command line (an unknown data set, a bad method string, an unknown
    bench method, a bad ``--set``): the dispatcher prints it as one line on stderr,
    ``surm CMD: error: MESSAGE``, and exits with status 2, without a traceback. Raise it before
    any model is loaded."""
