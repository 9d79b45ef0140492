"""Timing shared by the benchmarks: interleaved runs, medians of wall-clock and CPU time."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved_medians(
    fns: dict[str, Callable[[], None]], warmup: int, repeats: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall-clock and process-CPU seconds per call of each fn, calls interleaved round-robin.

    CPU time (all threads of this process) is the steadier figure on a shared machine: time spent
    waiting for a core does not count.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    med = statistics.median
    return {n: med(v) for n, v in wall.items()}, {n: med(v) for n, v in cpu.items()}
