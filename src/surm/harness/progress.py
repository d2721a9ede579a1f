"""Progress bars that suit where they are written.

In a terminal a bar redraws in place (and an inner bar vanishes when done); anywhere else (a
log file, a pipe, CI) a bar redraws at most once a minute and keeps its final state, so a log
gets about one line per bar instead of one per step.
"""

from __future__ import annotations

import sys
from typing import Any


def to_terminal() -> bool:
    """Whether progress (stderr) goes to a terminal."""
    return sys.stderr.isatty()


def bar(total: int | None = None, desc: str = "", enabled: bool = True, *, inner: bool = False, **kwargs: Any):
    """A tqdm bar on stderr, or None when not ``enabled``. ``inner``: a bar inside another
    (a run inside an experiment) that clears itself in a terminal when done."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    terminal = to_terminal()
    options = {"leave": not (inner and terminal), "mininterval": 0.1 if terminal else 60.0, "dynamic_ncols": True}
    return tqdm(total=total, desc=desc, **{**options, **kwargs})


def note(message: str, enabled: bool = True) -> None:
    """One line of progress on stderr, off a terminal only (where an outer bar is not drawn)."""
    if enabled and not to_terminal():
        print(message, file=sys.stderr, flush=True)
