"""Circulant and skew-circulant matrices, single (padded) or as a grid of square blocks.

An f-circulant ``Z_f(v)`` (b x b) has entries ``v[i-j]`` for i >= j and ``f * v[b+i-j]`` for
i < j: f = 1 is the circulant ``C(v)`` (first column v), f = -1 the skew-circulant.

Rectangular (m x n) matrices come in two layouts, chosen with ``block_size``:

- ``None``: one f-circulant of size N = max(m, n), of which the top-left m x n corner is
  used (x is zero-padded to N, the first m outputs are kept). N parameters.
- ``b``: a (m/b) x (n/b) grid of independent b x b f-circulant blocks (b must divide m and
  n), m*n/b parameters (the layout of PEFT's C3A).

Products cost O(n log n) per block row through rfft/irfft; the skew-circulant uses a
length-2b real FFT whose even bins are masked out (the negacyclic convolution).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from ._fft import fft_dtype, negacyclic_mask
from .base import LinearStructuredMatrix, as_matrix, check_positive_int


class _FCirculant(LinearStructuredMatrix):
    """Shared code of the f-circulant families. ``weight`` is (p, q, b): block (P, Q) is
    ``Z_f(weight[P, Q])``; with ``block_size=None``, p = q = 1 and b = max(m, n)."""

    f: ClassVar[int]

    def __init__(
        self,
        out_features: int,
        in_features: int,
        *,
        block_size: int | None = None,
        init: str = "zero",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(out_features, in_features, init=init)
        m, n = self.out_features, self.in_features
        if block_size is None:
            grid, b = (1, 1), max(m, n)
        else:
            b = check_positive_int(block_size, "block_size", self.name)
            if m % b or n % b:
                g = math.gcd(m, n)
                raise ValueError(
                    f"{self.name}: block_size={b} must divide both out_features={m} and "
                    f"in_features={n}. Use a common divisor (the largest is gcd = {g}), or "
                    f"block_size=None for one zero-padded {max(m, n)}x{max(m, n)} {self.name} matrix."
                )
            grid = (m // b, n // b)
        self.block_size = block_size
        self.block = b
        self.grid = grid
        self.weight = nn.Parameter(torch.empty(*grid, b, dtype=dtype, device=device))
        self.reset_parameters()

    def knobs(self) -> dict[str, Any]:
        return {"block_size": self.block_size}

    def layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        (p, q), b = self.grid, self.block
        i = torch.arange(b).unsqueeze(1)
        j = torch.arange(b).unsqueeze(0)
        diag = (i - j) % b  # (b, b): which coefficient sits at (i, j)
        wrap_sign = torch.where(i >= j, 1.0, float(self.f))  # (b, b)
        block_start = (torch.arange(p).unsqueeze(1) * q + torch.arange(q).unsqueeze(0)) * b  # (p, q)
        index = block_start[:, :, None, None] + diag  # (p, q, b, b)
        index = index.permute(0, 2, 1, 3).reshape(p * b, q * b)
        sign = wrap_sign.repeat(p, q)
        m, n = self.out_features, self.in_features
        return index[:m, :n], sign[:m, :n]

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        (p, q), b = self.grid, self.block
        m, n = self.out_features, self.in_features
        dtype = fft_dtype(x, self.weight)
        w = self.weight.to(dtype)
        xb = x.to(dtype)
        if q * b != n:  # block_size=None with n < N: pad x to N
            xb = nn.functional.pad(xb, (0, q * b - n))
        xb = xb.reshape(*x.shape[:-1], q, b)
        size = b if self.f == 1 else 2 * b
        x_f = torch.fft.rfft(xb, n=size)  # (..., q, F)
        w_f = torch.fft.rfft(w, n=size)  # (p, q, F)
        if self.f == -1:
            x_f = x_f * negacyclic_mask(b, x_f.device, dtype)
        if p == 1 and q == 1:
            y_f = x_f * w_f[0]  # (..., 1, F)
        else:
            y_f = torch.einsum("...qf,pqf->...pf", x_f, w_f)
        y = torch.fft.irfft(y_f, n=size)[..., :b]  # (..., p, b)
        y = y.reshape(*x.shape[:-1], p * b)[..., :m]
        return y.to(x.dtype)

    @classmethod
    def project(cls, M: torch.Tensor, *, block_size: int | None = None) -> "_FCirculant":
        """Frobenius-optimal fit: each coefficient is the (signed) mean of its wrapped diagonal."""
        M = as_matrix(M, cls.name)
        instance = cls(*M.shape, block_size=block_size, dtype=M.dtype, device=M.device)
        return cls._fit_linear(M, instance)


class Circulant(_FCirculant):
    """Circulant ``C(c)[i, j] = c[(i - j) mod b]`` (or a grid of them): see the module docstring.

    Params: max(m, n) (``block_size=None``) or m*n/b.
    """

    name = "circulant"
    f = 1


class SkewCirculant(_FCirculant):
    """Skew-circulant ``Z_-1(v)``: like the circulant, but wrapped entries (i < j) are negated.

    Params: max(m, n) (``block_size=None``) or m*n/b.
    """

    name = "skew_circulant"
    f = -1
