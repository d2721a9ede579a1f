"""What produced a run: the recipe version in the run store's keys, and the version of the code
and libraries recorded with each run.

:data:`RECIPE` is what the store's keys carry: a number bumped by hand whenever a change to the
code alters what a run computes (the loop, a loader, a method's config, the data splits). So a
run store survives changes that do not (a restructuring, a new experiment, a faster kernel that
is exact), and stored records, committed to the repository as JSON, let a later session on
another machine go on with a long experiment instead of starting again. Each record also keeps
:func:`fingerprint`: the hash of the code that ran it and the library versions.

:func:`code_version` hashes the source of every module a training run executes (not the
command line, the benchmarks, the analysis or the experiments' tables and plots), so the run
store's keys change whenever that code changes and stay equal across machines and checkouts:
only ``*.py`` files count (never ``__pycache__`` or ``.pyc``), by their path relative to the
package and their text with ``\\r\\n`` read as ``\\n``.
"""

from __future__ import annotations

import functools
import hashlib
from importlib import metadata
from pathlib import Path

__all__ = ["LIBRARIES", "RECIPE", "code_version", "fingerprint", "git_commit", "key_version", "made_by",
           "run_sources"]

#: The recipe version: bump it when a change alters the result of any run (and say so in the
#: commit); every stored run is then trained again.
RECIPE = 1

#: The libraries whose versions are part of a run's fingerprint.
LIBRARIES = ("torch", "transformers", "peft")

#: Package paths whose code never changes a run's record (relative, POSIX, a folder ends in /).
PRESENTATION = ("__main__.py", "commands/", "bench/", "analysis/", "experiments/")


def run_sources(package_dir: Path | None = None) -> list[Path]:
    """The source files a run executes, sorted by their path relative to ``package_dir``
    (default: the installed ``surm`` package)."""
    root = Path(package_dir) if package_dir is not None else Path(__file__).resolve().parents[2]
    out = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).as_posix()
        if "__pycache__" in path.parts or any(part.startswith(".") for part in path.relative_to(root).parts):
            continue
        if rel.startswith(PRESENTATION):
            continue
        out.append(path)
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def code_version(package_dir: Path | None = None) -> str:
    """A 16-hex-digit hash of :func:`run_sources` (paths and text)."""
    if package_dir is None:
        return _installed_code_version()
    return _hash_sources(Path(package_dir))


@functools.lru_cache(maxsize=1)
def _installed_code_version() -> str:
    return _hash_sources(Path(__file__).resolve().parents[2])


def _hash_sources(root: Path) -> str:
    digest = hashlib.sha256()
    for path in run_sources(root):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes().replace(b"\r\n", b"\n") + b"\0")
    return digest.hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the checkout the package runs from (``<sha>``, ``<sha>+changes`` when its
    sources differ from it), or None outside a git checkout (an installed wheel)."""
    import subprocess

    root = Path(__file__).resolve().parents[4]
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        changed = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "src"], capture_output=True,
                                 text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}+changes" if changed else sha


def made_by() -> dict[str, str | None]:
    """What a report names as its maker: the surm version, the commit and the run code's hash."""
    from surm._version import __version__

    return {"surm": __version__, "commit": git_commit(), "code": code_version()}


def key_version() -> dict[str, int]:
    """What of the code the run store's keys depend on: ``{"recipe": RECIPE}``."""
    return {"recipe": RECIPE}


def fingerprint() -> dict[str, str]:
    """``{"code": code_version(), "torch": ..., "transformers": ..., "peft": ...}``."""
    return {"code": code_version(), **{name: _version(name) for name in LIBRARIES}}


@functools.cache
def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"
