"""Mixed-adapter batches: ``model(x, adapter_names=[...])``, each row through its own adapter.

PEFT's contract (as for LoRA): ``adapter_names`` has one name per row of the batch, an adapter
of the model or ``"__base__"`` for the base model alone; it is passed to ``forward`` or
``generate`` of the ``PeftModel`` in eval mode, with no adapter merged. A row uses its adapter
alone, whatever the active adapters are; in a layer its adapter does not target, a row gets the
base layer's output.

One gathered pass per layer, not a loop over adapters: the base layer runs once on the whole
batch; the adapters in the batch whose tensors have the same layout (family, knobs, placement,
activation, dtype: in practice all of them) have their parameters stacked and gathered per row,
and one ``torch.func.vmap`` of the family's product over the rows computes every row's update.
A circulant adapter is then one batched FFT with a spectrum per row, Kronecker and low-rank
factors batched matmuls, and so on; a batch with k distinct adapters costs about what one
adapter costs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn
from torch.func import functional_call, vmap

if TYPE_CHECKING:
    from .layer import SurmLayer
    from .model import SurmModel

BASE = "__base__"


@contextmanager
def adapter_names_hooks(
    tuner: SurmModel, adapter_names: Sequence[str] | None, num_beams: Any = None
) -> Iterator[None]:
    """While active, every SURM layer (and every ``modules_to_save`` wrapper) of ``tuner``
    receives ``adapter_names`` in its forward: what ``PeftModel.forward`` / ``generate`` enter
    around the base model's call. Checks the names first (PEFT's errors); with beam search
    (``num_beams > 1``) each name is repeated per beam, as the inputs are, except in an
    encoder, which sees the original rows."""
    if adapter_names is None:
        yield
        return
    names = RowAdapters(check_adapter_names(tuner, adapter_names))
    per_row = names
    if isinstance(num_beams, int) and num_beams > 1:
        per_row = RowAdapters([name for name in names for _ in range(num_beams)])
    handles = _register(tuner.modules(), per_row)
    encoder = _encoder(tuner.model)
    if per_row is not names and encoder is not None:
        handles += _register(encoder.modules(), names)  # registered last: runs last, wins
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def check_adapter_names(tuner: SurmModel, adapter_names: Sequence[str]) -> list[str]:
    """``adapter_names`` as a list, or PEFT's ValueError for training mode and unknown names
    (checked against the adapters of every SURM layer: a typo cannot slip through)."""
    from .layer import SurmLayer

    if tuner.training:
        raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
    if isinstance(adapter_names, str) or not all(isinstance(name, str) for name in adapter_names):
        raise TypeError(
            f"`adapter_names` must be a list of adapter names (str), one per input row, got {adapter_names!r}"
        )
    known = set()
    for module in tuner.modules():
        if isinstance(module, SurmLayer):
            known |= set(module.surm_matrix)
    unknown = {name for name in adapter_names if name != BASE} - known
    if unknown:
        raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unknown))}")
    return list(adapter_names)


def _register(modules: Iterator[nn.Module], adapter_names: list[str]) -> list[Any]:
    from .layer import SurmLayer

    hook = partial(_inject_adapter_names, adapter_names=adapter_names)
    return [
        module.register_forward_pre_hook(hook, with_kwargs=True)
        for module in modules
        if isinstance(module, (SurmLayer, AuxiliaryTrainingWrapper))
    ]


def _inject_adapter_names(module: nn.Module, args: tuple, kwargs: dict, adapter_names: list[str]) -> tuple:
    return args, {**kwargs, "adapter_names": adapter_names}


def _encoder(model: nn.Module) -> nn.Module | None:
    get_encoder = getattr(model, "get_encoder", None)
    if get_encoder is None or not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return None
    return get_encoder()


def check_layer_call(layer: SurmLayer, x: torch.Tensor, adapter_names: Sequence[str]) -> None:
    """PEFT's per-layer errors: one name per row, no merged adapter."""
    if len(x) != len(adapter_names):
        raise ValueError(
            "Length of `adapter_names` should be the same as the number of inputs, but got "
            f"{len(adapter_names)} and {len(x)} respectively."
        )
    if layer.merged:
        raise ValueError(
            "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first."
        )


class RowAdapters(list):
    """The per-row adapter names of one ``forward`` / ``generate`` call, as the hooks pass them:
    a list that also keeps each layer's gathered tensors (:class:`_Group`) for the call, so the
    decoding steps of ``generate`` gather once. The weights cannot change within one call; a
    plain list (a direct layer call) is gathered anew every time."""

    def __init__(self, names: Sequence[str]) -> None:
        super().__init__(names)
        self.plans: dict[nn.Module, list[_Group]] = {}


@dataclass
class _Group:
    """Adapters of one layer that share a layout, and what their rows need, gathered per row.

    index: (R,) the rows that use them, in batch order; params: ``{"S.<name>": (R, ...)}`` the
    family's parameters of each row's adapter; alpha: (R,); bias: (R, out) scale * beta of a
    serial adapter; inner_bias: (R, r) the bottleneck bias c."""

    adapters: list[str]
    index: torch.Tensor
    every_row: bool
    params: dict[str, torch.Tensor]
    alpha: torch.Tensor
    bias: torch.Tensor | None = None
    inner_bias: torch.Tensor | None = None


def mixed_forward(
    layer: SurmLayer, x: torch.Tensor, adapter_names: Sequence[str], *args: Any, **kwargs: Any
) -> torch.Tensor:
    """Row b of the output is ``layer``'s output with adapter ``adapter_names[b]`` alone (the
    base layer's for ``"__base__"`` or an adapter this layer does not carry).

    x: (B, ..., in) for Linear / Conv1D, (B, in, H, W) for a 1x1 Conv2d; returns the base
    layer's output shape."""
    result = layer.base_layer(x, *args, **kwargs)
    if isinstance(adapter_names, RowAdapters):
        if layer not in adapter_names.plans:
            adapter_names.plans[layer] = _plan(layer, adapter_names, x.device)
        groups = adapter_names.plans[layer]
    else:
        groups = _plan(layer, adapter_names, x.device)
    # A row has one adapter, so a serial row's h is the base output: parallel rows first, then
    # serial rows read the same result (their rows are untouched by the parallel updates).
    h = result
    for group in groups:
        source = x if layer.surm_placement[group.adapters[0]] == "parallel" else h
        rows = source if group.every_row else source.index_select(0, group.index)
        update = layer._features_last(rows, lambda v, g=group: _update(layer, g, v)).to(result.dtype)
        result = result + update if group.every_row else result.index_add(0, group.index, update)
    return result


def _plan(layer: SurmLayer, adapter_names: Sequence[str], device: torch.device) -> list[_Group]:
    """The layer's adapters in the batch, grouped by layout, parallel groups first."""
    present = dict.fromkeys(name for name in adapter_names if name in layer.surm_matrix)
    by_layout: dict[tuple, list[str]] = {}
    for name in present:
        by_layout.setdefault(_layout(layer, name), []).append(name)
    groups = [_gather(layer, adapters, adapter_names, device) for adapters in by_layout.values()]
    return sorted(groups, key=lambda g: layer.surm_placement[g.adapters[0]] != "parallel")


def _layout(layer: SurmLayer, adapter: str) -> tuple:
    """What must agree for adapters to share one gathered pass: family, shape, knobs, placement,
    activation, the bottleneck form and the dtype (what the saved signature records, and more)."""
    S = layer.surm_matrix[adapter]
    return (type(S), S.shape, repr(S.knobs()), layer.surm_placement[adapter], layer.surm_activation[adapter],
            layer.is_bottleneck(adapter), next(S.parameters()).dtype)


def _gather(layer: SurmLayer, adapters: list[str], adapter_names: Sequence[str], device: torch.device) -> _Group:
    position_of = {a: i for i, a in enumerate(adapters)}
    rows = [row for row, name in enumerate(adapter_names) if name in position_of]
    index = torch.tensor(rows, dtype=torch.long, device=device)
    position = torch.tensor([position_of[adapter_names[row]] for row in rows], dtype=torch.long, device=device)

    def per_row(tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(tensors).index_select(0, position)

    matrices = [layer.surm_matrix[a] for a in adapters]
    names = [name for name, _ in matrices[0].named_parameters()]
    params = {f"S.{name}": per_row([S.get_parameter(name) for S in matrices]) for name in names}
    alpha = torch.tensor([layer.surm_alpha[a] for a in adapters], dtype=torch.float64, device=device)[position]
    group = _Group(adapters, index, len(rows) == len(adapter_names), params, alpha)
    if layer.surm_placement[adapters[0]] == "serial":
        scale = torch.tensor([layer.surm_bias_scale[a] for a in adapters], dtype=torch.float64, device=device)
        bias = per_row([layer.surm_bias[a] for a in adapters])
        group.bias = scale[position].to(bias.dtype)[:, None] * bias
        if layer.is_bottleneck(adapters[0]):
            group.inner_bias = per_row([layer.surm_inner_bias[a] for a in adapters])
    return group


class _Product(nn.Module):
    """A family's vmappable product, as a module whose parameters ``functional_call`` swaps."""

    def __init__(self, S: nn.Module) -> None:
        super().__init__()
        self.S = S

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.S.functional_forward(v)


def _update(layer: SurmLayer, group: _Group, v: torch.Tensor) -> torch.Tensor:
    """Each row's update through its own adapter, all rows in one vmapped product: parallel
    ``alpha S v``, serial ``act(alpha S v) + beta`` or the bottleneck ``alpha B act(A v + c) + beta``.

    v: (R, ..., features), features last."""
    from .layer import _ACTIVATIONS

    first = group.adapters[0]
    alpha = group.alpha.to(v.dtype).reshape(-1, *([1] * (v.dim() - 1)))
    if group.bias is None:
        return alpha * _vmapped(layer.surm_matrix[first], group.params, v)
    act = _ACTIVATIONS[layer.surm_activation[first]]
    beta = group.bias.reshape(group.bias.shape[0], *([1] * (v.dim() - 2)), group.bias.shape[-1])
    if group.inner_bias is not None:
        A, B = group.params["S.A"], group.params["S.B"]  # (R, r, n), (R, m, r)
        flat = v.to(A.dtype).reshape(v.shape[0], -1, v.shape[-1])  # (R, T, n)
        inner = act(torch.bmm(flat, A.transpose(1, 2)) + group.inner_bias[:, None, :])
        out = torch.bmm(inner, B.transpose(1, 2)).reshape(*v.shape[:-1], B.shape[1])
        return alpha.to(out.dtype) * out + beta
    return act(alpha * _vmapped(layer.surm_matrix[first], group.params, v)).to(beta.dtype) + beta


def _vmapped(S: nn.Module, params: dict[str, torch.Tensor], v: torch.Tensor) -> torch.Tensor:
    """S's product of each row of v with that row's parameters: (R, ..., n) -> (R, ..., m)."""
    product = _Product(S)
    return vmap(lambda p, row: functional_call(product, p, (row,)))(params, v)
