"""Product forms: structured matrices parameterised as a product of two factors.

Every family here has two parameter vectors ``a`` and ``b`` of the same shape; the zero init
draws ``a`` and sets ``b = 0`` (S = 0, and the gradient flows into b), as LoRA does with B A.
N = max(m, n); an m x n matrix is the top-left corner of an N x N one (x zero-padded to N,
the first m outputs kept).

- ``circulant_product`` / ``skew_circulant_product``: ``S = Z_f(a * b)``, the f-circulant (f = 1
  circulant, f = -1 skew-circulant, see :mod:`surm.structured.circulant`) of the elementwise
  product. ``a, b (1, 1, N)`` (2N parameters), or with ``block_size`` b a grid of blocks
  ``Z_f(a[P, Q] * b[P, Q])``, ``a, b (m/b, n/b, b)`` (2 m n / b parameters). The matrix depends on
  ``a * b`` only: the same set of matrices as the plain circulant, reached through a
  multiplicative parameterisation (each coefficient moves as the product of two numbers).
- ``toeplitz_product``: ``S = T(b) T(a)`` (m x n corner), ``T(v)`` the N x N symmetric
  Toeplitz matrix ``T(v)[i, j] = v[|i - j|]`` (first row v), ``a, b (N,)``: 2N parameters.
  The product is not Toeplitz in general.

Products cost the circulant's FFTs on ``a * b`` for the circulant products, and two symmetric
Toeplitz products by circulant embedding (lengths >= N + n - 1 and N + m - 1, 2-3-5-smooth) for
the Toeplitz product. The Toeplitz product's corner is built in O(m n + N log N) from the
recurrence ``P[i+1, j+1] = P[i, j] + b[i+1] a[j+1] - b[N-1-i] a[N-1-j]`` of ``P = T(b) T(a)``
(the merge of the fused layer, its adjoint and the fitted projection use it).

Projections: the circulant products' is the f-circulant's least-squares fit, split into two
factors (exact, Frobenius-optimal); the Toeplitz product's is a local fit (L-BFGS from two
starts), see :meth:`ToeplitzProduct.project`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ._fft import cyclic_conv, fast_fft_size, fft_dtype
from .base import LinearStructuredMatrix, StructuredMatrix, as_matrix, lbfgs
from .circulant import Circulant, SkewCirculant, _FCirculant, block_layout
from .toeplitz import SymmetricToeplitz

# ---------------------------------------------------------------------------------------------
# circulant products
# ---------------------------------------------------------------------------------------------


class _FCirculantProduct(StructuredMatrix):
    """Shared code of ``Z_f(a * b)``. The f-circulant's layout, product, merge build and adjoint
    are those of :class:`~surm.structured.circulant._FCirculant`, read through :attr:`weight`
    (``a * b``, the coefficients of the f-circulant); autograd and :meth:`param_grads` carry
    the gradient on to a and b."""

    f: ClassVar[int]
    linear: ClassVar[type[_FCirculant]]  # the f-circulant family of the same layout

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
        self.a = nn.Parameter(torch.empty(*grid, b, dtype=dtype, device=device))
        self.b = nn.Parameter(torch.empty(*grid, b, dtype=dtype, device=device))
        self.reset_parameters()

    @property
    def weight(self) -> torch.Tensor:
        """The f-circulant's coefficients ``a * b`` (p, q, block), differentiable (read-only:
        the parameters are a and b)."""
        return self.a * self.b

    # the f-circulant of ``weight``: entries, fast product, O(m n) merge build, adjoint pieces
    layout = _FCirculant.layout
    dense = LinearStructuredMatrix.dense
    _product = _FCirculant._product
    _window_fft_size = _FCirculant._window_fft_size
    _own_period = _FCirculant._own_period
    _window_filter = _FCirculant._window_filter
    _window_product = _FCirculant._window_product
    _block_product = _FCirculant._block_product
    _lags = _FCirculant._lags
    _dense_for_merge = _FCirculant._dense_for_merge
    _merge_into = _FCirculant._merge_into
    adjoint_method = _FCirculant.adjoint_method
    _grad_fft = _FCirculant._grad_fft
    _grad_fft_window = _FCirculant._grad_fft_window
    _grad_fft_blocks = _FCirculant._grad_fft_blocks
    _fold_lags = _FCirculant._fold_lags
    _grad_from_dense = _FCirculant._grad_from_dense

    def knobs(self) -> dict[str, Any]:
        return {"block_size": self.block_size}

    def update_energy(self) -> float:
        """1: at ``b = 0``, ``dS/db[P, Q, k] = a[P, Q, k]`` times the +-1 pattern of wrapped lag k
        in block (P, Q); the patterns split the m n entries between them, so
        ``E = E[a^2] = 1`` (a ~ N(0, 1)). dS/da = 0 there."""
        return 1.0

    def reset_parameters(self, init: str | None = None) -> None:
        """a ~ N(0, 1); b = 0 (``"zero"``) or b ~ N(0, 1/n) (``"random"``: entries a*b of
        variance 1/n)."""
        init = init or self.init
        with torch.no_grad():
            self.a.normal_(0.0, 1.0)
            if init == "zero":
                self.b.zero_()
            else:
                self.b.normal_(0.0, self.in_features**-0.5)

    def param_grads(self, x: torch.Tensor, g: torch.Tensor, *, method: str = "auto") -> tuple[torch.Tensor, ...]:
        """The f-circulant's adjoint for ``w = a * b`` (``method`` as there: ``"fft"``,
        ``"matmul"`` or ``"auto"``), then the chain rule ``(dw * b, dw * a)``. Returns (da, db)."""
        x2, g2 = self._flatten_tokens(x, g)
        method = self._adjoint_route(method, x2)
        dtype = fft_dtype(x2, g2, self.a, self.b)
        if method == "matmul":
            dw = self._grad_from_dense(g2.to(dtype).T @ x2.to(dtype))
        else:
            dw = self._grad_fft(x2, g2, dtype)
        return (dw * self.b.to(dtype)).to(self.a.dtype), (dw * self.a.to(dtype)).to(self.b.dtype)

    @classmethod
    def project(cls, M: torch.Tensor, *, block_size: int | None = None) -> _FCirculantProduct:
        """Frobenius-optimal, like the f-circulant's (only ``a * b`` matters): c = the
        f-circulant's least-squares coefficients, split as ``a = sqrt|c|``,
        ``b = sign(c) sqrt|c|``; where c = 0, a = 1 and b = 0 (no coefficient left with both
        factors 0, where no gradient would reach it)."""
        M = as_matrix(M, cls.name)
        c = cls.linear.project(M, block_size=block_size).weight.detach()
        instance = cls(*M.shape, block_size=block_size, dtype=M.dtype, device=M.device)
        root = c.abs().sqrt()
        with torch.no_grad():
            instance.a.copy_(torch.where(c == 0, torch.ones_like(root), root))
            instance.b.copy_(torch.sign(c) * root)
        return instance


class CirculantProduct(_FCirculantProduct):
    """Circulant ``C(a * b)`` (or a grid of them), parameters a and b. Knob ``block_size``.

    Params: 2 max(m, n) (``block_size=None``) or 2 m n / b. Zero init: b = 0, a ~ N(0, 1).
    """

    name = "circulant_product"
    f = 1
    linear = Circulant


class SkewCirculantProduct(_FCirculantProduct):
    """Skew-circulant ``Z_-1(a * b)`` (or a grid of them), parameters a and b. Knob ``block_size``.

    Params: 2 max(m, n) (``block_size=None``) or 2 m n / b. Zero init: b = 0, a ~ N(0, 1).
    """

    name = "skew_circulant_product"
    f = -1
    linear = SkewCirculant


# ---------------------------------------------------------------------------------------------
# the Toeplitz product
# ---------------------------------------------------------------------------------------------


def _sym_toeplitz_matvec(v: torch.Tensor, w: torch.Tensor, rows: int) -> torch.Tensor:
    """``T(v)[:rows, :cols] @ w`` for w (..., cols), rows and cols <= len(v): the circulant
    embedding ``[v_0 .. v_{rows-1}, 0 .., v_{cols-1} .. v_1]`` of length >= rows + cols - 1."""
    cols = w.shape[-1]
    size = fast_fft_size(rows + cols - 1)
    column = torch.cat([v[:rows], v.new_zeros(size - rows - cols + 1), v[1:cols].flip(-1)])
    return cyclic_conv(torch.fft.rfft(column), w, size)[..., :rows]


def _lag_sums(p: torch.Tensor, w: torch.Tensor, size: int) -> torch.Tensor:
    """``out[k] = sum_{|j - l| = k} p[j] w[l]`` for k < size: the gradient of
    ``p . T(v)[:len(p), :len(w)] w`` with respect to v (a cross-correlation, by FFT)."""
    rows, cols = p.shape[-1], w.shape[-1]
    L = fast_fft_size(rows + cols - 1)
    c = torch.fft.irfft(torch.fft.rfft(p, n=L) * torch.fft.rfft(w, n=L).conj(), n=L)  # lag d at d mod L
    return F.pad(c[:rows], (0, size - rows)) + F.pad(c[L - cols + 1 :].flip(-1), (1, size - cols))


def _diagonal_cumsum(R: torch.Tensor) -> torch.Tensor:
    """``P[i, j] = sum_{t >= 0} R[i - t, j - t]``: prefix sums along the diagonals, O(m n).

    The columns flipped and padded with m zeros, ``(m, n + m)``, read as rows one element
    shorter put entry (i, j) in column ``i + n - 1 - j`` (one column per diagonal) and zeros
    elsewhere; a cumulative sum over the rows, then the inverse shear and flip. A tall R goes
    through its transpose, so that the buffer is ``min(m, n) x (m + n - 1)``.
    """
    m, n = R.shape
    if m > n:  # diagonals stay diagonals under transposition: shear along the shorter side
        return _diagonal_cumsum(R.T).T
    width = n + m - 1
    sheared = F.pad(R.flip(-1), (0, m)).reshape(-1)[: m * width].reshape(m, width)
    summed = sheared.cumsum(0)
    return F.pad(summed.reshape(-1), (0, m)).reshape(m, n + m)[:, :n].flip(-1)


def _diagonal_cumsum_reverse(G: torch.Tensor) -> torch.Tensor:
    """``Q[i, j] = sum_{t >= 0} G[i + t, j + t]``: the adjoint of :func:`_diagonal_cumsum`."""
    return _diagonal_cumsum(G.flip(-2, -1)).flip(-2, -1)


def _toeplitz_product_corner(a: torch.Tensor, b: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """``(T(b) T(a))[:m, :n]`` in O(m n + N log N) (differentiable).

    ``P = T(b) T(a)`` satisfies ``P[i, j] - P[i-1, j-1] = b[i] a[j] - b[N-i] a[N-j]`` for
    i, j >= 1 (shift the summation index of ``sum_k b[|i-k|] a[|k-j|]`` by one: one term
    enters at k = -1, one leaves at k = N - 1). So P is the diagonal prefix sum of R: first
    row ``P[0, j] = (T(a) b)[j]``, first column ``P[i, 0] = (T(b) a)[i]``, inside the rank-2
    matrix ``b[i] a[j] - b[N-i] a[N-j]``.
    """
    row = _sym_toeplitz_matvec(a, b, n)  # P[0, :n]
    col = _sym_toeplitz_matvec(b, a, m)  # P[:m, 0]
    inner = b[1:m, None] * a[None, 1:n] - b.flip(-1)[: m - 1, None] * a.flip(-1)[None, : n - 1]
    R = torch.cat([row[None], torch.cat([col[1:, None], inner], dim=1)], dim=0)
    return _diagonal_cumsum(R)


def _toeplitz_product_corner_vjp(
    a: torch.Tensor, b: torch.Tensor, G: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients (da, db) of ``<G, (T(b) T(a))[:m, :n]>``: the adjoint of
    :func:`_toeplitz_product_corner`, step by step, O(m n + N log N)."""
    m, n = G.shape
    N = a.shape[-1]
    Q = _diagonal_cumsum_reverse(G)  # the cotangent of R
    q_row = Q[0]  # of the first row T(a)[:n] b
    q_col = torch.cat([Q.new_zeros(1), Q[1:, 0]])  # of the first column T(b)[:m] a, below row 0
    inner = Q[1:, 1:]  # of the rank-2 inside
    a_rev, b_rev = a.flip(-1), b.flip(-1)
    da = (
        _lag_sums(q_row, b, N)
        + _sym_toeplitz_matvec(b, q_col, N)
        + F.pad(inner.T @ b[1:m], (1, N - n))
        - F.pad(inner.T @ b_rev[: m - 1], (0, N - n + 1)).flip(-1)
    )
    db = (
        _sym_toeplitz_matvec(a, q_row, N)
        + _lag_sums(q_col, a, N)
        + F.pad(inner @ a[1:n], (1, N - m))
        - F.pad(inner @ a_rev[: n - 1], (0, N - m + 1)).flip(-1)
    )
    return da, db


class ToeplitzProduct(StructuredMatrix):
    """``(T(b) T(a))[:m, :n]``, T(v) the N x N symmetric Toeplitz matrix with first row v,
    N = max(m, n). Parameters ``a, b (N,)``: 2N. No knobs.

    Zero init: ``a ~ N(0, 1)``, b = 0 (as LDR's random factor: at unit variance, so that under
    Adam a step changes a by about lr relative to its size; the adapter's scale, through
    :meth:`update_energy`, about N, sizes the first step). Random init: ``a ~ N(0, 1/N)``,
    ``b ~ N(0, 1/n)``: entries of variance about 1/n.
    """

    name = "toeplitz_product"

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
        self.size = max(self.out_features, self.in_features)
        self.a = nn.Parameter(torch.empty(self.size, dtype=dtype, device=device))
        self.b = nn.Parameter(torch.empty(self.size, dtype=dtype, device=device))
        self.reset_parameters()

    def update_energy(self) -> float:
        """``N + 2 D / (m n)``, ``D = sum_{i < min(m, n)} min(i, N - 1 - i)`` (about
        ``N + 1/2`` for square shapes).

        At b = 0 only b moves: ``dS/db_k`` is the corner of ``T(e_k) T(a)``, whose entry (i, j)
        is ``sum a[|l - j|]`` over the rows l = i +- k in [0, N) (one row l = i for k = 0).
        With a ~ N(0, 1) its mean square is the number of such l, plus 2 where both rows
        exist and read the same coefficient, |i + k - j| = |i - k - j|, i.e. on the diagonal
        i = j for 1 <= k <= min(i, N - 1 - i). Summed over k the rows l cover [0, N) once:
        ``sum_k E||dS/db_k||^2 = m n N + 2 D``.
        """
        m, n, N = self.out_features, self.in_features, self.size
        D = sum(min(i, N - 1 - i) for i in range(min(m, n)))
        return N + 2.0 * D / (m * n)

    def reset_parameters(self, init: str | None = None) -> None:
        init = init or self.init
        with torch.no_grad():
            if init == "zero":
                self.a.normal_(0.0, 1.0)
                self.b.zero_()
            else:
                # an entry sums N products b a: variance N var(a) var(b) = 1/n
                self.a.normal_(0.0, self.size**-0.5)
                self.b.normal_(0.0, self.in_features**-0.5)

    def dense(self) -> torch.Tensor:
        """The reference: both N x N symmetric Toeplitz matrices gathered, multiplied, cropped."""
        N = self.size
        lag = (torch.arange(N).unsqueeze(1) - torch.arange(N).unsqueeze(0)).abs().to(self.a.device)
        return (self.b[lag] @ self.a[lag])[: self.out_features, : self.in_features]

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        """``u = T(a)[:, :n] x`` (length N), then ``y = T(b)[:m] u``: each a circulant embedding
        ``[v_0 .. v_{rows-1}, 0 .., v_{cols-1} .. v_1]`` of length >= rows + cols - 1."""
        dtype = fft_dtype(x, self.a, self.b)
        u = _sym_toeplitz_matvec(self.a.to(dtype), x.to(dtype), self.size)
        return _sym_toeplitz_matvec(self.b.to(dtype), u, self.out_features).to(x.dtype)

    # -- fused-layer support ------------------------------------------------------------
    def _dense_for_merge(self, dtype: torch.dtype) -> torch.Tensor:
        return _toeplitz_product_corner(self.a.to(dtype), self.b.to(dtype), self.out_features, self.in_features)

    def param_grads(self, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``G = g^T x`` (m x n), then the adjoint of the O(m n + N^2) corner build (reverse
        diagonal sums, two Toeplitz matrix-vector products, diagonal sums of two N-wide outer
        products). Returns (da, db)."""
        x2, g2 = self._flatten_tokens(x, g)
        dtype = fft_dtype(x2, g2, self.a, self.b)
        G = g2.to(dtype).T @ x2.to(dtype)
        da, db = _toeplitz_product_corner_vjp(self.a.to(dtype), self.b.to(dtype), G)
        return da.to(self.a.dtype), db.to(self.b.dtype)

    @classmethod
    def project(cls, M: torch.Tensor, *, steps: int = 300) -> ToeplitzProduct:
        """A fitted, locally optimal (not provably optimal) approximation of M: no closed form,
        and the squared error has many local minima (roughly, the ways of splitting the roots
        of the product's symbol between the two factors).

        Two starts, each refined by L-BFGS (strong Wolfe line search, float64, the
        O(m n + N log N) corner build) on ``||S - M||_F^2`` for at most ``steps`` iterations:

        - the best symmetric Toeplitz matrix: a = its least-squares coefficients, b = e_0
          (T(b) = I), b nudged off e_0 by a small perturbation from a local generator;
        - the displacement start (:func:`_displacement_start`), read off the rank-2
          displacement ``M[1:, 1:] - M[:-1, :-1]`` that every member has; for a member of the
          family it lands near the member, which the refinement then recovers.

        The better fit is kept, and never one worse than the symmetric-Toeplitz projection.
        Deterministic. a and b are rescaled to equal norms (S unchanged).
        """
        M = as_matrix(M, cls.name)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"{cls.name}.project: steps must be a non-negative integer, got {steps!r}")
        m, n = M.shape
        target = M.detach().to(torch.float64)
        instance = cls(m, n, dtype=torch.float64, device=M.device)
        N = instance.size

        def loss_of(a: torch.Tensor, b: torch.Tensor) -> float:
            return float((_toeplitz_product_corner(a, b, m, n) - target).pow(2).sum())

        def loss_and_grads(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
            residual = _toeplitz_product_corner(a, b, m, n) - target
            return residual.pow(2).sum(), list(_toeplitz_product_corner_vjp(a, b, 2 * residual))

        a = SymmetricToeplitz.project(target).weight.detach().clone()
        b = torch.zeros(N, dtype=torch.float64, device=M.device)
        b[0] = 1.0
        best, best_loss = (a, b), loss_of(a, b)
        if steps > 0:
            generator = torch.Generator(device="cpu").manual_seed(0)
            nudge = torch.randn(N, generator=generator, dtype=torch.float64).to(M.device)
            starts = [(a, b + 1e-2 * N**-0.5 * nudge)]
            displaced = _displacement_start(target)
            if displaced is not None:
                a_d, b_d = displaced

                def loss_and_grad_a(a: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
                    loss, (da, _) = loss_and_grads(a, b_d)
                    return loss, [da]

                (a_d,) = _lbfgs(loss_and_grad_a, [a_d], steps)  # convex in a for this b: fit a first
                starts.append((a_d, b_d))
            for start in starts:
                fitted = tuple(_lbfgs(loss_and_grads, list(start), steps))
                loss = loss_of(*fitted)
                if loss < best_loss:
                    best, best_loss = fitted, loss
        a, b = best
        with torch.no_grad():
            na, nb = a.norm(), b.norm()
            if na > 0 and nb > 0:
                s = (nb / na).sqrt()
                a, b = a * s, b / s
            instance.a.copy_(a)
            instance.b.copy_(b)
        return instance.to(M.dtype)


def _lbfgs(
    loss_and_grads: Callable[..., tuple[torch.Tensor, list[torch.Tensor]]], start: list[torch.Tensor], steps: int
) -> list[torch.Tensor]:
    """At most ``steps`` L-BFGS iterations (strong Wolfe line search) from copies of ``start``;
    ``loss_and_grads(*tensors)`` returns the loss and its gradients (no autograd graph)."""
    tensors = [t.detach().clone() for t in start]
    opt = lbfgs(tensors, steps)

    def closure() -> torch.Tensor:
        loss, grads = loss_and_grads(*tensors)
        for t, g in zip(tensors, grads):
            t.grad = g
        return loss

    with torch.no_grad():
        opt.step(closure)
    return tensors


def _displacement_start(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(a, b) read off the displacement of M (float64), or None where it says nothing.

    For a tall M (m = N >= n; a wide one is fitted as its transpose, with a and b swapped:
    ``(T(b) T(a))^T = T(a) T(b)``) every member has the displacement
    ``D = M[1:, 1:] - M[:-1, :-1] = u v1^T - (J u) v2^T`` with ``u = b[1:]``, J the flip,
    ``v1 = a[1:n]`` and ``v2 = (a[N-1], .., a[N-n+1])``. Split u into its J-even and J-odd
    parts, ``u = s + t``: then ``(D + J D) / 2 = s (v1 - v2)^T`` and
    ``(D - J D) / 2 = t (v1 + v2)^T``, each of rank one. Their top singular pairs give s and t
    up to one ratio (the overall scale of a against b is free): ``u = x1 + beta x2``,
    ``v1 = (y1 + y2 / beta) / 2``, ``v2 = (y2 / beta - y1) / 2`` (entries of a seen twice
    averaged, unseen ones 0). ``beta`` is picked from a grid (both signs, 1e-3 .. 1e3) by the
    error, on M's first 16 rows and columns, of the matrix with a[0] and b[0] fitted by least
    squares to M's first row and column (where they enter linearly). For a general M the
    same construction uses the top singular pairs, the best rank-one parts.
    """
    m, n = M.shape
    if m < n:
        swapped = _displacement_start(M.T)
        return None if swapped is None else (swapped[1], swapped[0])
    if n < 2:
        return None
    N = m
    D = M[1:, 1:] - M[:-1, :-1]
    pairs = []
    for part in ((D + D.flip(0)) / 2, (D - D.flip(0)) / 2):
        U, sv, Vh = torch.linalg.svd(part, full_matrices=False)
        if not sv[0] > 1e-12 * float(D.norm()):
            return None  # b[1:] (or a's combination) has no even or no odd part: no ratio to fit
        pairs.append((U[:, 0], sv[0] * Vh[0]))
    (x1, y1), (x2, y2) = pairs
    seen = torch.zeros(N, dtype=M.dtype, device=M.device)
    seen[1:n] += 1
    seen[N - n + 1 :] += 1
    k = min(n, 16)
    best, best_loss = None, math.inf
    for beta in [sign * 10.0**k for sign in (1.0, -1.0) for k in torch.linspace(-3, 3, 61).tolist()]:
        u = x1 + beta * x2
        v1, v2 = (y1 + y2 / beta) / 2, (y2 / beta - y1) / 2
        a = (F.pad(v1, (1, N - n)) + F.pad(v2.flip(-1), (N - n + 1, 0))) / seen.clamp_min(1)
        b = F.pad(u, (1, 0))
        # P[0, j] = a0 b[j] + b0 a[j] + C[0, j] (j >= 1), P[i, 0] = a0 b[i] + b0 a[i] + C[i, 0] (i >= 1),
        # C the matrix with a0 = b0 = 0: its first row and column, T(a)[:n] b and T(b) a
        A = torch.stack([torch.cat([b[1:n], b[1:]]), torch.cat([a[1:n], a[1:]])], dim=1)
        r = torch.cat([M[0, 1:] - _sym_toeplitz_matvec(a, b, n)[1:], M[1:, 0] - _sym_toeplitz_matvec(b, a, N)[1:]])
        a0, b0 = torch.linalg.lstsq(A, r[:, None]).solution[:, 0]
        a, b = torch.cat([a0[None], a[1:]]), torch.cat([b0[None], b[1:]])
        # judged on the first rows and columns (a strip of width k: cheap, and where the
        # boundary errors enter before they run down the diagonals)
        loss = float(
            (_toeplitz_product_corner(a, b, k, n) - M[:k]).pow(2).sum()
            + (_toeplitz_product_corner(a, b, N, k) - M[:, :k]).pow(2).sum()
        )
        if loss < best_loss:
            best, best_loss = (a, b), loss
    return best
