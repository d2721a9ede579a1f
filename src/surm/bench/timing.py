"""Interleaved timing: every function once per round, medians over rounds."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

#: "wall": time.perf_counter, the latency a user sees; "cpu": time.process_time, CPU seconds
#: of this process over all its threads, robust to other processes preempting this one on a
#: shared machine, and equal to latency when torch runs one thread.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def interleaved_samples(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 2,
    clocks: tuple[str, ...] = ("wall",),
    rotate: bool = True,
) -> dict[str, dict[str, list[float]]]:
    """Seconds of each call, ``{name: {clock: [one per round]}}``, measured in ``repeats``
    rounds that run every function once, so that slow drifts of a shared machine hit all
    alike; ``rotate`` starts each round one function later. ``warmup`` untimed rounds first."""
    names = list(fns)
    now = [CLOCKS[c] for c in clocks]
    for _ in range(warmup):
        for name in names:
            fns[name]()
    samples = {name: {c: [] for c in clocks} for name in names}
    for r in range(repeats):
        shift = r % len(names) if rotate else 0
        for name in names[shift:] + names[:shift]:
            start = [clock() for clock in now]
            fns[name]()
            for c, clock, t0 in zip(clocks, now, start):
                samples[name][c].append(clock() - t0)
    return samples


def interleaved_medians(
    fns: dict[str, Callable[[], object]], repeats: int = 15, warmup: int = 2, clock: str = "wall"
) -> dict[str, float]:
    """Median seconds per call of each function by ``clock``, in rotating interleaved rounds
    (:func:`interleaved_samples`)."""
    samples = interleaved_samples(fns, repeats, warmup, clocks=(clock,))
    return {name: statistics.median(s[clock]) for name, s in samples.items()}



