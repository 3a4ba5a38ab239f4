"""(j) When does a student across Ray Train workers pay? The student stage's wall time with
`student.workers: 1` (one Ray task that reads its label columns once and gathers its batches
in memory) against `student.workers: 2` (Ray Train, DDP with gloo on CPU) fed by Ray Data
(`student.input: stream`) and by each worker reading the columns itself (`input: memory`), on
the same labels, on this machine's cores.

The built-in `synthetic` source (MNIST-1D's shape) with N transfer rows for each `--ns`, 8
teachers (the labels only need to exist), one MLP student on the dual mean (width 64, depth 2,
as `bench_scale.py`), one seed, no ceiling. Each layout's student stage runs anew each rep in
one embedded Ray (its directory removed in between), reps alternated; the script prints the
stage's wall (what a user waits for: workers starting, the input, training, evaluation), the
training seconds the student itself reports, its test accuracy, and the ratio of each layout
to `workers: 1`. On 2 cores, `workers: 2` puts both workers on the cores a single worker has to
itself, so it can pay only where the input and the model's steps are split across more CPUs
than one worker uses: more nodes, or GPUs.

    python benchmarks/bench_student_workers.py [--ns 6000 100000] [--epochs 3] [--reps 2] [--smoke]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import common

LAYOUTS = {
    "workers: 1": {"student.workers": 1},
    "workers: 2, input: stream": {"student.workers": 2, "student.input": "stream"},
    "workers: 2, input: memory": {"student.workers": 2, "student.input": "memory"},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ns", type=int, nargs="+", default=[6000, 100_000])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="N 600, 1 epoch, 1 rep, workers 1 and the stream: checks that it runs")
    a = ap.parse_args()
    layouts = dict(LAYOUTS)
    if a.smoke:
        a.ns, a.epochs, a.reps = [600], 1, 1
        layouts.pop("workers: 2, input: memory")  # a Ray Train start is 30 s of a smoke run; the stream's is the default path

    from w2s_ray.config import load_config
    from w2s_ray.pipeline import run_pipeline
    from w2s_ray.raytools import init_ray

    root = Path(tempfile.mkdtemp(prefix="w2s-bench-student-workers-"))
    rows = []
    try:
        for n in a.ns:
            base = {
                "output.root": str(root), "output.name": f"n{n}", "output.tensorboard": False,
                "data.source": "synthetic", "data.num_samples": n + 6000, "data.n_weak": 2000, "data.n_transfer": n, "data.n_test": 4000,
                "data.chunk_size": 100_000, "teachers.k": 8, "teachers.epochs": 5, "teachers.keep_predictions": "none",
                "student.model.name": "mlp", "student.model.width": 64, "student.model.depth": 2, "student.epochs": a.epochs,
                "student.targets": ["dual_mean"], "student.ceiling": False, "student.seeds": 1,
            } | (common.SMOKE_DATA | {"data.source": "synthetic", "data.n_transfer": n, "data.num_samples": n + 800} if a.smoke else {})
            cfgs = {name: load_config(None, base | extra) for name, extra in layouts.items()}
            first = next(iter(cfgs.values()))
            init_ray(first.ray)
            run_pipeline(first, until="labels")  # data, teachers and labels: shared by every layout
            walls: dict[str, list[float]] = {name: [] for name in cfgs}
            trained: dict[str, list[float]] = {name: [] for name in cfgs}
            acc: dict[str, float] = {}
            for _ in range(a.reps):
                for name, cfg in cfgs.items():
                    shutil.rmtree(root / f"n{n}" / "student", ignore_errors=True)  # the stage anew, not from its cache
                    t0 = time.perf_counter()
                    st = run_pipeline(cfg, until="student")
                    walls[name].append(time.perf_counter() - t0)
                    res = st.students.students["dual_mean"]
                    trained[name].append(res.seconds)
                    acc[name] = res.test_acc
            rows += [(n, name, statistics.median(walls[name]), walls[name], statistics.median(trained[name]), acc[name]) for name in cfgs]
    finally:
        shutil.rmtree(root, ignore_errors=True)

    import ray

    cpus = int(ray.cluster_resources().get("CPU", 0))
    print(f"student stage, MLP 64 x 2 on the dual mean, {a.epochs} epoch(s), 1 seed; one embedded Ray on {cpus} CPUs; "
          f"each Ray Train worker 1 CPU; medians of {a.reps}")
    for n, name, wall, ws, secs, test_acc in rows:
        one = next(w for m, nm, w, *_ in rows if m == n and nm == "workers: 1")
        print(f"N={n:>9,}  {name:<26} stage {wall:7.2f} s  {common.fmt_times(ws)}  training {secs:6.2f} s  test acc {test_acc:.4f}  "
              f"ratio workers: 1 / this = {one / wall:.2f}x")


if __name__ == "__main__":
    main()
