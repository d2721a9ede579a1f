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

from ._fft import (
    add_toeplitz_,
    cross_correlation,
    cyclic_conv,
    diagonal_sums,
    fast_fft_size,
    fft_cost,
    fft_dtype,
    matmul_cost,
    toeplitz_from_lags,
)
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

    # -- fused-layer support ------------------------------------------------------------
    def _fold(self, grad_t: torch.Tensor) -> torch.Tensor:
        """Gradient w.r.t. ``weight`` from the gradient w.r.t. ``coefficients()``."""
        return grad_t

    def _dense_for_merge(self, dtype: torch.dtype) -> torch.Tensor:
        return toeplitz_from_lags(self.coefficients().to(dtype), self.out_features, self.in_features)

    def _merge_into(self, out: torch.Tensor, weight: torch.Tensor, scale: float) -> torch.Tensor:
        return add_toeplitz_(out, weight, self.coefficients().to(out.dtype), scale)

    def adjoint_method(self, tokens: int, device: torch.device | str = "cpu") -> str:
        """``"fft"`` or ``"matmul"``, the cheaper route of :meth:`param_grads` (CPU cost model
        of :mod:`surm.structured._fft`; on other devices, unmeasured, ``"matmul"``). On the project's CPU the
        FFT route wins from about 768 x 768 up; at 384 x 384 the 768-point transforms lose to
        one 384 x T x 384 matmul."""
        m, n = self.out_features, self.in_features
        if torch.device(device).type != "cpu":
            return "matmul"
        return "fft" if fft_cost(fast_fft_size(m + n - 1), 2) < matmul_cost(m * n) else "matmul"

    def param_grads(self, x: torch.Tensor, g: torch.Tensor, *, method: str = "auto") -> tuple[torch.Tensor, ...]:
        """Adjoint: correlation on the circulant embedding of length L >= m+n-1,
        ``r = irfft(sum_t rfft(g_t, L) * conj(rfft(x_t, L)))``, whose lags -(n-1)..m-1 are the
        coefficient gradients (the symmetric family folds lags k and -k). ``method="matmul"``
        sums the diagonals of ``G = g^T x`` instead; ``"auto"`` picks (:meth:`adjoint_method`)."""
        x2, g2 = self._flatten_tokens(x, g)
        m, n = self.out_features, self.in_features
        method = self._adjoint_route(method, x2)
        dtype = fft_dtype(x2, g2, self.weight)
        if method == "matmul":
            grad_t = diagonal_sums(g2.to(dtype).T @ x2.to(dtype))
        else:
            size = fast_fft_size(m + n - 1)
            r = cross_correlation(x2, g2, size, dtype)
            grad_t = torch.cat([r[size - n + 1 :], r[:m]])
        return (self._fold(grad_t).to(self.weight.dtype),)

    @classmethod
    def project(cls, M: torch.Tensor) -> Toeplitz:
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

    def _fold(self, grad_t: torch.Tensor) -> torch.Tensor:
        m, n = self.out_features, self.in_features
        grad = grad_t.new_zeros(max(m, n))
        grad[:m] += grad_t[n - 1 :]
        grad[1:n] += grad_t[: n - 1].flip(0)
        return grad
