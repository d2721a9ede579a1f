"""scripts/param_table.py: the README's parameter-count table (meta device, shapes only)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from surm.harness import methods
from surm.harness.models import catalog

TEXT = catalog.CATALOG["minilm"].profile  # MiniLM's (BERT) profile


_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "param_table.py"


@pytest.fixture(scope="module")
def param_table():
    spec = importlib.util.spec_from_file_location("param_table", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_row_is_a_method_string(param_table):
    for method, _, _ in param_table.ROWS:
        methods.parse(method)
    assert param_table.REFERENCE in [m for m, _, _ in param_table.ROWS]


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("surm:circulant", 27_648),  # every map: 6 x (4 x 384 + 2 x 1536)
        ("surm:toeplitz", 41_436),  # 6 x (4 x 767 + 2 x 1919)
        ("surm:circulant:targets=qv", 4_608),
        ("lora:8", 73_728),  # 6 x 2 x 8 x (384 + 384)
        ("lora:1:targets=all", 41_472),
    ],
)
def test_counts_the_readme_quotes(param_table, method, expected):
    assert param_table.count(method) == expected
