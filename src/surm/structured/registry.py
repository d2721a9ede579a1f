"""Name -> family lookup: ``make(name, out_features, in_features, **knobs)`` and ``names()``."""

from __future__ import annotations

import inspect
from typing import Any

from .base import StructuredMatrix
from .circulant import Circulant, SkewCirculant
from .kronecker import Kronecker
from .ldr import LDR
from .low_rank import LowRank
from .products import CirculantProduct, SkewCirculantProduct, ToeplitzProduct
from .toeplitz import SymmetricToeplitz, Toeplitz

_FAMILIES: dict[str, type[StructuredMatrix]] = {
    cls.name: cls
    for cls in (
        Circulant, SkewCirculant, Toeplitz, SymmetricToeplitz, Kronecker, LDR, LowRank,
        CirculantProduct, SkewCirculantProduct, ToeplitzProduct,
    )
}
_COMMON = {"init", "dtype", "device"}


def names() -> list[str]:
    """The registered family names."""
    return list(_FAMILIES)


def get(name: str) -> type[StructuredMatrix]:
    """The class of family ``name``; ValueError listing the known names otherwise."""
    try:
        return _FAMILIES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown structure {name!r}; known structures: {', '.join(_FAMILIES)}") from None


def knob_names(name: str) -> list[str]:
    """The knobs family ``name`` accepts (besides init, dtype and device)."""
    params = inspect.signature(get(name).__init__).parameters
    return [p for p, spec in params.items() if spec.kind is spec.KEYWORD_ONLY and p not in _COMMON]


def make(name: str, out_features: int, in_features: int, **knobs: Any) -> StructuredMatrix:
    """Build family ``name`` as an (out_features x in_features) matrix.

    Knobs: circulant / skew_circulant and circulant_product / skew_circulant_product
    ``block_size``; kronecker ``factors``, ``terms``;
    ldr ``rank``; low_rank ``rank``; all families ``init`` ("zero" or "random"), ``dtype``,
    ``device``. Unknown knobs raise a TypeError that lists the accepted ones.
    """
    cls = get(name)
    unknown = set(knobs) - set(knob_names(name)) - _COMMON
    if unknown:
        accepted = ", ".join(knob_names(name)) or "none"
        raise TypeError(
            f"{name} does not take the knob(s) {', '.join(sorted(unknown))}; "
            f"its knobs: {accepted} (and init, dtype, device for every family)"
        )
    return cls(out_features, in_features, **knobs)
