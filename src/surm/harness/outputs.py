"""Where the commands write: one output root, ``outputs/`` under the working directory.

``outputs/<name>`` per command or experiment (``outputs/approx``, ``outputs/nlp``,
``outputs/finetune/<run>``, ``outputs/bench``) and one run store, ``outputs/runs``, shared by
every experiment whatever its ``--out``.
"""

from __future__ import annotations

from pathlib import Path

OUTPUT_ROOT = Path("outputs")
RUN_STORE = OUTPUT_ROOT / "runs"


def default_dir(name: str) -> Path:
    """``outputs/<name>``: the default output folder of a command or experiment."""
    return OUTPUT_ROOT / name
