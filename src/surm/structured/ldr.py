"""Low displacement rank (LDR) matrices ``W(G, H) = sum_{i<r} Z_1(g_i) Z_-1(h_i)``.

``Z_1(g)`` is the circulant with first column g and ``Z_-1(h)`` the skew-circulant with first
column h (see :mod:`surm.structured.circulant`), both N x N with N = max(m, n); an m x n
matrix uses the top-left corner (x zero-padded to N, first m outputs kept). ``G, H (r x N)``:
2*r*N parameters. W has displacement rank <= r with respect to (Z_1, Z_-1); the class holds
circulants (r = 1, h = e_0), skew-circulants, Toeplitz matrices (r = 2) and, for growing r,
every matrix.

Product with 2r + 2 real FFTs: one of x (shared by all r terms), r inverse ones giving
``u_i = Z_-1(h_i) x``, r forward transforms of the u_i, and a single inverse FFT of
``sum_i rfft(g_i) * rfft(u_i)``. Each step is a Toeplitz window (the N x n one of the
skew-circulant, the m x N one of the circulant) on a cyclic embedding of smooth length
(:func:`~surm.structured._fft.lag_fft_size`), computed token chunk by token chunk with its own
backward (x saved, 4r + 3 FFTs per token: the correlations with the output gradient).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ._fft import (
    ZeroPadder,
    chunk_rows,
    embedded_filter,
    fft_cost,
    fft_dtype,
    lag_fft_size,
    matmul_cost,
    negacyclic_mask,
    toeplitz_from_lags,
)
from .base import StructuredMatrix, as_matrix, check_positive_int, lbfgs
from .circulant import Circulant, SkewCirculant


class _LDRProduct(torch.autograd.Function):
    """``y = sum_i window(C_i) window(Z_i) x`` from the first columns of the two steps' cyclic
    embeddings: ``skew (r, L1)`` (u_i = the first N entries of skew_i (*) x, cyclic length L1)
    and ``circ (r, L2)`` (y = the first m entries of sum_i circ_i (*) u_i, length L2).

    Token chunks small enough to stay in cache, buffers reused: no zero-filled or transformed
    copy of the whole batch. Saves x only; backward transforms it again (2r + 1 FFTs) and
    needs 2r + 2 more: correlations with g give the filters' gradients and x's.
    """

    @staticmethod
    def forward(ctx, x, skew, circ, N, m):
        """x (T, n), skew (r, L1), circ (r, L2), all in the FFT dtype -> y (T, m)."""
        ctx.save_for_backward(x, skew, circ)
        ctx.N, ctx.m = N, m
        y = x.new_empty(x.shape[0], m)
        circ_f = torch.fft.rfft(circ)
        for s, _, u_f in _LDRProduct._spectra(x, skew, circ, N):
            y[s] = torch.fft.irfft((u_f * circ_f).sum(1), n=circ.shape[-1])[:, :m]
        return y

    @staticmethod
    def _spectra(x, skew, circ, N):
        """Per token chunk: (slice, rfft of x at L1 (t, F1), rfft of u at L2 (t, r, F2))."""
        (r, L1), L2 = skew.shape, circ.shape[-1]
        T = x.shape[0]
        rows = min(T, chunk_rows(max(L1, L2) * r))
        pad_x = ZeroPadder((), L1, rows, x.dtype, x.device)
        pad_u = ZeroPadder((r,), L2, rows, x.dtype, x.device)
        skew_f = torch.fft.rfft(skew)
        for start in range(0, T, rows):
            s = slice(start, start + rows)
            x_f = torch.fft.rfft(pad_x(x[s]))
            u = torch.fft.irfft(x_f[:, None] * skew_f, n=L1)[..., :N]  # (t, r, N)
            yield s, x_f, torch.fft.rfft(pad_u(u))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, skew, circ = ctx.saved_tensors
        N = ctx.N
        (r, L1), L2 = skew.shape, circ.shape[-1]
        n = x.shape[-1]
        skew_conj, circ_conj = torch.fft.rfft(skew).conj(), torch.fft.rfft(circ).conj()
        grad_y = grad_y.to(x.dtype)
        rows = min(x.shape[0], chunk_rows(max(L1, L2) * r))
        pad_g = ZeroPadder((), L2, rows, x.dtype, x.device)
        pad_v = ZeroPadder((r,), L1, rows, x.dtype, x.device)
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        acc_skew = acc_circ = None
        for s, x_f, u_f in _LDRProduct._spectra(x, skew, circ, N):
            g_f = torch.fft.rfft(pad_g(grad_y[s]))  # (t, F2)
            part_circ = torch.linalg.vecdot(u_f, g_f[:, None], dim=0)  # (r, F2): sum_t conj(U) G
            v = torch.fft.irfft(g_f[:, None] * circ_conj, n=L2)[..., :N]  # (t, r, N): d/du
            v_f = torch.fft.rfft(pad_v(v))  # (t, r, F1)
            part_skew = torch.linalg.vecdot(x_f[:, None], v_f, dim=0)  # (r, F1): sum_t conj(X) V
            acc_circ = part_circ if acc_circ is None else acc_circ + part_circ
            acc_skew = part_skew if acc_skew is None else acc_skew + part_skew
            if grad_x is not None:
                grad_x[s] = torch.fft.irfft((v_f * skew_conj).sum(1), n=L1)[:, :n]
        grad_skew = torch.fft.irfft(acc_skew, n=L1) if ctx.needs_input_grad[1] else None
        grad_circ = torch.fft.irfft(acc_circ, n=L2) if ctx.needs_input_grad[2] else None
        return grad_x, grad_skew, grad_circ, None, None


def _f_circulant_stack(v: torch.Tensor, f: int) -> torch.Tensor:
    """v (r, N) -> (r, N, N): the f-circulant matrices ``Z_f(v_i)``."""
    N = v.shape[-1]
    i = torch.arange(N, device=v.device).unsqueeze(1)
    j = torch.arange(N, device=v.device).unsqueeze(0)
    sign = torch.where(i >= j, 1.0, float(f)).to(v.dtype)
    return v[:, (i - j) % N] * sign


class LDR(StructuredMatrix):
    """``sum_i Z_1(g_i) Z_-1(h_i)`` with knob ``rank`` (displacement rank r >= 1).

    Parameters ``G (r, N)`` and ``H (r, N)``, N = max(m, n). Zero init: H = 0, G ~ N(0, 1).
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
        if self.rank > self.size:  # checked before allocating: a hostile rank costs no memory
            raise ValueError(
                f"{self.name}: rank={self.rank} is above what a {self.out_features}x{self.in_features} matrix "
                f"can use: every {self.size}x{self.size} matrix has displacement rank <= {self.size}. "
                f"Use rank <= {self.size}."
            )
        self.G = nn.Parameter(torch.empty(self.rank, self.size, dtype=dtype, device=device))
        self.H = nn.Parameter(torch.empty(self.rank, self.size, dtype=dtype, device=device))
        self.reset_parameters()

    def knobs(self) -> dict[str, Any]:
        return {"rank": self.rank}

    def update_energy(self) -> float:
        """``N r``: dS/dH[i, j] = window of C(g_i) Z_-1(e_j), the entries of C(g_i) signed and
        moved, with expected squared norm m n var(g) in the m x n window (var g = 1 at the zero
        init); r N of them, divided by m n."""
        return float(self.size * self.rank)

    def reset_parameters(self, init: str | None = None) -> None:
        init = init or self.init
        N, r = self.size, self.rank
        with torch.no_grad():
            if init == "zero":
                # G at unit variance: under Adam a step then changes it by about lr relative to
                # its size, so the update grows steadily (the adapter's scale, through
                # update_energy, sizes the first step)
                self.G.normal_(0.0, 1.0)
                self.H.zero_()
            else:
                # an entry of W sums r*N products g*h: var r*N*var(g)*var(h) = 1/N
                self.G.normal_(0.0, (N * r) ** -0.5)
                self.H.normal_(0.0, N**-0.5)

    def dense(self) -> torch.Tensor:
        W = (_f_circulant_stack(self.G, 1) @ _f_circulant_stack(self.H, -1)).sum(0)
        return W[: self.out_features, : self.in_features]

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self._product_composed(x)
        dtype = fft_dtype(x, self.G)
        skew_size, circ_size = self._product_fft_sizes()
        x2 = x.reshape(-1, self.in_features).to(dtype)
        y = _LDRProduct.apply(x2, self._skew_filters(dtype, skew_size), self._circulant_filters(dtype, circ_size),
                              self.size, self.out_features)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def functional_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The composed product (torch FFT ops, no custom autograd.Function): vmappable."""
        self.check_input(x)
        if x.numel() == 0:
            return self._product_without_tokens(x)
        return self._product_composed(x)

    def _product_composed(self, x: torch.Tensor) -> torch.Tensor:
        """The product as torch FFT ops differentiated by autograd (what torch.compile traces)."""
        N, m = self.size, self.out_features
        dtype = fft_dtype(x, self.G)
        skew_size, circ_size = self._product_fft_sizes()
        h_f = torch.fft.rfft(self._skew_filters(dtype, skew_size))  # (r, F1)
        u = torch.fft.irfft(torch.fft.rfft(x.to(dtype), n=skew_size).unsqueeze(-2) * h_f, n=skew_size)
        u_f = torch.fft.rfft(u[..., :N], n=circ_size)  # (..., r, F2): spectra of u_i = Z_-1(h_i) x
        y_f = (u_f * torch.fft.rfft(self._circulant_filters(dtype, circ_size))).sum(-2)
        return torch.fft.irfft(y_f, n=circ_size)[..., :m].to(x.dtype)

    # The product's two steps as Toeplitz windows (:func:`lag_fft_size`): u_i = Z_-1(h_i) x uses the
    # N x n window of the skew-circulant, y = sum_i C(g_i) u_i the m x N window of the circulant.
    def _product_fft_sizes(self) -> tuple[int, int]:
        """FFT lengths of the skew-circulant step (its embedding) and of the circulant step (N
        itself or an embedding, whichever is cheaper)."""
        N, m, n = self.size, self.out_features, self.in_features
        return lag_fft_size(N, n), lag_fft_size(m, N, period=N)

    def _skew_filters(self, dtype: torch.dtype, size: int) -> torch.Tensor:
        """(r, size): embedded first columns of the N x n windows of ``Z_-1(h_i)``: lag d >= 0 is
        h[d], lag d < 0 is -h[d + N]."""
        N, n = self.size, self.in_features
        h = self.H.to(dtype)
        return embedded_filter(torch.cat([-h[:, N - n + 1 :], h], dim=-1), N, n, size)

    def _circulant_filters(self, dtype: torch.dtype, size: int) -> torch.Tensor:
        """(r, size): first columns of ``C(g_i)`` (size N) or embedded ones of their m x N windows."""
        N, m = self.size, self.out_features
        g = self.G.to(dtype)
        if size == N:
            return g
        return embedded_filter(torch.cat([g[:, 1:], g[:, :m]], dim=-1), m, N, size)

    # -- fused-layer support ------------------------------------------------------------
    def _skew_columns(self, dtype: torch.dtype) -> torch.Tensor:
        """(r, n, N): row b is column b of ``Z_-1(h_i)``, for the n columns that W uses."""
        N, n = self.size, self.in_features
        h = self.H.to(dtype).flip(-1)
        return toeplitz_from_lags(torch.cat([h, -h[:, : n - 1]], dim=-1), n, N)

    def _dense_for_merge(self, dtype: torch.dtype) -> torch.Tensor:
        """O(r min(m, n) N log N) instead of the r N^3 of :meth:`dense`, the r terms summed in the
        frequency domain. By columns, ``W e_b = sum_i C(g_i) (Z_-1(h_i) e_b)``: the n used
        skew-circulant columns, N-point transforms. By rows (cheaper when m < n/2),
        ``e_a^T W = sum_i (Z_-1(h_i)^T C(g_i)^T e_a)^T``: the m used circulant rows through the
        transposed negacyclic product, 2N-point transforms."""
        N, m, n = self.size, self.out_features, self.in_features
        if 2 * m < n:
            g = self.G.to(dtype)
            lags = torch.arange(-(N - 1), m, device=g.device) % N  # C(g)[a, j] = g[(a - j) mod N]
            rows = torch.fft.rfft(toeplitz_from_lags(g[:, lags], m, N), n=2 * N)  # (r, m, N+1)
            H_f = torch.fft.rfft(self.H.to(dtype), n=2 * N).conj() * negacyclic_mask(N, g.device, dtype)
            W = torch.fft.irfft((rows * H_f[:, None]).sum(0), n=2 * N)  # (m, 2N)
            return W[:, :n]
        G_f = torch.fft.rfft(self.G.to(dtype))  # (r, F)
        cols_f = torch.fft.rfft(self._skew_columns(dtype))  # (r, n, F)
        Wt = torch.fft.irfft((cols_f * G_f[:, None]).sum(0), n=N)  # (n, N): row b = W e_b
        return Wt[:, :m].T

    def adjoint_method(self, tokens: int, device: torch.device | str = "cpu") -> str:
        """``"fft"`` (per-token transforms, 2 + 4r per token) or ``"matmul"`` (``G = g^T x`` and
        (1 + 3r) n transforms independent of the tokens): the cheaper under the CPU cost model
        of :mod:`surm.structured._fft`. At 4096 tokens and d >= 384 that is the matmul route;
        the FFT route wins for a few hundred tokens or fewer. Off CPU (unmeasured): ``"matmul"``."""
        if torch.device(device).type != "cpu":
            return "matmul"
        N, r, n = self.size, self.rank, self.in_features
        per_token = fft_cost(2 * N, 1 + 2 * r) + fft_cost(N, 1 + 2 * r)
        via_matmul = tokens * matmul_cost(self.out_features * n) + n * fft_cost(N, 1 + 3 * r)
        return "fft" if tokens * per_token < via_matmul else "matmul"

    def param_grads(self, x: torch.Tensor, g: torch.Tensor, *, method: str = "auto") -> tuple[torch.Tensor, ...]:
        """Adjoint of ``W = sum_i C(g_i) Z_-1(h_i)`` (top-left m x n corner), two routes:

        ``"fft"``: per token, ``u_i = Z_-1(h_i) x`` (one 2N-point transform of x shared by the
        r terms) gives ``dG_i = irfft(sum_t rfft(g_t) conj(rfft(u_i)))``, and
        ``v_i = C(g_i)^T g`` (one N-point transform of g shared) gives
        ``dH_i = negacyclic correlation sum_t (v_i, x)``; the token sums are taken in the
        frequency domain, tokens in chunks (bounded memory).
        ``"matmul"``: ``G = g^T x`` once, then ``dG_i = sum_b corr(G e_b, Z_-1(h_i) e_b)`` and
        ``dH_i`` = signed wrapped-diagonal sums of ``C(g_i)^T G``, all through n-column
        transforms (independent of the number of tokens).
        ``"auto"`` picks by :meth:`adjoint_method`. Returns (dG, dH).
        """
        x2, g2 = self._flatten_tokens(x, g)
        method = self._adjoint_route(method, x2)
        dtype = fft_dtype(x2, g2, self.G, self.H)
        if method == "fft":
            dG, dH = self._grads_fft(x2, g2, dtype)
        else:
            dG, dH = self._grads_from_dense(g2.to(dtype).T @ x2.to(dtype))
        return dG.to(self.G.dtype), dH.to(self.H.dtype)

    def _grads_fft(
        self, x2: torch.Tensor, g2: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        N, r = self.size, self.rank
        T = x2.shape[0]
        mask = negacyclic_mask(N, x2.device, dtype)
        H_f = torch.fft.rfft(self.H.to(dtype), n=2 * N)  # (r, N+1)
        G_conj = torch.fft.rfft(self.G.to(dtype)).conj()  # (r, N//2+1)
        rows = min(T, chunk_rows(2 * N * r))
        pad_x = ZeroPadder((), 2 * N, rows, dtype, x2.device)
        pad_g = ZeroPadder((), N, rows, dtype, x2.device)
        pad_v = ZeroPadder((r,), 2 * N, rows, dtype, x2.device)
        acc_g = acc_h = None
        for s in range(0, T, rows):
            x_f = torch.fft.rfft(pad_x(x2[s : s + rows])) * mask  # (t, N+1): the spectrum of [x, -x]
            u = torch.fft.irfft(x_f[:, None] * H_f, n=2 * N)[..., :N]  # (t, r, N): Z_-1(h_i) x
            g_f = torch.fft.rfft(pad_g(g2[s : s + rows]))  # (t, N//2+1)
            part_g = torch.linalg.vecdot(torch.fft.rfft(u), g_f[:, None], dim=0)  # (r, F)
            v = torch.fft.irfft(g_f[:, None] * G_conj, n=N)  # (t, r, N): C(g_i)^T g
            v_f = torch.fft.rfft(pad_v(v))  # (t, r, N+1)
            part_h = torch.linalg.vecdot(x_f[:, None], v_f, dim=0)  # (r, N+1): sum_t conj(X) V
            acc_g = part_g if acc_g is None else acc_g + part_g
            acc_h = part_h if acc_h is None else acc_h + part_h
        return torch.fft.irfft(acc_g, n=N), torch.fft.irfft(acc_h, n=2 * N)[..., :N]

    def _grads_from_dense(self, Gm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(dG, dH) from ``Gm = dL/dW`` (m x n): through its n columns (tokens e_b with output
        gradients G e_b), or, when cheaper, through its m rows (the per-token FFT route with
        tokens ``G^T e_a`` and output gradients e_a: ``G = sum_a e_a (e_a^T G)``)."""
        N, r, m, n = self.size, self.rank, self.out_features, self.in_features
        dtype = Gm.dtype
        if m * (2 + 4 * r) * 1.5 < n * (1 + 3 * r):
            return self._grads_fft(Gm, torch.eye(m, dtype=dtype, device=Gm.device), dtype)
        cols_f = torch.fft.rfft(Gm.T, n=N)  # (n, F): spectra of the columns of G (padded to N)
        skew_f = torch.fft.rfft(self._skew_columns(dtype))  # (r, n, F)
        dG = torch.fft.irfft(torch.linalg.vecdot(skew_f, cols_f, dim=-2), n=N)  # sum_b corr(G e_b, S_i e_b)
        G_conj = torch.fft.rfft(self.G.to(dtype)).conj()  # (r, F)
        P_t = torch.fft.irfft(cols_f * G_conj[:, None], n=N)  # (r, n, N): row b = C(g_i)^T G e_b
        # dH_i[k] = sum_b P_t[i, b, (b + k) mod N] * (1 if b + k < N else -1)
        # buf[i, b, b:b+N] is the window of length N at b * (2N + 1) of buf's rows laid end to end:
        # an unfold view (no as_strided, fine under torch.compile); n <= N, so exactly n windows
        buf = torch.cat([P_t, -P_t], dim=-1).reshape(r, n * 2 * N)
        dH = buf.unfold(-1, N, 2 * N + 1).sum(1)  # (r, n, N) summed over b
        return dG, dH

    @classmethod
    def project(cls, M: torch.Tensor, *, rank: int = 1, steps: int = 300) -> LDR:
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
    opt = lbfgs(list(inst.parameters()), steps)

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
