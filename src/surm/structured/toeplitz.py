"""Toeplitz and symmetric Toeplitz matrices, products by circulant embedding.

Toeplitz ``T (m x n)``: ``T[i, j] = t[i - j]`` with ``i - j`` in ``[-(n-1), m-1]``, m+n-1
parameters, stored as ``weight[k + n - 1] = t[k]``.
Symmetric Toeplitz: ``T[i, j] = s[|i - j|]``, max(m, n) parameters (for m != n the matrix is
rectangular, so "symmetric" refers to the generator ``t[k] = t[-k]``).

Product: T is the top-left m x n corner of the circulant of length ``L >= m + n - 1`` (L
rounded up to a 2-3-5-smooth size) with first column ``[t_0..t_{m-1}, 0.., t_{-(n-1)}..t_{-1}]``.
"""

from __future__ import annotations

import torch
from torch import nn

from ._fft import cyclic_conv, fast_fft_size, fft_dtype
from .base import LinearStructuredMatrix, as_matrix


class Toeplitz(LinearStructuredMatrix):
    """General Toeplitz matrix (m x n), m+n-1 parameters. No knobs."""

    name = "toeplitz"

    def __init__(
        self,
        out_features: int,
        in_features: int,
        *,
        init: str = "zero",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(out_features, in_features, init=init)
        self.weight = nn.Parameter(torch.empty(self._num_coefficients(), dtype=dtype, device=device))
        self.reset_parameters()

    def _num_coefficients(self) -> int:
        return self.out_features + self.in_features - 1

    def coefficients(self) -> torch.Tensor:
        """t[k] for k = -(n-1) .. m-1, as a vector of length m+n-1 (index k + n - 1)."""
        return self.weight

    def layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        m, n = self.out_features, self.in_features
        index = torch.arange(m).unsqueeze(1) - torch.arange(n).unsqueeze(0) + (n - 1)
        return index, torch.ones(m, n)

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        m, n = self.out_features, self.in_features
        dtype = fft_dtype(x, self.weight)
        t = self.coefficients().to(dtype)
        size = fast_fft_size(m + n - 1)
        zeros = t.new_zeros(size - (m + n - 1))
        first_column = torch.cat([t[n - 1 :], zeros, t[: n - 1]])  # (size,)
        y = cyclic_conv(torch.fft.rfft(first_column), x.to(dtype), size)[..., :m]
        return y.to(x.dtype)

    @classmethod
    def project(cls, M: torch.Tensor) -> "Toeplitz":
        """Frobenius-optimal fit: each coefficient is the mean of its diagonal."""
        M = as_matrix(M, cls.name)
        return cls._fit_linear(M, cls(*M.shape, dtype=M.dtype, device=M.device))


class SymmetricToeplitz(Toeplitz):
    """Symmetric Toeplitz ``T[i, j] = s[|i - j|]``, max(m, n) parameters. No knobs."""

    name = "symmetric_toeplitz"

    def _num_coefficients(self) -> int:
        return max(self.out_features, self.in_features)

    def coefficients(self) -> torch.Tensor:
        m, n = self.out_features, self.in_features
        s = self.weight
        return torch.cat([s[1:n].flip(0), s[:m]])

    def layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        m, n = self.out_features, self.in_features
        index = (torch.arange(m).unsqueeze(1) - torch.arange(n).unsqueeze(0)).abs()
        return index, torch.ones(m, n)
