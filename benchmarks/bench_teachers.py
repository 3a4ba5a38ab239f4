"""(a) Teacher training: the project's Ray path vs a bare packed loop vs one model at a time.

All three train the same MLP teachers on the same weak-gold split (MNIST-1D) and predict the
transfer and test splits; rates are teacher-steps/s (one optimizer step of one teacher).

    python benchmarks/bench_teachers.py [--k 64] [--epochs 30] [--reps 3] [--one-at-a-time 8]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import common  # noqa: F401  (sets Ray env defaults)
import torch

from w2s_ray.config import load_config
from w2s_ray.data import make_splits
from w2s_ray.mnist1d_gen import load_mnist1d
from w2s_ray.packs import steps_per_teacher, teacher_indices, teacher_seed, train_one
from w2s_ray.results import DataStage
from w2s_ray.run import RunContext
from w2s_ray.teachers import train_teachers
from w2s_ray.workers import train_pack_local


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--one-at-a-time", type=int, default=8, help="teachers timed in the sequential loop")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compile", action="store_true")
    a = ap.parse_args()

    cfg = load_config(None, {"teachers.k": a.k, "teachers.epochs": a.epochs, "teachers.resources.compile": a.compile})
    x, y = load_mnist1d(cfg.data)
    splits = make_splits(x, y, cfg.data)
    data = {f"x_{s}": splits[s].x for s in splits} | {f"y_{s}": splits[s].y for s in splits}
    tc = cfg.teachers
    steps = a.k * steps_per_teacher(cfg.data.n_weak, tc.epochs, tc.batch_size)
    print(f"K={a.k} MLP-{tc.model.width} teachers, {tc.epochs} epochs on {cfg.data.n_weak} rows, batch {tc.batch_size}: {steps} teacher-steps; device {a.device}")

    common.start_ray()
    import ray

    n_cpus = int(ray.cluster_resources()["CPU"])

    ctx = RunContext.open(cfg)
    data_stage = DataStage(Path("."), splits, 10, x.shape[1])

    def ray_path(cold: bool):
        d = Path(tempfile.mkdtemp())
        try:
            if cold:
                ctx.pool.release()  # a one-off `w2s-ray teachers` run: actors start inside the timing
            return train_teachers(ctx, data_stage, d)
        finally:
            shutil.rmtree(d)

    with ctx:
        ray_path(False)  # warm the worker pool
        t_ray, ts_ray, _ = common.timed(lambda: ray_path(False), a.reps)
        t_cold, ts_cold, _ = common.timed(lambda: ray_path(True), a.reps)

    torch.set_num_threads(n_cpus)
    train_pack_local(data, tc.model_copy(update={"epochs": 1}), 10, list(range(4)), a.device)  # warm-up
    t_pack, ts_pack, _ = common.timed(lambda: train_pack_local(data, tc, 10, list(range(a.k)), a.device), a.reps)

    xw, yw = torch.from_numpy(data["x_weak"]).to(a.device), torch.from_numpy(data["y_weak"]).to(a.device)
    xs = [torch.from_numpy(data[f"x_{s}"]).to(a.device) for s in ("transfer", "test")]

    def sequential():
        for t in range(a.one_at_a_time):
            s = teacher_seed(tc.seed, t)
            idx = teacher_indices(tc.resample, len(yw), tc.k, t, s, tc.seed)
            m = train_one(tc.model, xw, yw, 10, s, idx, tc.epochs, tc.batch_size, tc.lr)
            with torch.no_grad():
                [torch.log_softmax(m(xx), -1) for xx in xs]

    steps_one = a.one_at_a_time * steps_per_teacher(cfg.data.n_weak, tc.epochs, tc.batch_size)
    one = {}
    for threads in sorted({1, n_cpus}):
        torch.set_num_threads(threads)
        t_one, ts_one, _ = common.timed(sequential, a.reps)
        one[threads] = (steps_one / t_one, ts_one)
    best_threads = max(one, key=lambda th: one[th][0])
    r_one = one[best_threads][0]

    r_ray, r_cold, r_pack = steps / t_ray, steps / t_cold, steps / t_pack
    print(f"Ray path, actor pool reused        {r_ray:>12,.0f} teacher-steps/s  median of {common.fmt_times(ts_ray)}")
    print(f"Ray path, actors started per run   {r_cold:>12,.0f} teacher-steps/s  median of {common.fmt_times(ts_cold)}")
    print(f"bare packed loop ({n_cpus} threads)       {r_pack:>12,.0f} teacher-steps/s  median of {common.fmt_times(ts_pack)}")
    for th, (r, ts) in one.items():
        print(f"one model at a time ({th} thread{'s' if th > 1 else ''})    {r:>12,.0f} teacher-steps/s  median of {common.fmt_times(ts)} for {a.one_at_a_time} teachers")
    print(f"ratio Ray (pool) / bare pack          = {r_ray / r_pack:.2f}x   (target >= 0.9)")
    print(f"ratio Ray (cold) / bare pack          = {r_cold / r_pack:.2f}x")
    print(f"ratio Ray (pool) / one-at-a-time best = {r_ray / r_one:.1f}x   (target >= 15 on a 2-core CPU; best loop: {best_threads} thread(s))")
    print(f"ratio bare pack / one-at-a-time best  = {r_pack / r_one:.1f}x")


if __name__ == "__main__":
    main()
