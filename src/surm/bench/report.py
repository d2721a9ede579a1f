"""What every benchmark reports alongside its numbers: the machine, Markdown tables, JSON files."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

#: A table column: (title, record key or a function of the record, format spec; "" = text).
Column = tuple[str, str | Callable[[dict[str, Any]], Any], str]


def machine() -> dict[str, Any]:
    """What the numbers were measured on, and how loaded it was."""
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "loadavg": list(os.getloadavg()),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": "cpu",
        "code": code_version(),
    }
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
    return info


def code_version() -> str:
    """surm's version, with ``git describe --always --dirty`` of its checkout when it runs from
    one (the families change; say which code ran)."""
    from surm._version import __version__

    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                             timeout=10, cwd=Path(__file__).parent)
        described = out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        described = ""
    return f"{__version__} ({described})" if described else __version__


def markdown_table(records: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
    """A Markdown table, one row per record; numeric columns right-aligned."""
    head = "| " + " | ".join(title for title, _, _ in columns) + " |"
    rule = "|" + "|".join("---:" if fmt else "---" for _, _, fmt in columns) + "|"
    rows = []
    for record in records:
        cells = []
        for _, key, fmt in columns:
            value = key(record) if callable(key) else record.get(key)
            cells.append(format(value, fmt) if fmt and isinstance(value, (int, float)) else str(value))
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, rule, *rows])


def write_json(path: Path, data: dict[str, Any]) -> Path:
    """Write ``data`` to ``path`` (folders created) and say so."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    print(f"\nwrote {path}")
    return path
