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


@functools.lru_cache(maxsize=None)
def fast_fft_size(n: int) -> int:
    """Smallest integer >= n whose only prime factors are 2, 3 and 5 (fast for every FFT backend)."""
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


@functools.lru_cache(maxsize=None)
def _negacyclic_mask_cpu(size: int) -> torch.Tensor:
    k = torch.arange(size + 1)
    return (1 - (-1) ** k).to(torch.float32)


def negacyclic_mask(size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Per-bin factor ``1 - (-1)^k`` (k = 0..size) for an rfft of length ``2*size``.

    The length-2N rfft of ``[x, -x]`` equals the length-2N rfft of ``[x, 0]`` times this mask,
    which turns a length-2N cyclic convolution into the N-point negacyclic convolution
    (the product with a skew-circulant matrix) without concatenating ``[x, -x]``.
    """
    return _negacyclic_mask_cpu(size).to(device=device, dtype=dtype)


def cyclic_conv(coef_f: torch.Tensor, x: torch.Tensor, size: int) -> torch.Tensor:
    """Cyclic convolution with a pre-transformed filter.

    coef_f: rfft of the filter, (..., size//2 + 1), broadcastable against x's transform.
    x: (..., k) real with k <= size (zero-padded to ``size``). Returns (..., size).
    """
    return torch.fft.irfft(torch.fft.rfft(x, n=size) * coef_f, n=size)
