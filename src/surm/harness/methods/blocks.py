"""A model's blocks: how many there are, and AdapterDrop's exclusion of the lowest ones."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from surm.harness.models.profiles import Profile

__all__ = ["count_blocks", "lowest_blocks"]


def count_blocks(model: nn.Module, profile: Profile) -> int:
    """Number of blocks of ``model``: the length of its module list called ``profile.blocks``
    (BERT's ``bert.encoder.layer``, EfficientNet's ``_blocks``)."""
    lengths = {len(module) for name, module in model.named_modules()
               if profile.blocks is not None and (name == profile.blocks or name.endswith("." + profile.blocks))
               and isinstance(module, (nn.ModuleList, nn.Sequential))}
    if len(lengths) != 1:
        found = "none" if not lengths else f"lists of {sorted(lengths)} blocks"
        raise ValueError(f"{type(model).__name__}: expected one module list called {profile.blocks!r} holding the "
                         f"blocks, found {found}")
    return lengths.pop()


def lowest_blocks(method: str, profile: Profile, model: nn.Module | None, drop: int | None) -> str | None:
    """AdapterDrop's ``exclude_modules``: a regex for every module inside the lowest ``drop``
    blocks (default: half of the model's blocks, rounded down); None when it drops none.
    ``method``: the method string, for the errors."""
    if profile.blocks is None:
        raise ValueError(f"{method}: this profile names no blocks (Profile.blocks) to drop adapters from")
    n_blocks = count_blocks(model, profile) if model is not None else None
    if drop is None:
        if n_blocks is None:
            raise ValueError(f"{method}: the default drop is half the model's blocks; pass the model, or "
                             f"give drop=K")
        drop = n_blocks // 2
    if n_blocks is not None and drop >= n_blocks:
        raise ValueError(f"{method}: drop={drop} leaves no block of {n_blocks} with adapters; "
                         f"drop at most {n_blocks - 1}")
    if drop == 0:
        return None
    lowest = "|".join(str(i) for i in range(drop))
    return rf"(.*\.)?{re.escape(profile.blocks)}\.({lowest})\..*"
