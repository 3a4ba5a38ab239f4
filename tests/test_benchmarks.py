"""The benchmarks run: each in its smoke mode, as a real process (speed is measured by the
scripts themselves, never here)."""

import os
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


@pytest.mark.slow
def test_teachers_benchmark_smoke():
    """(a) runs end to end on the data stage's own files: the Ray path (pool reused, and actors
    started per run), the bare pack in the stage's layout and in threads, one model at a time,
    each line with its layout, and the ratios against the fairest reference."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}  # its own embedded Ray, as a user's
    out = subprocess.run([sys.executable, str(BENCH / "bench_teachers.py"), "--smoke"], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    for line in ("Ray path: ", "Ray path, actor pool reused", "Ray path, actors started per run", "bare pack, ", "process(es) × 1 thread",
                 "bare pack, 1 process × ", "one model at a time, 1 process × 1 thread(s)", "ratio Ray (pool) / fairest bare pack"):
        assert line in out.stdout, (line, out.stdout)
