"""The scale of a structured update: ``alpha`` times a per-layer factor that puts every
family and layer width on one learning rate.

Under Adam every trainable parameter moves by about the learning rate per step, whatever the
gradient's size, so the change of ``alpha * S`` per step is set by how many entries of S a
parameter reaches and how strongly: a step of +-lr on every parameter moves S by about
``lr * sqrt(m n E)`` in Frobenius norm, with ``E`` the family's
:meth:`~surm.structured.StructuredMatrix.update_energy` (1 for circulant, Toeplitz and their
kin, whose entries are each one parameter; ``terms`` for Kronecker and ``N r`` for LDR, whose
random factor starts at unit variance; ``r / n`` for low rank). ``scaling="width"`` multiplies
``alpha`` by

    1 / sqrt(max(m, n) * E)

so that a step moves ``alpha * S`` by about ``lr * sqrt(min(m, n))`` for every family, knob,
placement and layer shape: the size of the step of LoRA's ``B A`` at its usual settings, which
also grows with the square root of the width. A serial adapter's bias enters scaled alike
(``width``: ``s * beta``), so that it too moves the output by about ``lr * s`` per step.
``scaling="none"`` is ``alpha`` alone (adapters saved before the scale existed load with it).
"""

from __future__ import annotations

import math

from surm.structured import StructuredMatrix

SCALINGS = ("width", "none")


def update_scale(matrix: StructuredMatrix, scaling: str) -> float:
    """The factor that multiplies ``alpha`` for ``matrix`` (m x n) under ``scaling``."""
    if scaling == "none":
        return 1.0
    if scaling == "width":
        m, n = matrix.shape
        return 1.0 / math.sqrt(max(m, n) * matrix.update_energy())
    raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}")
