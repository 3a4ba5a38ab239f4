"""Numerics that do not depend on which x86 CPU runs them: the pins every process of a run
starts with. Plain Python, no torch: the CLI imports it to set the pins before torch loads
(`w2s_ray.worker_setup` is the part that needs torch).

Measured (`benchmarks/bench_determinism.py`, a CPU without AVX-512 emulated on an AVX-512 Xeon
by capping torch, oneDNN and MKL at AVX2): with each library's own dispatch, a MLP teacher pack
and the default CNN student both come out different on the two CPUs (log p up to 1.4e-6 and
3.6e-6 apart after 3 epochs; more after a full run, and a verdict on an effect of 0.003–0.02 can
follow). Three pins make both bitwise identical:
- `MKL_CBWR=AVX2`: MKL's conditional numerical reproducibility, its GEMM kernels fixed to the
  AVX2 code path on every CPU that has AVX2 (teachers: this pin alone, at 1.00× the time);
- `ATEN_CPU_CAPABILITY=avx2`: torch's own vectorized kernels (reductions, softmax) at AVX2
  width (without it the students still differ);
- oneDNN off (`torch.backends.mkldnn.enabled = False`, set by `worker_setup.setup_process`): torch's
  convolutions run without the kernels oneDNN picks per CPU. oneDNN off alone is not enough
  (the students then differed by up to 5e-2). Since CACHE_FORMAT 3 the built-in `cnn1d` does
  not call torch's convolution at all: it computes each layer as one GEMM over its windows
  (`models.strided_conv`, 2.3x faster than torch's convolution without oneDNN); the pin stays
  for users' models.
Cost: students 1.11–1.14× the training time (two runs) while `cnn1d` used torch's convolution,
0.99× since (2026-12-05); teachers 1.00–1.02×.

The environment variables are read when the libraries load, so they must be in a process's
environment before torch is imported: Ray workers get them from the job's runtime environment
(`runtime_env`, with `worker_setup.setup_process` as the worker setup hook), the CLI sets them for its own
process before it imports torch (`pin_this_process`). A CPU without AVX2, or not x86, gets no
pins (`pins` is empty there, and so part of every cache key: `key`). What this does not cover:
CPUs of the same ISA with different cache sizes were not available to test, and a GPU's
kernels are another matter (cuDNN).
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

PINS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2"}
VERSION = 1
"""Raised when the numerics change: it is part of the teachers', ceilings' and report's cache
keys (`key`), so results computed otherwise are never reused."""


@functools.cache
def has_avx2() -> bool:
    """Whether this machine's CPU has AVX2 (x86 only; read from /proc/cpuinfo on Linux, assumed
    on other x86 systems, where every CPU of the last decade has it)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    info = Path("/proc/cpuinfo")
    if not info.is_file():
        return True
    try:
        return any(line.startswith("flags") and " avx2" in line for line in info.read_text().splitlines())
    except OSError:
        return False


def pins() -> dict[str, str]:
    """The environment a run's processes start with: `PINS` on x86 with AVX2, else none."""
    return dict(PINS) if has_avx2() else {}


def key() -> dict:
    """What the numerics contribute to a cache key."""
    return {"numerics": VERSION, "pins": pins(), "onednn": False}


def runtime_env() -> dict:
    """The job's runtime environment: the pins for every worker, and `worker_setup.setup_process`
    run in each worker before its first task."""
    return {"env_vars": pins(), "worker_process_setup_hook": "w2s_ray.worker_setup.setup_process"}


def pin_this_process() -> None:
    """Put the pins in this process's environment. Effective only before torch is imported
    (the CLI calls it first)."""
    os.environ.update(pins())
