"""Files of a save folder that surm writes whole or not at all, and the leftovers of a crash.

``adapter_config.json`` and the model card are written under a temporary name beside their
place and renamed onto it (``os.replace``, atomic on one file system): a save killed halfway
leaves the previous file intact, plus a temporary. A temporary's name says who wrote it,
``.surm-tmp-<pid>-<8 hex digits>-<name>``; the next save or load in that folder removes the
ones whose process is gone (:func:`remove_orphans`). The weights file is written by PEFT, in
place; a save killed while writing it leaves a truncated file, which loading refuses by name.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PREFIX = ".surm-tmp-"
_TEMPORARY = re.compile(rf"^{re.escape(PREFIX)}(?P<pid>\d+)-[0-9a-f]{{8}}-.+$")


def temporary_beside(target: Path) -> Path:
    """A fresh temporary name in ``target``'s folder, marked with this process's id."""
    return target.parent / f"{PREFIX}{os.getpid()}-{secrets.token_hex(4)}-{target.name}"


@contextmanager
def replaced_atomically(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write ``target``'s new content to (a file, or a folder holding
    a file called ``target.name``); when the block ends it is renamed onto ``target``, or, on an
    error, removed, and ``target`` is as it was."""
    target = Path(target)
    temporary = temporary_beside(target)
    try:
        yield temporary
        written = temporary / target.name if temporary.is_dir() else temporary
        os.replace(written, target)
    finally:
        _remove(temporary)


def remove_orphans(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporaries surm left in ``folder`` (names as :func:`temporary_beside` makes
    them) whose writing process no longer runs on this machine; returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in folder.iterdir():
        match = _TEMPORARY.match(entry.name)
        if match and not _running(int(match["pid"])):
            _remove(entry)
            removed.append(entry)
    return removed


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True  # a save of this process in progress (its own failures clean up after themselves)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    except OverflowError:
        return False  # no process has such an id
    return True


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        pass
    except OSError as err:
        warnings.warn(f"surm: could not remove the temporary {path}: {err}", stacklevel=3)
