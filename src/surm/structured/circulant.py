"""Circulant and skew-circulant matrices, single (padded) or as a grid of square blocks.

An f-circulant ``Z_f(v)`` (b x b) has entries ``v[i-j]`` for i >= j and ``f * v[b+i-j]`` for
i < j: f = 1 is the circulant ``C(v)`` (first column v), f = -1 the skew-circulant.

Rectangular (m x n) matrices come in two layouts, chosen with ``block_size``:

- ``None``: one f-circulant of size N = max(m, n), of which the top-left m x n corner is
  used (x is zero-padded to N, the first m outputs are kept). N parameters.
- ``b``: a (m/b) x (n/b) grid of independent b x b f-circulant blocks (b must divide m and
  n), m*n/b parameters (the layout of PEFT's C3A).

Products cost O(n log n) per block row through rfft/irfft. One f-circulant (``block_size=None``)
multiplies through its used m x n window, a Toeplitz matrix: on the circulant embedding of a
2-3-5-smooth length >= m + n - 1, or, for the circulant, on the size-N circulant itself when
that is cheaper (N = 11008 = 2^8 * 43 is not; :func:`~surm.structured._fft.lag_fft_size`).
Blocks of the grid use length b (circulant) or a length-2b real FFT whose even bins are masked
out (the negacyclic convolution of the skew-circulant).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from ._fft import (
    ZeroPadder,
    add_toeplitz_,
    chunk_rows,
    cross_correlation,
    cyclic_conv,
    diagonal_sums,
    embedded_filter,
    fft_cost,
    fft_dtype,
    lag_fft_size,
    lags_from_correlation,
    matmul_cost,
    negacyclic_mask,
    toeplitz_from_lags,
)
from .base import LinearStructuredMatrix, as_matrix, check_positive_int


def block_layout(name: str, m: int, n: int, block_size: int | None) -> tuple[tuple[int, int], int]:
    """``((p, q), b)``: the grid of b x b blocks of an m x n f-circulant family with knob
    ``block_size`` (None: one block of size max(m, n)); a ValueError naming ``name`` when b
    does not divide both widths."""
    if block_size is None:
        return (1, 1), max(m, n)
    b = check_positive_int(block_size, "block_size", name)
    if m % b or n % b:
        raise ValueError(
            f"{name}: block_size={b} must divide both out_features={m} and "
            f"in_features={n}. Use a common divisor (the largest is gcd = {math.gcd(m, n)}), or "
            f"block_size=None for one zero-padded {max(m, n)}x{max(m, n)} {name} matrix."
        )
    return (m // b, n // b), b


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
        grid, b = block_layout(self.name, self.out_features, self.in_features, block_size)
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
        if self.grid == (1, 1):
            return self._window_product(x)
        return self._block_product(x)

    # -- one f-circulant, of which the top-left m x n window is used ----------------------
    # The window is the Toeplitz matrix of the lags i - j in [-(n-1), m-1] (:meth:`_lags`), so
    # products run on its circulant embedding of a smooth length >= m + n - 1, or, for the
    # circulant, on the circulant of size b itself where that is cheaper (lag_fft_size).
    def _window_fft_size(self) -> int:
        m, n = self.out_features, self.in_features
        return lag_fft_size(m, n, period=self.block if self.f == 1 else None)

    def _own_period(self, size: int) -> bool:
        """Whether FFT length ``size`` is the circulant's own (wrapped lags need no embedding)."""
        return self.f == 1 and size == self.block

    def _window_filter(self, dtype: torch.dtype, size: int) -> torch.Tensor:
        """(size,) first column of the size-``size`` circulant whose window is this matrix's."""
        if self._own_period(size):
            return self.weight.to(dtype)[0, 0]
        return embedded_filter(self._lags(dtype)[0, 0], self.out_features, self.in_features, size)

    def _window_product(self, x: torch.Tensor) -> torch.Tensor:
        dtype = fft_dtype(x, self.weight)
        size = self._window_fft_size()
        filter_f = torch.fft.rfft(self._window_filter(dtype, size))
        y = cyclic_conv(filter_f, x.to(dtype), size)[..., : self.out_features]
        return y.to(x.dtype)

    # -- a grid of b x b blocks ----------------------------------------------------------
    def _block_product(self, x: torch.Tensor) -> torch.Tensor:
        (p, q), b = self.grid, self.block
        dtype = fft_dtype(x, self.weight)
        w = self.weight.to(dtype)
        xb = x.to(dtype).reshape(*x.shape[:-1], q, b)
        size = b if self.f == 1 else 2 * b
        x_f = torch.fft.rfft(xb, n=size)  # (..., q, F)
        w_f = torch.fft.rfft(w, n=size)  # (p, q, F)
        if self.f == -1:
            x_f = x_f * negacyclic_mask(b, x_f.device, dtype)
        y_f = torch.einsum("...qf,pqf->...pf", x_f, w_f)
        y = torch.fft.irfft(y_f, n=size)[..., :b]  # (..., p, b)
        return y.reshape(*x.shape[:-1], p * b).to(x.dtype)

    # -- fused-layer support ------------------------------------------------------------
    def _lags(self, dtype: torch.dtype) -> torch.Tensor:
        """(p, q, rows+cols-1) Toeplitz lag vectors of the blocks: lag d = i - j in
        [-(cols-1), rows-1] at index d + cols - 1 holds w[d mod b], times f when d < 0."""
        (p, q), b = self.grid, self.block
        rows, cols = (self.out_features, self.in_features) if p == q == 1 else (b, b)
        d = torch.arange(-(cols - 1), rows, device=self.weight.device)
        w = self.weight.to(dtype)[..., d % b]
        if self.f == -1:
            w = w * torch.where(d < 0, -1.0, 1.0).to(w)
        return w

    def _dense_for_merge(self, dtype: torch.dtype) -> torch.Tensor:
        (p, q), b = self.grid, self.block
        m, n = self.out_features, self.in_features
        if p == q == 1:
            return toeplitz_from_lags(self._lags(dtype)[0, 0], m, n)
        blocks = toeplitz_from_lags(self._lags(dtype), b, b)  # (p, q, b, b)
        return blocks.permute(0, 2, 1, 3).reshape(m, n)

    def _merge_into(self, out: torch.Tensor, weight: torch.Tensor, scale: float) -> torch.Tensor:
        if self.grid != (1, 1):  # (no super(): the product families borrow this method)
            return torch.add(weight, self._dense_for_merge(out.dtype), alpha=scale, out=out)
        return add_toeplitz_(out, weight, self._lags(out.dtype)[0, 0], scale)

    def adjoint_method(self, tokens: int, device: torch.device | str = "cpu") -> str:
        """``"fft"`` or ``"matmul"``: the cheaper route of :meth:`param_grads` (cost model in
        :mod:`surm.structured._fft`, measured on CPU; on other devices, unmeasured, matmuls
        are assumed to win: ``"matmul"``)."""
        if torch.device(device).type != "cpu":
            return "matmul"
        (p, q), b = self.grid, self.block
        if p == q == 1:
            fft = fft_cost(self._window_fft_size(), 2)
        else:
            size = b if self.f == 1 else 2 * b
            fft = fft_cost(size, p + q) + matmul_cost(4 * p * q * (size // 2 + 1))
        return "fft" if fft < matmul_cost(self.out_features * self.in_features) else "matmul"

    def param_grads(self, x: torch.Tensor, g: torch.Tensor, *, method: str = "auto") -> tuple[torch.Tensor, ...]:
        """Adjoint of the (block) f-circulant: per block pair (P, Q) the cyclic cross-correlation
        ``irfft(sum_t rfft(g_tP) * conj(rfft(x_tQ)))`` (the sum over tokens taken in the frequency
        domain, one spectrum per block pair kept); the skew-circulant uses length-2b transforms
        and the negacyclic mask. ``method="matmul"`` instead forms ``G = g^T x`` and sums its
        (wrapped, signed) diagonals; ``"auto"`` picks the cheaper (:meth:`adjoint_method`)."""
        x2, g2 = self._flatten_tokens(x, g)
        method = self._adjoint_route(method, x2)
        dtype = fft_dtype(x2, g2, self.weight)
        if method == "matmul":
            grad = self._grad_from_dense(g2.to(dtype).T @ x2.to(dtype))
        else:
            grad = self._grad_fft(x2, g2, dtype)
        return (grad.to(self.weight.dtype),)

    def _grad_fft(self, x2: torch.Tensor, g2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.grid == (1, 1):
            return self._grad_fft_window(x2, g2, dtype)
        return self._grad_fft_blocks(x2, g2, dtype)

    def _grad_fft_window(self, x2: torch.Tensor, g2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """One f-circulant: the cyclic cross-correlation ``irfft(sum_t rfft(g_t) conj(rfft(x_t)))``
        at the window's FFT length, whose lags fold onto the coefficients (already folded when
        that length is the circulant's own size). (1, 1, b)."""
        size, b = self._window_fft_size(), self.block
        m, n = self.out_features, self.in_features
        r = cross_correlation(x2, g2, size, dtype)
        if self._own_period(size):
            return r.reshape(1, 1, b)
        return self._fold_lags(lags_from_correlation(r, m, n))

    def _fold_lags(self, D: torch.Tensor) -> torch.Tensor:
        """(1, 1, b) coefficient gradient of one f-circulant from the gradient of its window's
        lags ``D`` (m+n-1; lag d = i - j at d + n - 1): lag d < 0 is coefficient d + b, times f."""
        m, n, b = self.out_features, self.in_features, self.block
        grad = D.new_zeros(b)
        grad[:m] += D[n - 1 :]
        grad[b - n + 1 :] += self.f * D[: n - 1]
        return grad.reshape(1, 1, b)

    def _grad_fft_blocks(self, x2: torch.Tensor, g2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        (p, q), b = self.grid, self.block
        size = b if self.f == 1 else 2 * b
        T = x2.shape[0]
        rows = min(T, chunk_rows(size * max(p, q)))
        pad_x = ZeroPadder((q,), size, rows, dtype, x2.device)
        pad_g = ZeroPadder((p,), size, rows, dtype, x2.device)
        acc = None
        for s in range(0, T, rows):
            x_f = torch.fft.rfft(pad_x(x2[s : s + rows].reshape(-1, q, b)))  # (rows, q, F)
            g_f = torch.fft.rfft(pad_g(g2[s : s + rows].reshape(-1, p, b)))  # (rows, p, F)
            part = torch.einsum("tpf,tqf->pqf", g_f, x_f.conj())
            acc = part if acc is None else acc + part
        if self.f == -1:
            acc = acc * negacyclic_mask(b, acc.device, dtype)
        return torch.fft.irfft(acc, n=size)[..., :b]

    def _grad_from_dense(self, G: torch.Tensor) -> torch.Tensor:
        """The parameter gradient given ``G = dL/dS`` (m x n): signed wrapped-diagonal sums."""
        (p, q), b = self.grid, self.block
        if p == q == 1:
            return self._fold_lags(diagonal_sums(G))  # lag d = i - j at d + n - 1
        D = diagonal_sums(G.reshape(p, b, q, b).permute(0, 2, 1, 3))  # (p, q, 2b-1)
        grad = D[..., b - 1 :].clone()
        grad[..., 1:] += self.f * D[..., : b - 1]
        return grad

    @classmethod
    def project(cls, M: torch.Tensor, *, block_size: int | None = None) -> _FCirculant:
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
