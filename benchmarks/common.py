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


def machine_cpu_s() -> float | None:
    """CPU-seconds this machine has spent busy since boot (user, nice, system, irq, softirq,
    steal from /proc/stat), or None where there is no /proc/stat."""
    try:
        fields = open("/proc/stat").readline().split()[1:]
    except OSError:
        return None
    return sum(int(fields[i]) for i in (0, 1, 2, 5, 6, 7)) / os.sysconf("SC_CLK_TCK")


def wait_quiet(busy: float = 0.15, window: float = 0.5, limit: float = 30.0) -> float:
    """Wait until the machine's CPUs are busy less than `busy` of a `window` (`machine_cpu_s`;
    a stopped Ray's processes take seconds to exit), at most `limit` seconds; the seconds
    waited. Returns at once where there is no /proc/stat."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit:
        a, w0 = machine_cpu_s(), time.perf_counter()
        if a is None:
            break
        time.sleep(window)
        if (machine_cpu_s() - a) / ((time.perf_counter() - w0) * (os.cpu_count() or 1)) < busy:
            break
    return time.perf_counter() - t0


def cpu_line() -> str:
    """The CPU's model, family and vector width, from /proc/cpuinfo: the development machines
    differ from day to day (an AMD EPYC of family 25 without AVX-512 on 2026-12-07), and MKL's
    GEMMs run at other rates on each, so a ratio is quoted with the CPU it was measured on."""
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        return "CPU: unknown (no /proc/cpuinfo)"
    field = {}
    for line in info.splitlines():
        key, _, value = line.partition(":")
        field.setdefault(key.strip(), value.strip())
    from w2s_ray.numerics import has_avx2  # the pins' own check (no torch import)

    width = "AVX-512" if "avx512f" in field.get("flags", "").split() else "AVX2" if has_avx2() else "no AVX2"
    return f"CPU: {field.get('model name', '?')} (family {field.get('cpu family', '?')}, model {field.get('model', '?')}), {width}, {os.cpu_count()} CPUs"


def fmt_times(ts: list[float]) -> str:
    return "[" + ", ".join(f"{t:.2f}" for t in ts) + "] s"
