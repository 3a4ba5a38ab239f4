"""Helpers shared by the benchmarks: medians of repeated wall-clock timings, a local Ray."""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


SMOKE_DATA = {"data.num_samples": 1500, "data.chunk_size": 500, "data.n_weak": 300, "data.n_transfer": 600, "data.n_test": 500}
"""The built-in data at the size the tests use: a `--smoke` run checks that a benchmark runs
end to end (its numbers mean nothing at this size)."""
SMOKE_RUN = SMOKE_DATA | {"teachers.k": 4, "teachers.epochs": 2, "posterior.n_boot": 10, "student.epochs": 1, "student.seeds": 1}


def timed(fn: Callable[[], object], reps: int) -> tuple[float, list[float], object]:
    """Median wall time of `reps` calls, all the times, and the last result."""
    times, out = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, out


def start_ray(num_cpus: int | None = None) -> None:
    from w2s_ray.config import RayConfig
    from w2s_ray.raytools import init_ray

    init_ray(RayConfig(num_cpus=num_cpus or os.cpu_count()))


def wait_quiet(busy: float = 0.15, window: float = 0.5, limit: float = 30.0) -> float:
    """Wait until the whole machine's CPUs are busy less than `busy` of a `window` (a stopped
    Ray's processes take seconds to exit), at most `limit` seconds; the seconds waited. Linux
    (/proc/stat); elsewhere it returns at once."""
    def ticks() -> tuple[int, int]:
        v = [int(x) for x in open("/proc/stat").readline().split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait

    if not os.path.exists("/proc/stat"):
        return 0.0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit:
        a = ticks()
        time.sleep(window)
        b = ticks()
        if b[0] > a[0] and 1 - (b[1] - a[1]) / (b[0] - a[0]) < busy:
            break
    return time.perf_counter() - t0


def fmt_times(ts: list[float]) -> str:
    return "[" + ", ".join(f"{t:.2f}" for t in ts) + "] s"
