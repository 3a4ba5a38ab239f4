"""The benchmarks run: every script in `benchmarks/`, in its smoke mode, as a real process with
its own embedded Ray, as a user's would (speed is measured by the scripts themselves, never
here; at smoke size their numbers mean nothing). The scripts run two at a time, which is why
they share one test. Measured on 2 cores: 171 s one after another, 141 s two at a time, 170 s
two at a time joining one 4-CPU cluster the test started (each script's job then starts its
workers and runtime environment anew)."""

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"

EXPECT = {
    # (a) the Ray path (pool reused, and actors started per run), the bare pack in the stage's
    # layout and in threads, the actors' own code without Ray, one model at a time, each line with
    # its layout, and the ratios against the fairest reference (split into the files' and Ray's part)
    "bench_teachers.py": ["CPU: ", "Ray path: ", "Ray path, actor pool reused", "Ray path, actors started per run", "bare pack, ",
                          "process(es) × 1 thread", "bare pack, 1 process × ", "one model at a time, 1 process × 1 thread(s)",
                          "ratio Ray (pool) / fairest bare pack", "GEMM-only bound, 1 process × 1 thread(s)",
                          "ratio fairest bare pack / GEMM-only bound", "pack step alone, 1 process × 1 thread, the written-out chain",
                          "pack step alone, 1 process × 1 thread, vmap + autograd", "ratio pack step / GEMM-only bound",
                          "the actors' code without Ray", "of which the pack's files", "and Ray (its daemons"],
    # (b) Ray Data vs pyarrow, the one-process student input, and the Ray Train input against
    # the in-memory reference
    "bench_labels.py": ["ratio Ray Data / pyarrow", "workers: 1, read + 1 epoch(s) of batches",
                        "reference for the Ray Train input: workers: 1 (1 process, read once, gathered in memory)",
                        "x the in-memory reference"],
    "bench_mnist1d.py": ["Ray tasks on", "package make_dataset loop", "ratio project / package"],
    "bench_tune.py": ["Tune grid: 2 trials", "sequential, one process, no Ray: 2 trainings", "ratio Tune wall / sequential wall"],
    "bench_storage.py": ["local path", "file://", "s3:// (moto)", "a rerun with an empty local copy"],
    "bench_run.py": ["run from nothing, in a new directory each time", "this checkout: median wall", "median machine CPU", "median seconds per part: start-up",
                     "first student row: student"],
    "bench_student_pack.py": ["1 process × 1 thread, data in memory, no Ray", "mlp: ratio one at a time / pack =",
                              "cnn1d: ratio one at a time / pack =", "student stage, mlp, embedded Ray with",
                              "student stage, cnn1d, embedded Ray with", "(above 1: packs pay)"],
    "bench_pack_sums.py": ["prediction", "through vmap, as before the written-out chain", "same bits: True", "same float64 bits: True",
                           "peak RSS of this process"],
    # (i) the encoders, each beside its reference
    "bench_embed.py": ["hashed dim=256 ngrams=1, 1 process × 1 thread", "ratio ours / sklearn =", "hf random BERT hidden=32 layers=1"],
    # (j) the student stage with workers 1 and 2, each line with its ratio to workers 1
    "bench_student_workers.py": ["student stage, MLP 64 x 2 on the dual mean", "workers: 1 ", "workers: 2, input: stream",
                                 "ratio workers: 1 / this ="],
    "bench_memory.py": ["K=    4: peak RSS", "K=    8: peak RSS"],
    "bench_scale.py": ["object store peak MB per stage", "driver peak RSS MB", "worker peak RSS MB (VmHWM): pack actor ",
                       "the driver's end-of-stage checks, ms: packs rehashed / sized; manifest rehashed / from seals"],
    # (g) the pinned student path and the MKL_CBWR teacher path give the same bits on both
    # emulated CPUs; the default paths are reported either way
    "bench_determinism.py": ["student  pinned     native vs avx2 CPU: bitwise identical",
                             "teachers MKL_CBWR   native vs avx2 CPU: bitwise identical",
                             "student  cost: pinned / default training time", "teachers cost: MKL_CBWR"],
}


def test_every_benchmark_has_a_smoke_check():
    assert sorted(EXPECT) == sorted(p.name for p in BENCH.glob("bench_*.py"))


@pytest.mark.slow
def test_every_benchmark_runs_in_smoke_mode():
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}  # its own embedded Ray, as a user's

    def smoke(script: str) -> subprocess.CompletedProcess:
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, str(BENCH / script), "--smoke"], capture_output=True, text=True, timeout=600, env=env)
        print(f"{time.perf_counter() - t0:6.1f}s  {script} --smoke", file=sys.stderr)
        return out

    with ThreadPoolExecutor(2) as pool:
        done = dict(zip(EXPECT, pool.map(smoke, EXPECT)))
    for script, out in done.items():
        assert out.returncode == 0, (script, out.stdout[-2000:], out.stderr[-3000:])
        for line in EXPECT[script]:
            assert line in out.stdout, (script, line, out.stdout)
