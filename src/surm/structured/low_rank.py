"""Low-rank matrices ``S = B A`` (LoRA's update), the baseline the structured families replace.

``B (m x r)``, ``A (r x n)``: r*(m+n) parameters. Zero init sets B = 0 and draws A, as LoRA.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._fft import fft_dtype
from .base import StructuredMatrix, as_matrix, check_positive_int


class LowRank(StructuredMatrix):
    """``B @ A`` with knob ``rank`` (1 <= r <= min(m, n); default 8, also kept on narrower
    layers). Parameters ``A (r, n)`` and ``B (m, r)``."""

    name = "low_rank"

    def __init__(
        self,
        out_features: int,
        in_features: int,
        *,
        rank: int | None = None,
        init: str = "zero",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(out_features, in_features, init=init)
        # the default (8) stays allowed on narrower layers, as it always was; an explicit rank above
        # min(m, n) buys nothing, and is refused before allocating (a hostile rank costs no memory)
        self.rank = 8 if rank is None else check_positive_int(rank, "rank", self.name)
        if rank is not None and self.rank > min(self.out_features, self.in_features):
            raise ValueError(
                f"{self.name}: rank={self.rank} is above the rank a {self.out_features}x{self.in_features} "
                f"matrix can have. Use rank <= {min(self.out_features, self.in_features)}."
            )
        self.A = nn.Parameter(torch.empty(self.rank, self.in_features, dtype=dtype, device=device))
        self.B = nn.Parameter(torch.empty(self.out_features, self.rank, dtype=dtype, device=device))
        self.reset_parameters()

    def knobs(self) -> dict[str, Any]:
        return {"rank": self.rank}

    def update_energy(self) -> float:
        """``r / n``: dS/dB[i, k] = e_i A_k^T has squared norm ||A_k||^2, 1 in expectation
        (var A = 1 / n); m r of them, divided by m n."""
        return self.rank / self.in_features

    def reset_parameters(self, init: str | None = None) -> None:
        init = init or self.init
        with torch.no_grad():
            self.A.normal_(0.0, self.in_features**-0.5)
            if init == "zero":
                self.B.zero_()
            else:
                self.B.normal_(0.0, self.rank**-0.5)

    def dense(self) -> torch.Tensor:
        return self.B @ self.A

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, self.A.dtype)
        y = (x.to(dtype) @ self.A.to(dtype).T) @ self.B.to(dtype).T
        return y.to(x.dtype)

    # -- fused-layer support ------------------------------------------------------------
    def _dense_for_merge(self, dtype: torch.dtype) -> torch.Tensor:
        return self.B.to(dtype) @ self.A.to(dtype)

    def merge(
        self,
        weight: torch.Tensor,
        scale: float = 1.0,
        *,
        dtype: torch.dtype | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if out is not None:
            return super().merge(weight, scale, dtype=dtype, out=out)
        self._check_merge_shape(weight)
        dtype = dtype or fft_dtype(weight, self.A, self.B)
        return torch.addmm(weight.to(dtype), self.B.to(dtype), self.A.to(dtype), alpha=scale)

    def _merge_into(self, out: torch.Tensor, weight: torch.Tensor, scale: float) -> torch.Tensor:
        return torch.addmm(weight, self.B.to(out.dtype), self.A.to(out.dtype), alpha=scale, out=out)

    def param_grads(self, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Adjoint by thin matmuls: ``dA = (g B)^T x``, ``dB = g^T (x A^T)``. Returns (dA, dB)."""
        x2, g2 = self._flatten_tokens(x, g)
        dtype = fft_dtype(x2, g2, self.A, self.B)
        x2, g2 = x2.to(dtype), g2.to(dtype)
        dA = (g2 @ self.B.to(dtype)).T @ x2
        dB = g2.T @ (x2 @ self.A.to(dtype).T)
        return dA.to(self.A.dtype), dB.to(self.B.dtype)

    @classmethod
    def project(cls, M: torch.Tensor, *, rank: int | None = None) -> LowRank:
        """Frobenius-optimal rank-r fit (Eckart-Young): the truncated SVD, singular values split
        evenly between B and A. The default rank (8) above min(m, n) is padded with zero columns;
        an explicit rank above min(m, n) is refused."""
        M = as_matrix(M, cls.name)
        inst = cls(*M.shape, rank=rank, dtype=M.dtype, device=M.device)
        U, s, Vh = torch.linalg.svd(M, full_matrices=False)
        k = min(inst.rank, s.numel())
        root = s[:k].sqrt()
        with torch.no_grad():
            inst.A.zero_()
            inst.B.zero_()
            inst.A[:k] = Vh[:k] * root[:, None]
            inst.B[:, :k] = U[:, :k] * root
        return inst
