"""Multi-process training helpers for SURM adapters.

DDP (``torch.nn.parallel.DistributedDataParallel``, and Accelerate's multi-process mode, which
wraps the model in DDP) broadcasts every parameter and buffer from rank 0 when it wraps the
model, so ranks agree whatever their random state was when the adapters were created.

FSDP2 (``torch.distributed.fsdp.fully_shard``) broadcasts nothing: each rank keeps its own
shard of the tensors it holds. The zero init of the bilinear families (Kronecker, LDR,
low-rank) draws one factor at random, so ranks seeded differently (no seeding, or Accelerate's
``set_seed(seed, device_specific=True)``) hold different factors:

- with a 1-D mesh (plain sharding) the model the ranks train together is stitched from each
  rank's own rows (dim-0 shard) of its own draw: the ranks agree, but the result depends on the
  world size and on every rank's seed, not on rank 0's alone;
- with a 2-D mesh (HSDP, replicate x shard) the replicas each keep their own draw and only
  average gradients: they train different models, silently.

:func:`broadcast_adapter_init` called once after ``get_peft_model`` and before ``fully_shard``
removes both: every rank then starts from rank 0's adapters.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from .layer import SurmLayer

__all__ = ["adapter_tensors", "broadcast_adapter_init"]


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors :func:`broadcast_adapter_init` synchronises, by name (each tensor once).

    - every parameter and buffer of every SURM adapter of every :class:`SurmLayer`, active or
      not, trainable or not (``surm_matrix``, ``surm_bias``, ``surm_inner_bias``);
    - every parameter and buffer of PEFT's auxiliary wrappers: ``modules_to_save`` (the trained
      copy and the original module, e.g. a freshly initialised classification head) and
      trainable tokens;
    - any other parameter with ``requires_grad=True`` (e.g. base biases under ``bias="all"``).
    """
    found: dict[int, tuple[str, torch.Tensor]] = {}

    def add(name: str, tensor: torch.Tensor | None) -> None:
        if tensor is not None and id(tensor) not in found:
            found[id(tensor)] = (name, tensor)

    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, SurmLayer):
            for attr in SurmLayer.adapter_layer_names:
                container = getattr(module, attr, None)
                if isinstance(container, nn.Module):
                    for name, tensor in container.named_parameters():
                        add(f"{prefix}{attr}.{name}", tensor)
                    for name, tensor in container.named_buffers():
                        add(f"{prefix}{attr}.{name}", tensor)
        elif isinstance(module, AuxiliaryTrainingWrapper):
            for name, tensor in module.named_parameters():
                add(f"{prefix}{name}", tensor)
            for name, tensor in module.named_buffers():
                add(f"{prefix}{name}", tensor)
    for name, param in model.named_parameters():
        if param.requires_grad:
            add(name, param)
    return {name: tensor for name, tensor in found.values()}


def broadcast_adapter_init(
    model: nn.Module, src: int = 0, group: dist.ProcessGroup | None = None
) -> list[str]:
    """Copy the adapters (see :func:`adapter_tensors`) of rank ``src`` to every rank, in place.

    Call it on every rank after ``peft.get_peft_model`` (and after moving the model to its
    device: with NCCL the tensors must be on the GPU) and **before** ``fully_shard``; DDP does
    the same by itself and does not need it. ``src`` is a global rank, as in
    ``torch.distributed.broadcast``. Tensors are sent in one flat message per (device, dtype).

    Returns the names of the tensors it synchronised (sorted); an empty list, doing nothing,
    when no default process group is initialised (a single-process run of the same script).

    Raises RuntimeError if the model is already sharded (its parameters are DTensors): the
    shards of different ranks are different tensors by design, and broadcasting them would
    break the model.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return []
    tensors = adapter_tensors(model)
    for name, tensor in tensors.items():
        if _is_dtensor(tensor):
            raise RuntimeError(
                f"surm: broadcast_adapter_init found {name!r} already sharded (a DTensor). Call it after "
                f"get_peft_model and before fully_shard (or any other sharding), on every rank."
            )
        if tensor.is_meta:
            raise RuntimeError(
                f"surm: broadcast_adapter_init found {name!r} on the meta device; materialise the model "
                f"(e.g. to_empty + init, or load its weights) before broadcasting."
            )
    buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for tensor in tensors.values():
        buckets.setdefault((tensor.device, tensor.dtype), []).append(tensor)
    with torch.no_grad():
        for bucket in buckets.values():
            flat = torch.cat([t.detach().reshape(-1) for t in bucket])
            dist.broadcast(flat, src=src, group=group)
            offset = 0
            for t in bucket:
                n = t.numel()
                t.copy_(flat[offset : offset + n].view_as(t))
                offset += n
    return sorted(tensors)


def _is_dtensor(tensor: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return False
    return isinstance(tensor, DTensor)
