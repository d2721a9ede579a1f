"""The contract every structured matrix family follows.

A family is a ``torch.nn.Module`` holding a few trainable parameters that define a
``(out_features, in_features)`` matrix ``S``:

- ``m(x)``: the fast product ``x @ S.T`` for ``x (..., in_features)`` (``nn.Linear`` orientation);
- ``m.dense()``: the explicit ``(out_features, in_features)`` matrix, differentiable: the reference;
- ``m.num_params``: the number of parameters;
- ``type(m).project(M, **knobs)``: a new instance approximating the dense ``M``.

For the fused LoRA-style layer (:mod:`surm.structured.fused`) every family also has

- ``m.merge(weight, scale)``: ``weight + scale * S`` built in O(m n) without index tensors;
- ``m.param_grads(x, g)``: the adjoint, the gradients of ``sum_t g_t . (S x_t)`` with respect
  to the parameters (in ``m.param_names()`` order) without building ``g^T x`` where a family
  has something cheaper; ``m.dense_param_grads(x, g)`` is the generic reference.
"""

from __future__ import annotations

import abc
import operator
from typing import Any, ClassVar

import torch
from torch import nn

from ._fft import fft_dtype

INIT_MODES = ("zero", "random")


def as_matrix(M: Any, family: str) -> torch.Tensor:
    """``M`` as a 2-D floating tensor (float32 at least), or a ValueError that says what is wrong."""
    if not isinstance(M, torch.Tensor):
        M = torch.as_tensor(M)
    if M.dim() != 2:
        raise ValueError(
            f"{family}.project expects a 2-D matrix of shape (out_features, in_features); "
            f"got a tensor of shape {tuple(M.shape)}. Pass one weight matrix at a time "
            f"(e.g. layer.weight, or M.reshape(out_features, -1) for a batch of them)."
        )
    if not M.is_floating_point():
        M = M.to(torch.get_default_dtype())
    elif M.dtype in (torch.float16, torch.bfloat16):
        M = M.float()
    if M.shape[0] < 1 or M.shape[1] < 1:
        raise ValueError(f"{family}.project got an empty matrix of shape {tuple(M.shape)}")
    return M


def check_positive_int(value: Any, what: str, family: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{family}: {what} must be a positive integer, got {value!r}")
    return value


def lbfgs(params: list[torch.Tensor], steps: int) -> torch.optim.LBFGS:
    """The L-BFGS of the fitted projections: at most ``steps`` iterations, strong Wolfe line
    search, tolerances small enough that the iteration count decides."""
    return torch.optim.LBFGS(params, lr=1.0, max_iter=steps, history_size=20, tolerance_grad=1e-12,
                             tolerance_change=1e-15, line_search_fn="strong_wolfe")


class StructuredMatrix(nn.Module, abc.ABC):
    """Base class of all families. Subclasses set ``name`` and implement the abstract methods.

    Args:
        out_features: m, rows of the matrix (output width).
        in_features: n, columns of the matrix (input width).
        init: ``"zero"`` makes the matrix exactly 0 (the PEFT start; bilinear families zero one
            factor and draw the other at random so that the gradient is not zero);
            ``"random"`` draws every parameter so that entries have variance about 1/n.
    """

    name: ClassVar[str] = "structured"

    def __init__(self, out_features: int, in_features: int, *, init: str = "zero") -> None:
        super().__init__()
        self.out_features = check_positive_int(out_features, "out_features", self.name)
        self.in_features = check_positive_int(in_features, "in_features", self.name)
        if init not in INIT_MODES:
            raise ValueError(f"{self.name}: init must be one of {INIT_MODES}, got {init!r}")
        self.init = init

    # -- the contract -------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features) -> (..., out_features), in x's dtype."""
        self.check_input(x)
        if x.numel() == 0:  # no tokens: FFT backends reject empty batches
            return self._product_without_tokens(x)
        return self._product(x)

    def functional_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``forward`` through plain torch ops only (no custom ``autograd.Function``), so that
        ``torch.func`` transforms apply: the mixed-adapter path vmaps it over the stacked
        parameters of several adapters. Same values as :meth:`forward`."""
        return self.forward(x)

    @abc.abstractmethod
    def _product(self, x: torch.Tensor) -> torch.Tensor:
        """The fast product; x is already checked and holds at least one token."""

    def _product_without_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The product for an x without tokens (a leading dim 0): ``x @ S^T`` with S from the
        O(m n) merge build, so that, as with ``nn.Linear``, the (empty) result is part of the
        graph and backward gives x its empty gradient and the parameters zero gradients."""
        dtype = fft_dtype(x, *self.param_tensors())
        return (x.to(dtype) @ self._dense_for_merge(dtype).T).to(x.dtype)

    @abc.abstractmethod
    def dense(self) -> torch.Tensor:
        """The explicit (out_features, in_features) matrix, differentiable."""

    @abc.abstractmethod
    def reset_parameters(self, init: str | None = None) -> None:
        """Re-initialise in place with ``init`` (default: the mode given at construction)."""

    @classmethod
    @abc.abstractmethod
    def project(cls, M: torch.Tensor, **knobs: Any) -> StructuredMatrix:
        """A new instance, with M's shape, approximating M (see each family)."""

    def knobs(self) -> dict[str, Any]:
        """The family's knobs, enough to rebuild an instance of the same shape and size."""
        return {}

    def update_energy(self) -> float:
        """How strongly the parameters move S, per entry, from the zero init:
        ``E = sum_p ||dS/dp||_F^2 / (m n)`` over the trainable parameters p, in expectation
        over the random factor of a bilinear family (its zero factor is the one that moves).

        A step that moves every parameter by +-lr (Adam's first step) changes S by about
        ``lr * sqrt(m n E)`` in Frobenius norm, so ``1 / sqrt(max(m, n) E)`` puts every family
        and width on the same footing (:mod:`surm.peft.scaling`). 1 for the families whose
        entries are each one parameter; families override it.
        """
        raise NotImplementedError(f"{self.name} does not define update_energy()")

    # -- shared helpers -----------------------------------------------------------------
    @property
    def num_params(self) -> int:
        """Number of (trainable) parameters of the structure."""
        return sum(p.numel() for p in self.parameters())

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def check_input(self, x: torch.Tensor) -> None:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            got = tuple(x.shape)
            raise ValueError(
                f"{self.name} {self.out_features}x{self.in_features}: input of shape {got} has "
                f"{got[-1] if got else 'no'} features in its last dimension, expected "
                f"in_features={self.in_features}. Inputs are (..., in_features) as for nn.Linear."
            )

    # -- fused parallel linear support (see surm.structured.fused) ---------------------
    def param_names(self) -> tuple[str, ...]:
        """Names of the parameters, in the order :meth:`param_grads` returns their gradients."""
        return tuple(name for name, _ in self.named_parameters())

    def param_tensors(self) -> tuple[torch.Tensor, ...]:
        """The current parameter tensors, looked up by name (so that ``torch.func.functional_call``
        substitutes are seen), in :meth:`param_names` order."""
        return tuple(operator.attrgetter(name)(self) for name in self.param_names())

    def _dense_for_merge(self, dtype: torch.dtype) -> torch.Tensor:
        """``dense()`` in ``dtype``; families override this with an O(m n) construction."""
        return self.dense().to(dtype)

    def merge(
        self,
        weight: torch.Tensor,
        scale: float = 1.0,
        *,
        dtype: torch.dtype | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``weight + scale * S`` as a new (out_features, in_features) tensor, or written into
        ``out`` (same shape, in ``dtype``, not overlapping weight; eager, no autograd: the fused
        layer's reused buffer).

        Computed in ``dtype`` (default: the promoted dtype of weight and the parameters, half
        precision raised to float32, so that a bf16 merge rounds once). Differentiable without
        ``out``, but meant for no-grad use (the fused layer, merging an adapter into its base
        weight).
        """
        self._check_merge_shape(weight)
        dtype = dtype or fft_dtype(weight, *self.param_tensors())
        if out is not None:
            with torch.no_grad():
                return self._merge_into(out, weight.to(dtype), scale)
        return torch.add(weight.to(dtype), self._dense_for_merge(dtype), alpha=scale)

    def _check_merge_shape(self, weight: torch.Tensor) -> None:
        if tuple(weight.shape) != self.shape:
            raise ValueError(
                f"{self.name} {self.out_features}x{self.in_features}: cannot merge into a weight of "
                f"shape {tuple(weight.shape)}; expected (out_features, in_features) = {self.shape}"
            )

    def _merge_into(self, out: torch.Tensor, weight: torch.Tensor, scale: float) -> torch.Tensor:
        """``out = weight + scale * S`` (weight already in out's dtype); families override this
        with a single pass over the m x n memory."""
        return torch.add(weight, self._dense_for_merge(out.dtype), alpha=scale, out=out)

    def param_grads(self, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The adjoint: gradients of ``sum_t g_t . (S x_t)`` with respect to the parameters.

        x (..., in_features) and g (..., out_features) with the same leading dims (tokens,
        flattened). Returns one tensor per parameter, in :meth:`param_names` order, each in
        its parameter's dtype. This default is :meth:`dense_param_grads`; families override
        it with a cheaper adjoint (FFT correlations, reshapes and small matmuls).
        """
        return self.dense_param_grads(x, g)

    def dense_param_grads(self, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Generic adjoint, correct for every family: ``G = g^T x`` (m x n), then the
        vector-Jacobian product of :meth:`dense` with G. The reference in tests, and the
        fallback of families without a specialised adjoint. Costs a (m x T) @ (T x n) matmul
        plus the backward of ``dense()``."""
        x2, g2 = self._flatten_tokens(x, g)
        params = self.param_tensors()
        dtype = fft_dtype(x2, g2, *params)
        G = g2.to(dtype).T @ x2.to(dtype)
        detached = [p.detach().requires_grad_(True) for p in params]
        with torch.enable_grad():
            D = self._dense_with(detached)
            grads = torch.autograd.grad(D, detached, G.to(D.dtype), allow_unused=True)
        return tuple(
            (torch.zeros_like(p) if gr is None else gr.to(p.dtype)) for p, gr in zip(params, grads)
        )

    def _dense_with(self, params: list[torch.Tensor]) -> torch.Tensor:
        """``dense()`` evaluated with ``params`` substituted for the parameters."""
        substitutes = {f"S.{k}": v for k, v in zip(self.param_names(), params)}
        return torch.func.functional_call(_DenseOf(self), substitutes, ())

    def _flatten_tokens(self, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_input(x)
        if g.shape[-1] != self.out_features or g.shape[:-1] != x.shape[:-1]:
            raise ValueError(
                f"{self.name} {self.out_features}x{self.in_features}: output gradient of shape "
                f"{tuple(g.shape)} does not match input of shape {tuple(x.shape)}; expected "
                f"{(*x.shape[:-1], self.out_features)}"
            )
        return x.reshape(-1, self.in_features), g.reshape(-1, self.out_features)

    def _adjoint_route(self, method: str, x2: torch.Tensor) -> str:
        """The route of ``param_grads(..., method=...)`` for families with an ``"fft"`` and a
        ``"matmul"`` adjoint: ``method`` checked, ``"auto"`` resolved by ``adjoint_method``.
        Without tokens always ``"matmul"``: ``g^T x`` is then exactly 0 (an empty matmul), and
        the FFT routes would transform an empty batch in chunks of 0 rows."""
        if method not in ("auto", "fft", "matmul"):
            raise ValueError(f"{self.name}.param_grads: method must be 'auto', 'fft' or 'matmul', got {method!r}")
        tokens = x2.shape[0]
        if tokens == 0:
            return "matmul"
        return self.adjoint_method(tokens, x2.device) if method == "auto" else method

    def _param_options(self) -> dict[str, Any]:
        p = next(self.parameters())
        return {"dtype": p.dtype, "device": p.device}

    def extra_repr(self) -> str:
        knobs = "".join(f", {k}={v!r}" for k, v in self.knobs().items())
        return f"out_features={self.out_features}, in_features={self.in_features}{knobs}, params={self.num_params}"


class LinearStructuredMatrix(StructuredMatrix):
    """A family whose matrix is linear in one parameter tensor ``weight``, with every entry
    equal to ``+-`` one parameter or 0 (circulant, skew-circulant, Toeplitz, symmetric Toeplitz).

    Subclasses describe that map with :meth:`layout`; ``dense`` gathers through it and the
    least-squares ``project`` follows from it: each parameter is the signed mean of the
    entries of M it appears in, which makes the residual orthogonal to the whole family.
    """

    weight: nn.Parameter

    @abc.abstractmethod
    def layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(index, sign), both (out_features, in_features): entry (i, j) of the matrix is
        ``sign[i, j] * weight.flatten()[index[i, j]]``; sign 0 marks an entry that is always 0."""

    def update_energy(self) -> float:
        """1: every entry of S is +-one parameter (entries fixed at 0 aside, which the
        rectangular families do not have)."""
        return 1.0

    def dense(self) -> torch.Tensor:
        index, sign = self.layout()
        flat = self.weight.reshape(-1)
        return flat[index.to(flat.device)] * sign.to(device=flat.device, dtype=flat.dtype)

    def reset_parameters(self, init: str | None = None) -> None:
        init = init or self.init
        with torch.no_grad():
            if init == "zero":
                self.weight.zero_()
            else:
                self.weight.normal_(0.0, self.in_features**-0.5)

    @classmethod
    def _fit_linear(cls, M: torch.Tensor, instance: LinearStructuredMatrix) -> LinearStructuredMatrix:
        """Set ``instance.weight`` to the least-squares fit of M (Frobenius-optimal)."""
        index, sign = instance.layout()
        index, sign = index.reshape(-1).to(M.device), sign.reshape(-1).to(M.device, M.dtype)
        size = instance.weight.numel()
        total = torch.zeros(size, dtype=M.dtype, device=M.device).index_add_(0, index, sign * M.reshape(-1))
        count = torch.zeros(size, dtype=M.dtype, device=M.device).index_add_(0, index, sign.abs())
        with torch.no_grad():
            instance.weight.copy_((total / count.clamp_min(1)).reshape(instance.weight.shape))
        return instance


class _DenseOf(nn.Module):
    """Wraps a family so that ``torch.func.functional_call`` can evaluate its ``dense()``."""

    def __init__(self, S: StructuredMatrix) -> None:
        super().__init__()
        self.S = S

    def forward(self) -> torch.Tensor:
        return self.S.dense()
