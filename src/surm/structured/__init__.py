"""The structured matrix families (pure math: no model, no PEFT, no files).

>>> from surm import structured
>>> S = structured.make("circulant", 1536, 384, block_size=128, init="random")
>>> y = S(x)                      # x (..., 384) -> (..., 1536), fast
>>> S.dense()                     # (1536, 384), the reference
>>> y = structured.fused_parallel_linear(x, W0, b0, S, scale)  # x W0^T + b0 + scale S x, fused
"""

from .base import INIT_MODES, LinearStructuredMatrix, StructuredMatrix
from .circulant import Circulant, SkewCirculant
from .fused import (
    MergeWorkspace,
    fused_parallel_linear,
    parallel_linear,
    plain_parallel_linear,
    prefer_fused,
    release_merge_workspaces,
)
from .kronecker import Kronecker, auto_factors
from .ldr import LDR
from .low_rank import LowRank
from .products import CirculantProduct, SkewCirculantProduct, ToeplitzProduct
from .registry import get, knob_names, make, names
from .toeplitz import SymmetricToeplitz, Toeplitz

__all__ = [
    "INIT_MODES",
    "LDR",
    "Circulant",
    "CirculantProduct",
    "Kronecker",
    "LinearStructuredMatrix",
    "LowRank",
    "MergeWorkspace",
    "SkewCirculant",
    "SkewCirculantProduct",
    "StructuredMatrix",
    "SymmetricToeplitz",
    "Toeplitz",
    "ToeplitzProduct",
    "auto_factors",
    "fused_parallel_linear",
    "get",
    "knob_names",
    "make",
    "names",
    "parallel_linear",
    "plain_parallel_linear",
    "prefer_fused",
    "release_merge_workspaces",
]
