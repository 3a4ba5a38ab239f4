"""The benchmarks run: each in its smoke mode, as a real process (speed is measured by the
scripts themselves, never here)."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.slow
def test_determinism_benchmark_smoke():
    """The pinned student path and the MKL_CBWR teacher path give the same bits on both emulated
    CPUs; the default paths are reported either way (on a CPU without AVX-512 the emulation
    changes nothing)."""
    out = subprocess.run([sys.executable, str(BENCH / "bench_determinism.py"), "--smoke"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "student  pinned     native vs avx2 CPU: bitwise identical" in out.stdout, out.stdout
    assert "teachers MKL_CBWR   native vs avx2 CPU: bitwise identical" in out.stdout, out.stdout
    assert "student  cost: pinned / default training time" in out.stdout and "teachers cost: MKL_CBWR" in out.stdout
