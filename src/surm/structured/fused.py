"""The fused LoRA-style (parallel) structured layer: ``y = x W0^T + b0 + scale * S x``.

Two ways to compute the same thing:

- plain (:func:`plain_parallel_linear`): ``F.linear(x, W0, b0) + scale * S(x)``. The base matmul,
  plus the structured product and its autograd graph (FFTs per token, their intermediates saved).
- fused (:func:`fused_parallel_linear`): ``F.linear(x, W0 + scale * S, b0)``. ``W_eff`` is built
  in O(m n) per call, independent of the tokens, and used for one matmul forward and one
  backward (``dx = g W_eff``); the structured parameters get their gradient from the family's
  adjoint ``S.param_grads(x, g)`` (FFT correlations summed over tokens in the frequency domain,
  small matmuls for Kronecker, ...). Only x and the parameters are saved; W_eff is rebuilt in
  backward (cheaper in memory than keeping an m x n matrix per layer). On the CPU a W_eff of
  32 MiB or more is written into the caller's :class:`MergeWorkspace`, one buffer per thread
  (a ``SurmLayer`` holds the shared one of its shape; without one, a fresh tensor per call).

The fused path is exact only when S sees the same input as W0: **with dropout > 0 in training
the structured branch sees ``dropout(x)`` and the plain path must be used.** In eval mode, or
with dropout 0, both are the same function; :func:`prefer_fused` says which is faster.
"""

from __future__ import annotations

import itertools
import threading
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ._fft import fft_dtype
from .base import StructuredMatrix

__all__ = [
    "MergeWorkspace",
    "fused_parallel_linear",
    "parallel_linear",
    "plain_parallel_linear",
    "prefer_fused",
    "release_merge_workspaces",
]


class _Call(nn.Module):
    """Calls ``S.<method>`` so that ``torch.func.functional_call`` can substitute parameters."""

    def __init__(self, S: StructuredMatrix, method: str) -> None:
        super().__init__()
        self.S = S
        self.method = method

    def forward(self, *args, **kwargs):
        return getattr(self.S, self.method)(*args, **kwargs)


def _call_with(S: StructuredMatrix, params: tuple[torch.Tensor, ...], method: str, *args, **kwargs):
    """``S.<method>(*args, **kwargs)`` evaluated with ``params`` as S's parameters (a no-op swap
    when they already are, the usual case)."""
    current = S.param_tensors()
    if len(current) == len(params) and all(a is b for a, b in zip(current, params)):
        return getattr(S, method)(*args, **kwargs)
    substitutes = {f"S.{name}": p for name, p in zip(S.param_names(), params)}
    return torch.func.functional_call(_Call(S, method), substitutes, args, kwargs)


#: merged weights from this size on use a workspace's buffer: glibc returns allocations of 32 MiB
#: and more to the system when they are freed, so each fresh one page-faults; smaller ones are
#: recycled by the allocator and gain nothing from a held buffer
_WORKSPACE_MIN_BYTES = 1 << 25


class MergeWorkspace:
    """Reused CPU buffers for the fused path's merged weight ``W0 + scale * S``: one per thread.

    The merged weight lives only inside one forward or backward call, but a fresh m x n tensor
    costs a page fault per 4 KiB on the CPU (large allocations are returned to the system on
    free): at 11008 x 4096 that is about as long as the merge itself. A workspace keeps, for each
    thread that used it, one buffer of the last (shape, dtype) merged (another shape or dtype
    replaces it): m * n elements of the merge dtype per thread. Threads never share a buffer, so
    two threads may run the same layer at once. A thread's buffer is freed when the thread ends,
    when :meth:`release` is called, or with the workspace (when nothing references it any more).

    Whoever passes the workspace to :func:`fused_parallel_linear` owns it: a ``SurmLayer`` holds
    :meth:`shared` one for its weight's shape, so that layers of one shape share one buffer per
    thread and the buffers go with the last such layer (``del model; gc.collect()``).
    """

    def __init__(self, key: tuple[int, ...] | None = None) -> None:
        #: the shape this workspace is shared for (:meth:`shared`), or None for a private one
        self.key = key
        self._local = threading.local()
        self._held: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()
        self._made = itertools.count()

    @classmethod
    def shared(cls, shape: tuple[int, int]) -> MergeWorkspace:
        """The process's workspace for merged weights of ``shape`` (m, n), made on first request
        and kept only while something (a layer) references it."""
        key = tuple(int(d) for d in shape)
        with _SHARED_LOCK:
            workspace = _SHARED.get(key)
            if workspace is None:
                workspace = _SHARED[key] = cls(key)
            return workspace

    def buffer(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """This thread's uninitialised CPU buffer of ``shape`` and ``dtype``, made on first use
        (or when the shape or dtype changed) and returned again on later calls."""
        held = getattr(self._local, "buffer", None)
        if held is None or held.shape != shape or held.dtype != dtype:
            self._local.buffer = None  # free the old one before making the new one
            with torch.inference_mode(False):  # a buffer first made in inference mode could not be written later
                held = torch.empty(shape, dtype=dtype)
            self._local.buffer = held
            self._held[next(self._made)] = held
        return held

    def release(self) -> None:
        """Drop every thread's buffer (a call running now keeps its own until it returns); the
        next merge makes a new one."""
        self._local = threading.local()

    def held_bytes(self) -> int:
        """Bytes of the buffers this workspace holds, over all threads."""
        return sum(t.numel() * t.element_size() for t in list(self._held.values()))

    def __reduce__(self):
        # buffers are scratch, not state: a deep copy or an unpickled model gets the shared
        # workspace of its shape (a private one: an empty one of its own)
        return (type(self).shared, (self.key,)) if self.key is not None else (type(self), ())


_SHARED: weakref.WeakValueDictionary[tuple[int, ...], MergeWorkspace] = weakref.WeakValueDictionary()
_SHARED_LOCK = threading.Lock()


def release_merge_workspaces() -> int:
    """Free the buffers of every shared :class:`MergeWorkspace` in this process (those of the
    layers still alive; a deleted model's went with it). Returns the bytes released. The fused
    path makes new buffers on its next call; use it after a run whose layers you keep, e.g.
    before a long evaluation with the plain path or after training with many threads."""
    with _SHARED_LOCK:
        workspaces = list(_SHARED.values())
    released = 0
    for workspace in workspaces:
        released += workspace.held_bytes()
        workspace.release()
    return released


def _merged(S: StructuredMatrix, params: tuple[torch.Tensor, ...], weight: torch.Tensor, scale: float,
            x: torch.Tensor, workspace: MergeWorkspace | None) -> torch.Tensor:
    """``W0 + scale * S`` in x's dtype: for a large weight on the CPU (eager, merge dtype = x's)
    with a ``workspace``, in the thread's buffer of it, which the caller must be done with before
    the next merge through that workspace."""
    dtype = fft_dtype(weight, *params)
    small = weight.numel() * dtype.itemsize < _WORKSPACE_MIN_BYTES
    if workspace is None or small or x.device.type != "cpu" or dtype != x.dtype or torch.compiler.is_compiling():
        return _call_with(S, params, "merge", weight, scale).to(x.dtype)
    return _call_with(S, params, "merge", weight, scale, out=workspace.buffer(weight.shape, dtype))


class FusedParallelLinear(torch.autograd.Function):
    """``F.linear(x, weight + scale * S.dense(), bias)`` with a structure-aware backward.

    Inputs: x (..., n), weight (m, n), bias (m,) or None, scale (float), S, a
    :class:`MergeWorkspace` or None, then S's parameters (in ``S.param_names()`` order, so that
    autograd sees them). Saves x (its own dtype), weight
    and the parameters; no FFT intermediates, no m x n matrix.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, scale, S, workspace, *params):
        W_eff = _merged(S, params, weight, scale, x, workspace)
        y = F.linear(x, W_eff, None if bias is None else bias.to(x.dtype))
        ctx.S = S
        ctx.scale = scale
        ctx.workspace = workspace
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(x, weight, *params)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, weight, *params = ctx.saved_tensors
        params = tuple(params)
        S, scale = ctx.S, ctx.scale
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_p = ctx.needs_input_grad[6:]
        n, m = x.shape[-1], grad_y.shape[-1]
        g2 = grad_y.reshape(-1, m)
        x2 = x.reshape(-1, n)
        grad_x = grad_w = grad_b = None
        if need_x:
            W_eff = _merged(S, params, weight, scale, x, ctx.workspace)
            grad_x = (g2.to(x.dtype) @ W_eff).reshape(x.shape)
            del W_eff
        if need_w:
            grad_w = (g2.T @ x2.to(g2.dtype)).to(weight.dtype)
        if need_b:
            grad_b = g2.sum(0).to(ctx.bias_dtype)
        grad_p = [None] * len(params)
        if any(need_p):
            grads = _call_with(S, params, "param_grads", x2, g2)
            # out of place: a fresh tensor with the parameter's own strides (a slice of an FFT
            # buffer has others, which DDP's gradient buckets warn about)
            grad_p = [gr * scale if need else None for gr, need in zip(grads, need_p)]
        return (grad_x, grad_w, grad_b, None, None, None, *grad_p)


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, S: StructuredMatrix,
           workspace: MergeWorkspace | None = None) -> None:
    if workspace is not None and not isinstance(workspace, MergeWorkspace):
        raise TypeError(
            f"parallel linear: workspace must be a surm.structured.MergeWorkspace or None, not "
            f"{type(workspace).__name__}"
        )
    m, n = S.shape
    if tuple(weight.shape) != (m, n):
        raise ValueError(
            f"parallel linear: weight of shape {tuple(weight.shape)} does not match the "
            f"{S.name} {m}x{n} update; expected (out_features, in_features) = {(m, n)}"
        )
    if bias is not None and tuple(bias.shape) != (m,):
        raise ValueError(f"parallel linear: bias of shape {tuple(bias.shape)}, expected ({m},) or None")
    S.check_input(x)


def fused_parallel_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    S: StructuredMatrix,
    scale: float,
    *,
    workspace: MergeWorkspace | None = None,
) -> torch.Tensor:
    """``y = F.linear(x, weight + scale * S.dense(), bias)``, fast: see the module docstring.

    x (..., in_features) in any float dtype (bf16/fp16 fine: the FFT work of the backward runs
    in a float32 island); weight (out_features, in_features) and bias, frozen or not (their
    gradients ``g^T x`` and ``sum g`` are returned when they require grad); S any family;
    scale a Python float. y has x's dtype, every gradient its input's dtype. ``workspace``: where
    a merged weight of 32 MiB or more is written on the CPU (one buffer per thread, see
    :class:`MergeWorkspace`); None makes a fresh one per call.

    Use it only where S sees the same input as weight: **not with dropout > 0 in training**
    (there the structured branch sees ``dropout(x)``; use :func:`plain_parallel_linear`).
    """
    _check(x, weight, bias, S, workspace)
    return _fused(x, weight, bias, S, scale, workspace)


def _fused(x, weight, bias, S, scale, workspace=None):
    """:func:`fused_parallel_linear` without the input checks."""
    if torch.compiler.is_compiling():
        workspace = None  # a compiled graph allocates its own merged weight
    return FusedParallelLinear.apply(x, weight, bias, float(scale), S, workspace, *S.param_tensors())


def plain_parallel_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, S: StructuredMatrix, scale: float
) -> torch.Tensor:
    """``F.linear(x, weight, bias) + scale * S(x)``: the reference, and the path to take with
    dropout (pass ``dropout(x)`` to S yourself: ``F.linear(x, W, b) + scale * S(drop(x))``)."""
    _check(x, weight, bias, S)
    return _plain(x, weight, bias, S, scale)


def _plain(x, weight, bias, S, scale):
    """:func:`plain_parallel_linear` without the input checks."""
    return F.linear(x, weight, bias) + scale * S(x)


# Fitted to the crossovers measured by ``surm bench fused --policy`` (docs/fused_policy.md):
# the fused path is preferred from k * min(sqrt(m * n), cap) tokens on; training = forward +
# backward, inference = forward only. k comes from the MiniLM-size shapes (sqrt(m n) 240 to
# 768), the cap from Llama-2-7B's FFN shapes, where the crossover no longer grows with the
# shape (both paths' per-token work grows as fast as the O(m n) merge there).
_TRAIN_TOKENS_PER_SQRT_MN = {
    "circulant": 0.45,
    "skew_circulant": 0.45,
    "toeplitz": 0.28,
    "symmetric_toeplitz": 0.29,
    "kronecker": 0.46,
    "ldr": 0.6,
    "low_rank": 0.83,
}
_EVAL_TOKENS_PER_SQRT_MN = {
    "circulant": 0.29,
    "skew_circulant": 0.29,
    "toeplitz": 0.11,
    "symmetric_toeplitz": 0.14,
    "kronecker": 0.24,
    "ldr": 0.4,
    "low_rank": 0.46,
}
#: sqrt(m n) above which the crossover stays at its value there (training, inference), for
#: the families whose merge is a plain O(m n) pass (LDR's builds its columns by FFTs: uncapped)
_TRAIN_SQRT_MN_CAP = 1024
_EVAL_SQRT_MN_CAP = 2048
_CAPPED = ("circulant", "skew_circulant", "toeplitz", "symmetric_toeplitz", "kronecker")


def prefer_fused(
    S: StructuredMatrix, tokens: int, device: torch.device | str = "cpu", *, backward: bool = True
) -> bool:
    """Whether :func:`fused_parallel_linear` is expected to beat :func:`plain_parallel_linear`
    for ``tokens`` rows (the product of x's leading dims) on ``device``.

    Only ask where fusing is allowed: **not with dropout > 0 in training** (the structured
    branch then sees ``dropout(x)``, the base weight x; use the plain path).

    Both paths do the same base matmuls. The fused one adds O(m n) work per call (building
    ``W0 + scale * S``; twice when training) and replaces the per-token structured product and
    its autograd backward by the adjoint (:meth:`StructuredMatrix.param_grads`). It wins from
    some number of tokens on. Rule: fused iff ``tokens >= k * min(sqrt(m * n), cap)``, k per
    family (training when ``backward``, else inference; 0.5 for a family without one), cap per
    mode (none for LDR, low-rank and the product families: ``k * sqrt(m * n)``), fitted to the
    crossovers that ``surm bench fused --policy`` measured on a CPU at MiniLM's shapes (k) and
    Llama-2-7B's FFN shapes (cap); the measurements and the fit are in docs/fused_policy.md.
    Near the crossover both paths are within about 20 %; far from it the choice matters (fused
    costs 1.5-10x plain at 4-16 tokens). On devices other than CPU the same rule is used; it
    was not measured there.
    """
    m, n = S.shape
    table, cap = (
        (_TRAIN_TOKENS_PER_SQRT_MN, _TRAIN_SQRT_MN_CAP) if backward else (_EVAL_TOKENS_PER_SQRT_MN, _EVAL_SQRT_MN_CAP)
    )
    k = table.get(S.name, 0.5)
    size = (m * n) ** 0.5
    return tokens >= k * (min(size, cap) if S.name in _CAPPED else size)


def parallel_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    S: StructuredMatrix,
    scale: float,
    *,
    fused: bool | None = None,
    workspace: MergeWorkspace | None = None,
) -> torch.Tensor:
    """``F.linear(x, weight, bias) + scale * S(x)`` by the faster path (``fused=None``: ask
    :func:`prefer_fused`, with ``backward`` = whether autograd will need this graph). Without
    dropout only (see the module docstring). ``workspace``: the fused path's merge buffers (see
    :func:`fused_parallel_linear`)."""
    _check(x, weight, bias, S, workspace)  # first: a 0-dim x has no x.shape[-1]
    if fused is None:
        tokens = x.numel() // x.shape[-1]
        backward = torch.is_grad_enabled() and (
            x.requires_grad or weight.requires_grad or any(p.requires_grad for p in S.parameters())
        )
        fused = prefer_fused(S, tokens, x.device, backward=backward)
    return _fused(x, weight, bias, S, scale, workspace) if fused else _plain(x, weight, bias, S, scale)
