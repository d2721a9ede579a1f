"""FFT helpers shared by the FFT-based families.

torch has no bf16/fp16 FFT on most devices, so every FFT product runs in an explicit float32
(or float64) island: inputs are upcast with :func:`fft_dtype`, the product is computed, and
the caller casts back to the input's dtype.
"""

from __future__ import annotations

import functools

import torch

_HALF_DTYPES = (torch.float16, torch.bfloat16)


def fft_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The real dtype to compute FFTs in: the promoted dtype, half precision raised to float32."""
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
    return torch.float32 if dtype in _HALF_DTYPES else dtype


#: How much slower per point an FFT of a length with a prime factor above 5 is than a 2-3-5-smooth
#: one, about (2048 rows, one thread: length 11008 = 2^8 * 43 against 12288 and 15360).
NON_SMOOTH_FFT_FACTOR = 1.6


def lag_fft_size(rows: int, cols: int, period: int | None = None) -> int:
    """The FFT length for products with the ``rows x cols`` Toeplitz window ``T[i, j] = t[i - j]``.

    Any cyclic length L >= rows + cols - 1 holds every lag once (the circulant embedding); the
    smallest 2-3-5-smooth one is the candidate. A window of a circulant of size ``period``
    (lags that differ by ``period`` are the same coefficient) may also use L = ``period``
    itself, exact as well; it is taken when cheaper by :func:`fft_cost` (a period with a
    large prime factor, such as 11008 = 2^8 * 43, can lose to a longer smooth length).
    """
    embed = fast_fft_size(rows + cols - 1)
    if period is None or period < max(rows, cols):
        return embed
    return period if fft_cost(period) <= fft_cost(embed) else embed


def embedded_filter(lags: torch.Tensor, rows: int, cols: int, size: int) -> torch.Tensor:
    """The first column (..., size) of the size-``size`` circulant whose top-left ``rows x cols``
    corner is ``T[i, j] = lags[..., i - j + cols - 1]`` (lags (..., rows+cols-1), size >=
    rows + cols - 1): lags 0..rows-1, zeros, lags -(cols-1)..-1."""
    zeros = lags.new_zeros(*lags.shape[:-1], size - (rows + cols - 1))
    return torch.cat([lags[..., cols - 1 :], zeros, lags[..., : cols - 1]], dim=-1)


def lags_from_correlation(r: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The inverse of :func:`embedded_filter` on a cyclic correlation ``r (..., size)``: its
    lags -(cols-1)..rows-1, (..., rows+cols-1)."""
    size = r.shape[-1]
    return torch.cat([r[..., size - cols + 1 :], r[..., :rows]], dim=-1)


def fast_fft_size(n: int) -> int:
    """Smallest integer >= n whose only prime factors are 2, 3 and 5 (fast for every FFT backend)."""
    if torch.compiler.is_compiling():  # traced once: no cache (dynamo warns about lru_cache)
        return _fast_fft_size.__wrapped__(n)
    return _fast_fft_size(n)


@functools.cache
def _fast_fft_size(n: int) -> int:
    if n < 1:
        raise ValueError(f"FFT size must be positive, got {n}")
    m = n
    while True:
        k = m
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        if k == 1:
            return m
        m += 1


def _negacyclic_mask(size: int, device: torch.device | None = None) -> torch.Tensor:
    k = torch.arange(size + 1, device=device)
    return (1 - (-1) ** k).to(torch.float32)


@functools.cache
def _negacyclic_mask_cpu(size: int) -> torch.Tensor:
    # Built outside inference mode: the cache is process-global, and a tensor first made under
    # torch.inference_mode() would be an inference tensor, which autograd refuses to save for
    # backward in every later training step at this size.
    with torch.inference_mode(False):
        return _negacyclic_mask(size)


def negacyclic_mask(size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Per-bin factor ``1 - (-1)^k`` (k = 0..size) for an rfft of length ``2*size``.

    The length-2N rfft of ``[x, -x]`` equals the length-2N rfft of ``[x, 0]`` times this mask,
    which turns a length-2N cyclic convolution into the N-point negacyclic convolution
    (the product with a skew-circulant matrix) without concatenating ``[x, -x]``.
    Cached per size (on CPU, in float32); under torch.compile built in the graph instead.
    """
    if torch.compiler.is_compiling():
        return _negacyclic_mask(size, device).to(dtype)
    return _negacyclic_mask_cpu(size).to(device=device, dtype=dtype)


def cyclic_conv(coef_f: torch.Tensor, x: torch.Tensor, size: int) -> torch.Tensor:
    """Cyclic convolution with a pre-transformed filter.

    coef_f: rfft of the filter, (..., size//2 + 1), broadcastable against x's transform.
    x: (..., k) real with k <= size (zero-padded to ``size``). Returns (..., size).
    """
    return torch.fft.irfft(torch.fft.rfft(x, n=size) * coef_f, n=size)


# -- helpers of the adjoints (``param_grads``) and of the fast dense builds ----------------------

# Cost units by which an adjoint picks its FFT or its matmul route: about 0.2 ns per
# (size * log2 size) per token for a batched real FFT, 12 ps per matmul multiply-add (only
# their ratio matters), measured on a CPU: docs/fused_policy.md (``surm bench ops --cost-model``
# measures both).
FFT_NS_PER_UNIT = 0.2
MATMUL_NS_PER_MAC = 0.012


def fft_cost(size: int, transforms: float = 1.0) -> float:
    """Estimated ns per token of ``transforms`` real FFTs of length ``size`` (CPU); lengths
    with a prime factor above 5 cost :data:`NON_SMOOTH_FFT_FACTOR` times more."""
    smooth = 1.0 if fast_fft_size(size) == size else NON_SMOOTH_FFT_FACTOR
    return transforms * smooth * FFT_NS_PER_UNIT * size * max(1.0, size.bit_length() - 0.5)


def matmul_cost(macs: float) -> float:
    """Estimated ns of ``macs`` float32 multiply-adds in a large matmul (CPU)."""
    return MATMUL_NS_PER_MAC * macs


def chunk_rows(size: int, budget: int = 1 << 17) -> int:
    """Rows per chunk for token-chunked FFT loops: keeps buffers around ``budget`` elements
    (in cache, and bounding the transient memory of an adjoint independently of the tokens)."""
    return max(64, budget // max(size, 1))


class ZeroPadder:
    """Copies row chunks into a reused zero-filled buffer of width ``size`` (the tail stays 0).

    Cheaper than ``rfft(x, n=size)`` or ``F.pad`` on CPU, which zero a fresh buffer per call;
    the copy also performs the cast into the FFT island's dtype.
    """

    def __init__(
        self, shape_tail: tuple[int, ...], size: int, rows: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.buf = torch.zeros(rows, *shape_tail, size, dtype=dtype, device=device)
        self.size = size

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows, width = x.shape[0], x.shape[-1]
        if width == self.size and x.dtype == self.buf.dtype:
            return x  # nothing to pad or cast
        view = self.buf[:rows]
        if width == self.size:
            view.copy_(x)
        else:
            view[..., :width].copy_(x)
        return view


def cross_correlation(x2: torch.Tensor, g2: torch.Tensor, size: int, dtype: torch.dtype) -> torch.Tensor:
    """The cyclic cross-correlation ``irfft(sum_t rfft(g_t) conj(rfft(x_t)), n=size)`` of the
    rows of ``x2`` (T, n) and ``g2`` (T, m), each zero-padded to ``size`` >= max(m, n), computed
    in ``dtype`` over token chunks (memory bounded independently of T). Returns (size,): lag k
    holds ``sum_t sum_j g_t[(j + k) mod size] x_t[j]``."""
    T = x2.shape[0]
    rows = min(T, chunk_rows(size))
    pad_x = ZeroPadder((), size, rows, dtype, x2.device)
    pad_g = ZeroPadder((), size, rows, dtype, x2.device)
    acc = None
    for s in range(0, T, rows):
        x_f = torch.fft.rfft(pad_x(x2[s : s + rows]))
        g_f = torch.fft.rfft(pad_g(g2[s : s + rows]))
        part = torch.linalg.vecdot(x_f, g_f, dim=0)  # sum_t conj(X_t) G_t
        acc = part if acc is None else acc + part
    return torch.fft.irfft(acc, n=size)


def diagonal_sums(M: torch.Tensor) -> torch.Tensor:
    """Sums along the diagonals of ``M (..., m, n)``: out[..., d + n - 1] = sum_{i-j=d} M[..., i, j].

    O(mn), no index tensors, no writes into views (so torch.compile can functionalize it).
    M padded with m zero columns and one zero row, ``P (m+1, n+m)``, is read in memory order as
    rows one element longer, of n+m+1: entry (i, j), at flat position
    ``i (n+m) + j = i (n+m+1) + (j - i)``, lands in column ``(j - i) mod (n+m+1)``, lags
    j - i >= 0 in columns 0..n-1 and lags < 0 wrapped into columns n+2..n+m (the padding fills
    the rest with zeros). The first m such rows hold every entry of M, and their column sums
    are the diagonal sums. One padded copy of M (the former zero buffer written through an
    ``as_strided`` view cannot be compiled).
    """
    *batch, m, n = M.shape
    width = n + m + 1
    P = torch.nn.functional.pad(M, (0, m, 0, 1))  # (..., m+1, n+m)
    sheared = P.reshape(*batch, (m + 1) * (n + m))[..., : m * width].reshape(*batch, m, width)
    by_lag = sheared.sum(-2)  # column c: lag j - i = c for c < n, c - width for c > n + 1
    return torch.cat([by_lag[..., n + 2 :], by_lag[..., :n]], dim=-1).flip(-1)


def toeplitz_from_lags(v: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The (rows x cols) matrix ``T[i, j] = v[..., i - j + cols - 1]`` (v (..., rows+cols-1)):
    a strided window view plus one flip, O(rows * cols)."""
    return v.unfold(-1, cols, 1).flip(-1)


def add_toeplitz_(out: torch.Tensor, weight: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """``out = weight + scale * toeplitz_from_lags(v, m, n)`` for weight and out (m, n), v (m+n-1),
    in one pass over the m x n memory (eager only; out must not overlap weight).

    Row i of the Toeplitz matrix is the reversed window ``rev[m-1-i : m-1-i+n]`` of
    ``rev = v.flip()``: a block of rows is a row-flipped slice of ``rev.unfold``, flipped in
    blocks small enough to stay in cache instead of materialising the whole flipped matrix.
    """
    m, n = weight.shape
    windows = v.flip(-1).unfold(-1, n, 1)  # (m, n): row k is row m-1-k of the Toeplitz matrix
    block = max(1, (1 << 18) // n)
    for i0 in range(0, m, block):
        i1 = min(m, i0 + block)
        torch.add(weight[i0:i1], windows[m - i1 : m - i0].flip(0), alpha=scale, out=out[i0:i1])
    return out
