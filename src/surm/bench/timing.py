"""Interleaved median timing and saved-for-backward memory accounting."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Iterable

import torch


#: clocks: "wall" (time.perf_counter, the latency a user sees) or "cpu" (time.process_time:
#: CPU seconds of this process over all its threads; robust to other processes preempting
#: this one on a shared machine, and equal to latency when torch runs one thread)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = "wall"


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int = 15, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each function (by the module's ``clock``), measured in rounds
    that run every function once (in a rotating order), so that slow drifts of a shared
    machine hit all alike."""
    now = CLOCKS[clock]
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            start = now()
            fns[name]()
            samples[name].append(now() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def saved_tensor_bytes(step: Callable[[], torch.Tensor], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct tensors autograd saves for backward while ``step()`` builds its
    graph (``step`` returns the loss; it is then backpropagated so buffers are freed).
    Tensors sharing storage with ``exclude`` (the model's parameters, in memory anyway) are
    not counted. Deterministic: the activation memory a method adds, free of allocator noise."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    loss.backward()
    return sum(seen.values())
