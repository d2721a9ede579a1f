"""What produced a run: a version of the code that runs it and of the libraries it runs on.

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

__all__ = ["LIBRARIES", "code_version", "fingerprint", "run_sources"]

#: The libraries whose versions are part of a run's fingerprint.
LIBRARIES = ("torch", "transformers", "peft")

#: Package paths whose code never changes a run's record (relative, POSIX, a folder ends in /).
PRESENTATION = ("__main__.py", "commands/", "bench/", "analysis/", "experiments/")
#: ...but in ``experiments/`` these run the training.
RUN_MODULES = ("experiments/provenance.py", "experiments/runs.py")


def run_sources(package_dir: Path | None = None) -> list[Path]:
    """The source files a run executes, sorted by their path relative to ``package_dir``
    (default: the installed ``surm`` package)."""
    root = Path(package_dir) if package_dir is not None else Path(__file__).resolve().parents[1]
    out = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).as_posix()
        if "__pycache__" in path.parts or any(part.startswith(".") for part in path.relative_to(root).parts):
            continue
        if rel.startswith(PRESENTATION) and rel not in RUN_MODULES:
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
    return _hash_sources(Path(__file__).resolve().parents[1])


def _hash_sources(root: Path) -> str:
    digest = hashlib.sha256()
    for path in run_sources(root):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes().replace(b"\r\n", b"\n") + b"\0")
    return digest.hexdigest()[:16]


def fingerprint() -> dict[str, str]:
    """``{"code": code_version(), "torch": ..., "transformers": ..., "peft": ...}``."""
    return {"code": code_version(), **{name: _version(name) for name in LIBRARIES}}


@functools.lru_cache(maxsize=None)
def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"
