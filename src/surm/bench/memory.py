"""Memory of one training step: bytes saved for backward, the peak of CPU allocations, and the
process's peak resident growth."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


def saved_tensor_bytes(
    step: Callable[[], torch.Tensor], exclude: Iterable[torch.Tensor] = (), grad: torch.Tensor | None = None
) -> int:
    """Bytes of the distinct tensors autograd saves for backward while ``step()`` builds its
    graph. ``step`` returns the loss (or an output, then backpropagated with ``grad``); the
    backward pass runs so that the buffers are freed. Tensors sharing storage with ``exclude``
    (parameters and frozen weights, in memory anyway) are not counted. Deterministic: the
    activation memory a method adds, free of allocator noise."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = step()
    out.backward(grad)
    return sum(seen.values())


def peak_alloc_bytes(step: Callable[[], None]) -> int | None:
    """Peak of CPU allocations while ``step()`` runs (a forward + backward), above the level at
    its start, from the profiler's memory events: transients included (merged weights, FFT
    buffers, outputs, gradients). None where the profiler saw no allocation. The profiler
    prints its start and stop lines on stderr."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    # allocations are attributed (self) to the innermost op, frees are "[memory]" events
    events = [(e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage]
    if not events:
        return None
    level = peak = 0
    for _, delta in sorted(events):
        level += delta
        peak = max(peak, level)
    return peak


def _status_kib(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field} line")


def resident_mib() -> float:
    """The process's resident set size now, MiB (Linux ``/proc``)."""
    return _status_kib("VmRSS") / 1024


class PeakResidentGrowth:
    """Peak resident set size of the block above the resident size at its start, MiB
    (``growth_mib`` after exit): the kernel's peak (``VmHWM``), reset at entry through
    ``/proc/self/clear_refs``, so nothing before the block counts and no peak between two
    samples is missed. Linux only; raises OSError where the peak cannot be reset."""

    def __enter__(self) -> PeakResidentGrowth:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current VmRSS
        self.start_mib = resident_mib()
        return self

    def __exit__(self, *exc) -> None:
        self.growth_mib = _status_kib("VmHWM") / 1024 - self.start_mib
