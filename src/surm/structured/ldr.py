"""Low displacement rank (LDR) matrices ``W(G, H) = sum_{i<r} Z_1(g_i) Z_-1(h_i)``.

``Z_1(g)`` is the circulant with first column g and ``Z_-1(h)`` the skew-circulant with first
column h (see :mod:`surm.structured.circulant`), both N x N with N = max(m, n); an m x n
matrix uses the top-left corner (x zero-padded to N, first m outputs kept). ``G, H (r x N)``:
2*r*N parameters. W has displacement rank <= r with respect to (Z_1, Z_-1); the class holds
circulants (r = 1, h = e_0), skew-circulants, Toeplitz matrices (r = 2) and, for growing r,
every matrix.

Product with 2r + 2 real FFTs: one of x (length 2N, shared by all r terms), r inverse
negacyclic ones giving ``u_i = Z_-1(h_i) x``, r forward transforms of the u_i, and a single
inverse FFT of ``sum_i rfft(g_i) * rfft(u_i)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._fft import fft_dtype, negacyclic_mask
from .base import StructuredMatrix, as_matrix, check_positive_int
from .circulant import Circulant, SkewCirculant


def _f_circulant_stack(v: torch.Tensor, f: int) -> torch.Tensor:
    """v (r, N) -> (r, N, N): the f-circulant matrices ``Z_f(v_i)``."""
    N = v.shape[-1]
    i = torch.arange(N, device=v.device).unsqueeze(1)
    j = torch.arange(N, device=v.device).unsqueeze(0)
    sign = torch.where(i >= j, 1.0, float(f)).to(v.dtype)
    return v[:, (i - j) % N] * sign


class LDR(StructuredMatrix):
    """``sum_i Z_1(g_i) Z_-1(h_i)`` with knob ``rank`` (displacement rank r >= 1).

    Parameters ``G (r, N)`` and ``H (r, N)``, N = max(m, n). Zero init: H = 0, G random.
    """

    name = "ldr"

    def __init__(
        self,
        out_features: int,
        in_features: int,
        *,
        rank: int = 1,
        init: str = "zero",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(out_features, in_features, init=init)
        self.rank = check_positive_int(rank, "rank", self.name)
        self.size = max(self.out_features, self.in_features)
        self.G = nn.Parameter(torch.empty(self.rank, self.size, dtype=dtype, device=device))
        self.H = nn.Parameter(torch.empty(self.rank, self.size, dtype=dtype, device=device))
        self.reset_parameters()

    def knobs(self) -> dict[str, Any]:
        return {"rank": self.rank}

    def reset_parameters(self, init: str | None = None) -> None:
        init = init or self.init
        N, r = self.size, self.rank
        with torch.no_grad():
            # an entry of W sums r*N products g*h: var r*N*var(g)*var(h) = 1/N
            self.G.normal_(0.0, (N * r) ** -0.5)
            if init == "zero":
                self.H.zero_()
            else:
                self.H.normal_(0.0, N**-0.5)

    def dense(self) -> torch.Tensor:
        W = (_f_circulant_stack(self.G, 1) @ _f_circulant_stack(self.H, -1)).sum(0)
        return W[: self.out_features, : self.in_features]

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        N, m = self.size, self.out_features
        dtype = fft_dtype(x, self.G)
        G, H = self.G.to(dtype), self.H.to(dtype)
        x_f = torch.fft.rfft(x.to(dtype), n=2 * N) * negacyclic_mask(N, x.device, dtype)  # (..., N+1)
        u = torch.fft.irfft(x_f.unsqueeze(-2) * torch.fft.rfft(H, n=2 * N), n=2 * N)[..., :N]  # (..., r, N)
        y_f = (torch.fft.rfft(u, n=N) * torch.fft.rfft(G, n=N)).sum(-2)  # (..., N//2+1)
        return torch.fft.irfft(y_f, n=N)[..., :m].to(x.dtype)

    @classmethod
    def project(cls, M: torch.Tensor, *, rank: int = 1, steps: int = 300) -> "LDR":
        """A fitted (not provably optimal) LDR approximation of M: there is no closed form.

        Warm start: term 0 is the best circulant (g_0 = its first column, h_0 = e_0, so that
        Z_-1(h_0) = I), term 1 the best skew-circulant of what is left (g_1 = e_0), further
        terms small and random. Then L-BFGS (strong Wolfe line search, float64) on the squared
        Frobenius error for at most ``steps`` iterations. The fit is therefore never worse
        than the best circulant (r >= 1) or circulant + skew-circulant (r >= 2).
        """
        M = as_matrix(M, cls.name)
        m, n = M.shape
        inst = cls(m, n, rank=rank, dtype=torch.float64, device=M.device)
        target = M.to(torch.float64)
        N, r = inst.size, inst.rank
        e0 = torch.zeros(N, dtype=torch.float64, device=M.device)
        e0[0] = 1.0
        with torch.no_grad():
            circ = Circulant.project(target)
            inst.G[0], inst.H[0] = circ.weight.reshape(N), e0
            if r >= 2:
                skew = SkewCirculant.project(target - circ.dense())
                inst.G[1], inst.H[1] = e0, skew.weight.reshape(N)
            if r >= 3:
                scale = 1e-2 * target.norm() / (m * n) ** 0.5
                inst.G[2:].normal_(0.0, float(scale) ** 0.5 + 1e-12)
                inst.H[2:].normal_(0.0, float(scale) ** 0.5 + 1e-12)
        if steps > 0:
            _fit_lbfgs(inst, target, steps)
        return inst.to(M.dtype)


def _fit_lbfgs(inst: LDR, target: torch.Tensor, steps: int) -> None:
    """Minimise ||inst.dense() - target||_F^2 in place; keeps the start if the fit got worse."""
    start = [p.detach().clone() for p in inst.parameters()]
    with torch.no_grad():
        start_loss = (inst.dense() - target).pow(2).sum().item()
    opt = torch.optim.LBFGS(
        list(inst.parameters()),
        lr=1.0,
        max_iter=steps,
        history_size=20,
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (inst.dense() - target).pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        loss = (inst.dense() - target).pow(2).sum().item()
        if not loss <= start_loss:
            for p, s in zip(inst.parameters(), start):
                p.copy_(s)
    for p in inst.parameters():
        p.grad = None
