"""Sums of Kronecker products ``S = sum_k A_k (x) B_k``.

``A_k (a1 x a2)``, ``B_k (b1 x b2)`` with ``a1*b1 = m`` and ``a2*b2 = n``;
``terms * (a1*a2 + b1*b2)`` parameters. ``rank(A (x) B) = rank(A) * rank(B)``, so a single
term can be full rank.

Product without ever building the Kronecker matrix: reshape each row ``x`` (n) row-major to
``X (a2 x b2)``; then ``(A (x) B) x = vec(A X B^T)`` (row-major), two small matmuls.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import nn

from ._fft import fft_dtype
from .base import StructuredMatrix, as_matrix, check_positive_int

Factors = tuple[tuple[int, int], tuple[int, int]]


def _divisors(k: int) -> list[int]:
    return [d for d in range(1, k + 1) if k % d == 0]


def auto_factors(out_features: int, in_features: int) -> Factors:
    """Factor shapes ``((a1, a2), (b1, b2))`` for an m x n Kronecker product.

    First the highest reachable rank ``min(a1, a2) * min(b1, b2)`` (a plain parameter count
    would pick a rank-1 outer product ``(m x 1) (x) (1 x n)``), then the fewest parameters
    ``a1*a2 + b1*b2``, then the most balanced split, A no larger than B.
    """
    best: tuple[tuple[int, int, float, bool], Factors] | None = None
    for a1 in _divisors(out_features):
        for a2 in _divisors(in_features):
            b1, b2 = out_features // a1, in_features // a2
            reach = min(a1, a2) * min(b1, b2)
            params = a1 * a2 + b1 * b2
            balance = abs(math.log(a1 * a2) - math.log(b1 * b2))
            key = (-reach, params, balance, a1 * a2 > b1 * b2)
            if best is None or key < best[0]:
                best = (key, ((a1, a2), (b1, b2)))
    assert best is not None
    return best[1]


def _check_factors(factors: Any, m: int, n: int) -> Factors:
    try:
        (a1, a2), (b1, b2) = factors
        if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in (a1, a2, b1, b2)):
            raise TypeError("factor sizes must be integers")  # 4.5 is no size: never truncate it
        a1, a2, b1, b2 = (int(v) for v in (a1, a2, b1, b2))
    except (TypeError, ValueError):
        raise ValueError(
            f"kronecker: factors must be ((a1, a2), (b1, b2)) with A (a1 x a2) and B (b1 x b2), "
            f"got {factors!r}"
        ) from None
    if min(a1, a2, b1, b2) < 1 or a1 * b1 != m or a2 * b2 != n:
        good = auto_factors(m, n)
        raise ValueError(
            f"kronecker: factors A ({a1} x {a2}) and B ({b1} x {b2}) give a {a1 * b1} x {a2 * b2} "
            f"matrix, but the layer is out_features={m} x in_features={n}: a1*b1 must equal "
            f"{m} and a2*b2 must equal {n}. Leave factors=None to choose them automatically "
            f"(here {good})."
        )
    return (a1, a2), (b1, b2)


class Kronecker(StructuredMatrix):
    """``sum_k A_k (x) B_k``; parameters ``A (terms, a1, a2)`` and ``B (terms, b1, b2)``.

    Knobs: ``factors=((a1, a2), (b1, b2))`` (None: :func:`auto_factors`), ``terms`` (K >= 1).
    Zero init: A = 0, B ~ N(0, 1).
    """

    name = "kronecker"

    def __init__(
        self,
        out_features: int,
        in_features: int,
        *,
        factors: Factors | None = None,
        terms: int = 1,
        init: str = "zero",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(out_features, in_features, init=init)
        m, n = self.out_features, self.in_features
        self.factors = auto_factors(m, n) if factors is None else _check_factors(factors, m, n)
        self.terms = check_positive_int(terms, "terms", self.name)
        (a1, a2), (b1, b2) = self.factors
        if self.terms > min(a1 * a2, b1 * b2):  # before allocating anything
            raise ValueError(
                f"{self.name}: terms={self.terms} is above the Kronecker rank an {m}x{n} matrix with factors "
                f"{self.factors} can have (min({a1 * a2}, {b1 * b2})). Use terms <= {min(a1 * a2, b1 * b2)}."
            )
        self.A = nn.Parameter(torch.empty(self.terms, a1, a2, dtype=dtype, device=device))
        self.B = nn.Parameter(torch.empty(self.terms, b1, b2, dtype=dtype, device=device))
        self.reset_parameters()

    def knobs(self) -> dict[str, Any]:
        return {"factors": self.factors, "terms": self.terms}

    def update_energy(self) -> float:
        """``terms``: dS/dA_k[i, j] = e_ij (x) B_k has squared norm ||B_k||^2, b1 b2 in
        expectation (var B = 1 at the zero init); summed over the a1 a2 terms entries of A and
        divided by m n."""
        return float(self.terms)

    def reset_parameters(self, init: str | None = None) -> None:
        init = init or self.init
        (_, a2), (_, b2) = self.factors
        with torch.no_grad():
            if init == "zero":
                # B at unit variance: under Adam a step then changes it by about lr relative to
                # its size (the adapter's scale, through update_energy, sizes the first step)
                self.B.normal_(0.0, 1.0)
                self.A.zero_()
            else:
                # entries of sum_k A_k (x) B_k get variance terms * var(A) * var(B) = 1/n
                self.B.normal_(0.0, b2**-0.5)
                self.A.normal_(0.0, (a2 * self.terms) ** -0.5)

    def dense(self) -> torch.Tensor:
        (a1, a2), (b1, b2) = self.factors
        # (A (x) B)[i1*b1 + i2, j1*b2 + j2] = A[i1, j1] * B[i2, j2]
        full = torch.einsum("kac,kbd->abcd", self.A, self.B)
        return full.reshape(a1 * b1, a2 * b2)

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        (a1, a2), (b1, b2) = self.factors
        dtype = torch.promote_types(x.dtype, self.A.dtype)
        A, B = self.A.to(dtype), self.B.to(dtype)
        X = x.to(dtype).reshape(*x.shape[:-1], 1, a2, b2)
        if self.terms == 1:
            Y = A[0] @ (X[..., 0, :, :] @ B[0].mT)  # (..., a1, b1)
        else:
            Y = (A @ (X @ B.mT)).sum(-3)  # (..., K, a1, b1) summed over K
        return Y.reshape(*x.shape[:-1], a1 * b1).to(x.dtype)

    # -- fused-layer support ------------------------------------------------------------
    def _dense_for_merge(self, dtype: torch.dtype) -> torch.Tensor:
        (a1, a2), (b1, b2) = self.factors
        A, B = self.A.to(dtype), self.B.to(dtype)
        if self.terms == 1:  # one broadcast product, already in (a1, b1, a2, b2) order
            return (A[0][:, None, :, None] * B[0][None, :, None, :]).reshape(a1 * b1, a2 * b2)
        return torch.einsum("kac,kbd->abcd", A, B).reshape(a1 * b1, a2 * b2)

    def _merge_into(self, out: torch.Tensor, weight: torch.Tensor, scale: float) -> torch.Tensor:
        """One broadcast multiply-add per term over the (a1, b1, a2, b2) view of the m x n memory."""
        (a1, a2), (b1, b2) = self.factors
        A, B = self.A.to(out.dtype), self.B.to(out.dtype)
        blocks, source = out.view(a1, b1, a2, b2), weight.reshape(a1, b1, a2, b2)
        for k in range(self.terms):
            torch.addcmul(source, A[k][:, None, :, None], B[k][None, :, None, :], value=scale, out=blocks)
            source = blocks
        return out

    def param_grads(self, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Adjoint by reshapes and small matmuls, never the Kronecker matrix: with the tokens
        ``X_t (a2 x b2)`` and ``G_t (a1 x b1)``,
        ``dA_k = sum_t G_t B_k X_t^T`` and ``dB_k = sum_t G_t^T A_k X_t``; each is one
        (a1 x T b1) @ (T b1 x a2) or (b1 x T a1) @ (T a1 x b2) matmul after a token-major
        transpose of x and g. T (a2 b1 b2 + a1 a2 b1 + a1 a2 b2 + a1 b1 b2) multiply-adds per
        term (at 384 x 384, factors 16x16 and 24x24: 1/5 of the T m n of ``g^T x``)."""
        x2, g2 = self._flatten_tokens(x, g)
        (a1, a2), (b1, b2) = self.factors
        T = x2.shape[0]
        dtype = fft_dtype(x2, g2, self.A, self.B)
        A, B = self.A.to(dtype), self.B.to(dtype)
        Xp = x2.to(dtype).reshape(T, a2, b2).transpose(0, 1).contiguous()  # (a2, T, b2)
        Gp = g2.to(dtype).reshape(T, a1, b1).transpose(0, 1).contiguous()  # (a1, T, b1)
        dA = torch.empty_like(A)
        dB = torch.empty_like(B)
        for k in range(self.terms):
            XB = Xp @ B[k].T  # (a2, T, b1): rows X_t B_k^T
            dA[k] = Gp.reshape(a1, T * b1) @ XB.reshape(a2, T * b1).T
            AX = (A[k] @ Xp.reshape(a2, T * b2)).reshape(a1 * T, b2)  # rows of A_k X_t
            dB[k] = Gp.reshape(a1 * T, b1).T @ AX
        return dA.to(self.A.dtype), dB.to(self.B.dtype)

    @classmethod
    def project(cls, M: torch.Tensor, *, factors: Factors | None = None, terms: int = 1) -> Kronecker:
        """Frobenius-optimal sum of ``terms`` Kronecker products (Van Loan and Pitsianis):
        rearrange M so that block (i1, j1) of size b1 x b2 becomes row i1*a2 + j1, take the
        rank-``terms`` truncated SVD of that (a1*a2 x b1*b2) matrix, and fold each singular
        pair back into ``A_k`` and ``B_k`` (singular values split evenly)."""
        M = as_matrix(M, cls.name)
        inst = cls(*M.shape, factors=factors, terms=terms, dtype=M.dtype, device=M.device)
        (a1, a2), (b1, b2) = inst.factors
        R = M.reshape(a1, b1, a2, b2).permute(0, 2, 1, 3).reshape(a1 * a2, b1 * b2)
        U, s, Vh = torch.linalg.svd(R, full_matrices=False)
        k = min(inst.terms, s.numel())
        root = s[:k].sqrt()
        with torch.no_grad():
            inst.A.zero_()
            inst.B.zero_()
            inst.A[:k] = (U[:, :k] * root).T.reshape(k, a1, a2)
            inst.B[:k] = (Vh[:k] * root[:, None]).reshape(k, b1, b2)
        return inst
