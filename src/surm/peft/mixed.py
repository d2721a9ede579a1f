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
    names = check_adapter_names(tuner, adapter_names)
    per_row = names
    if isinstance(num_beams, int) and num_beams > 1:
        per_row = [name for name in names for _ in range(num_beams)]
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


def mixed_forward(
    layer: SurmLayer, x: torch.Tensor, adapter_names: Sequence[str], *args: Any, **kwargs: Any
) -> torch.Tensor:
    """Row b of the output is ``layer``'s output with adapter ``adapter_names[b]`` alone (the
    base layer's for ``"__base__"`` or an adapter this layer does not carry).

    x: (B, ..., in) for Linear / Conv1D, (B, in, H, W) for a 1x1 Conv2d; returns the base
    layer's output shape."""
    result = layer.base_layer(x, *args, **kwargs)
    rows: dict[str, list[int]] = {}
    for row, name in enumerate(adapter_names):
        if name in layer.surm_matrix:
            rows.setdefault(name, []).append(row)
    if not rows:
        return result
    groups: dict[tuple, list[str]] = {}
    for name in rows:
        groups.setdefault(_layout(layer, name), []).append(name)
    parallel = [g for g in groups.values() if layer.surm_placement[g[0]] == "parallel"]
    serial = [g for g in groups.values() if layer.surm_placement[g[0]] == "serial"]
    # A row has one adapter, so a serial row's h is the base output: parallel rows first, then
    # serial rows read the same result (their rows are untouched by the parallel updates).
    h = result
    for adapters in parallel + serial:
        index, position = _row_index(adapters, rows, x.device)
        source = x if layer.surm_placement[adapters[0]] == "parallel" else h
        update = layer._features_last(
            source.index_select(0, index), lambda v, a=adapters, p=position: _gathered_update(layer, a, p, v)
        )
        result = result.index_add(0, index, update.to(result.dtype))
    return result


def _layout(layer: SurmLayer, adapter: str) -> tuple:
    """What must agree for adapters to share one gathered pass: the tensors' layout (the
    signature: family, knobs, placement), the activation, the bottleneck form and the dtype."""
    S = layer.surm_matrix[adapter]
    signature = bytes(layer.surm_signature[adapter].tolist())
    dtype = next(S.parameters()).dtype
    return signature, layer.surm_activation[adapter], layer.is_bottleneck(adapter), dtype


def _row_index(
    adapters: list[str], rows: dict[str, list[int]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows of the batch that use one of ``adapters``, the position of each row's adapter in
    ``adapters``), both (R,) int64."""
    index = [row for a in adapters for row in rows[a]]
    position = [i for i, a in enumerate(adapters) for _ in rows[a]]
    return (
        torch.tensor(index, dtype=torch.long, device=device),
        torch.tensor(position, dtype=torch.long, device=device),
    )


class _Product(nn.Module):
    """A family's vmappable product, as a module whose parameters ``functional_call`` swaps."""

    def __init__(self, S: nn.Module) -> None:
        super().__init__()
        self.S = S

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.S.functional_forward(v)


def _stacked(tensors: list[torch.Tensor], position: torch.Tensor) -> torch.Tensor:
    """(R, ...) the tensor of each row's adapter."""
    return torch.stack(tensors).index_select(0, position)


def _gathered_update(layer: SurmLayer, adapters: list[str], position: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The update of each row through its own adapter, all rows in one vmapped product.

    v: (R, ..., features) features last; position: (R,) index into ``adapters``."""
    from .layer import _ACTIVATIONS

    first = adapters[0]
    S0 = layer.surm_matrix[first]
    param_names = [name for name, _ in S0.named_parameters()]
    params = {
        f"S.{name}": _stacked([layer.surm_matrix[a].get_parameter(name) for a in adapters], position)
        for name in param_names
    }
    alpha = torch.tensor([layer.surm_alpha[a] for a in adapters], dtype=v.dtype, device=v.device)[position]
    alpha = alpha.reshape(-1, *([1] * (v.dim() - 1)))
    if layer.surm_placement[first] == "parallel":
        product = _Product(S0)
        return alpha * vmap(lambda p, row: functional_call(product, p, (row,)))(params, v)
    act = _ACTIVATIONS[layer.surm_activation[first]]
    scale = torch.tensor([layer.surm_bias_scale[a] for a in adapters], dtype=v.dtype, device=v.device)[position]
    bias = _stacked([layer.surm_bias[a] for a in adapters], position)  # (R, out)
    beta = (scale[:, None] * bias).reshape(bias.shape[0], *([1] * (v.dim() - 2)), bias.shape[-1])
    if layer.is_bottleneck(first):
        A, B = params["S.A"], params["S.B"]  # (R, r, n), (R, m, r)
        c = _stacked([layer.surm_inner_bias[a] for a in adapters], position)  # (R, r)
        shape = v.shape
        flat = v.to(A.dtype).reshape(shape[0], -1, shape[-1])  # (R, T, n)
        inner = act(torch.bmm(flat, A.transpose(1, 2)) + c[:, None, :])
        out = torch.bmm(inner, B.transpose(1, 2)).reshape(*shape[:-1], B.shape[1])
        return alpha.to(out.dtype) * out + beta
    product = _Product(S0)
    raw = vmap(lambda p, row: functional_call(product, p, (row,)))(params, v)
    return act(alpha * raw).to(beta.dtype) + beta
