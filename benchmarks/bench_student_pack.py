"""Do students pay as packs, as teachers do? S students of one model trained one after another
with `student.core.fit` (the student stage's loop, one task per student) against the same S as
one pack with `student.core.fit_pack` (what `student.pack: true` runs: stacked parameters, one
vmapped step, each member on its own seed's held-out slice and batch order, scored every
epoch). Same rows, batch size, epochs, loss (mixture, λ 0.3) and Adam, no early stop (so both
take every step), one thread, data in memory, no Ray: the training loops alone are compared.

    python benchmarks/bench_student_pack.py                       # MLP 64 × 2, MLP 256 × 2 and the default CNN, S = 10
    python benchmarks/bench_student_pack.py --students 20 --epochs 5 --reps 3
    python benchmarks/bench_student_pack.py --stage --reps 3      # the student stage of a run, pack false vs true

`--stage` times the student stage itself: the default experiment's data, teachers and labels
made once, then `run_pipeline(until="student")` from those cached stages with `student.pack`
false and true, alternated, each rep in a fresh copy (so every student trains), on an embedded
Ray with every core (the stage's layout: one task per student, or one per pack, each 1 CPU),
for an MLP 64 × 2 student and for the default CNN. Each line prints the first replicate's test
accuracy with the wall, so a layout that trained something else would show.
"""

from __future__ import annotations

import argparse
import statistics
import time

import common
from w2s_ray import numerics

numerics.pin_this_process()  # before torch loads, as every process of a run starts

import torch  # noqa: E402
from w2s_ray import worker_setup  # noqa: E402
from w2s_ray.config import ModelConfig, StudentConfig  # noqa: E402
from w2s_ray.student.core import fit, fit_pack, in_memory  # noqa: E402

MODELS = {"mlp": ModelConfig(name="mlp", width=64, depth=2), "mlp256": ModelConfig(name="mlp", width=256, depth=2),
          "cnn1d": ModelConfig(name="cnn1d", width=32, depth=3)}


def one_at_a_time(model_cfg, x, t, students: int, epochs: int, batch: int) -> tuple[float, float]:
    """Seconds for every student trained after the other (`student.core.fit`, the student
    stage's loop: one task per student), and their mean final held-out loss."""
    t0, finals = time.perf_counter(), []
    for cfg in configs(model_cfg, students, epochs, batch):
        res = fit(cfg, in_memory(cfg, x, t, t.log()), x.shape[1], t.shape[1])
        finals.append(res.history[-1]["holdout_loss"])
    return time.perf_counter() - t0, statistics.mean(finals)


def as_pack(model_cfg, x, t, students: int, epochs: int, batch: int) -> tuple[float, float]:
    """Seconds for the same students as one pack (`student.core.fit_pack`, what `student.pack`
    runs), each on its own world, with its own early stopping."""
    t0 = time.perf_counter()
    cfgs = configs(model_cfg, students, epochs, batch)
    res = fit_pack(cfgs, [in_memory(c, x, t, t.log()) for c in cfgs], x.shape[1], t.shape[1])
    return time.perf_counter() - t0, statistics.mean(r.history[-1]["holdout_loss"] for r in res)


def configs(model_cfg, students: int, epochs: int, batch: int) -> list[StudentConfig]:
    """The students: seeds 0..S-1, no early stop (patience above the epochs), so both layouts take every step."""
    return [StudentConfig(model=model_cfg, epochs=epochs, batch_size=batch, patience=epochs + 1, seed=s, rce_weight=0.3) for s in range(students)]


STAGE_MODELS = {"mlp": {"student.model.name": "mlp", "student.model.width": 64, "student.model.depth": 2}, "cnn1d": {}}


def stage(reps: int, smoke: bool) -> None:
    """The student stage, `student.pack` false against true (see the module's docstring)."""
    import os
    import shutil
    import tempfile
    from pathlib import Path

    from w2s_ray.config import load_config
    from w2s_ray.pipeline import run_pipeline

    common.start_ray()
    small = common.SMOKE_RUN | {"student.seeds": 2} if smoke else {}
    with tempfile.TemporaryDirectory(prefix="bench_student_pack_") as tmp:
        warm = Path(tmp) / "warm"
        run_pipeline(load_config(None, small | {"output.root": str(warm), "output.name": "b"}), until="labels")
        for name, model in STAGE_MODELS.items():
            walls: dict[bool, list[float]] = {False: [], True: []}
            for rep in range(reps):
                for pack in (False, True):
                    root = Path(tmp) / f"{name}-{rep}-{pack}"
                    shutil.copytree(warm, root)
                    cfg = load_config(None, small | model | {"output.root": str(root), "output.name": "b", "student.pack": pack})
                    t0 = time.perf_counter()
                    st = run_pipeline(cfg, until="student")
                    walls[pack].append(time.perf_counter() - t0)
                    shutil.rmtree(root)
                    s = cfg.student
                    print(f"  {name}, pack {str(pack).lower():5s}: {walls[pack][-1]:6.2f} s for {s.seeds} seeds × {len(s.targets)} targets + ceiling; "
                          f"first student's test acc {st.students.replicates[s.targets[0]][0].test_acc:.4f}", flush=True)
            one, packed = statistics.median(walls[False]), statistics.median(walls[True])
            print(f"student stage, {name}, embedded Ray with {os.cpu_count()} CPUs: one task per student {one:.2f} s, one task per pack "
                  f"{packed:.2f} s (medians of {reps}); ratio {one / packed:.2f}x  (above 1: packs pay)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--students", type=int, default=10)
    ap.add_argument("--rows", type=int, default=5400, help="training rows (the default run's transfer split less its held-out 10%%)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--stage", action="store_true", help="the student stage of a run instead, pack false vs true")
    ap.add_argument("--smoke", action="store_true", help="2 students, 300 rows, 1 epoch, 1 rep: checks that it runs (and the stage, tiny)")
    a = ap.parse_args()
    if a.smoke:
        a.students, a.rows, a.epochs, a.reps = 2, 300, 1, 1
    if a.stage or a.smoke:
        stage(a.reps, a.smoke)
        if a.stage:
            return
    worker_setup.setup_process()  # oneDNN off, as in a run's workers
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    n = round(a.rows / 0.9)  # `student.holdout_frac` 0.1 of them held out: a.rows train
    x = torch.randn(n, 40, generator=g)
    t = torch.softmax(2 * torch.randn(n, 10, generator=g), -1)
    print(f"{a.students} students, {a.rows} rows × 40 features, 10 classes, batch {a.batch}, {a.epochs} epoch(s); 1 process × 1 thread, "
          f"data in memory, no Ray; {a.reps} rep(s), the two layouts alternated")
    for name, model_cfg in MODELS.items():
        seq, pack = [], []
        for _ in range(a.reps):
            seq.append(one_at_a_time(model_cfg, x, t, a.students, a.epochs, a.batch))
            pack.append(as_pack(model_cfg, x, t, a.students, a.epochs, a.batch))
        s_med, p_med = statistics.median(r[0] for r in seq), statistics.median(r[0] for r in pack)
        print(f"{name} {model_cfg.width}×{model_cfg.depth}: one at a time {s_med:.2f} s, as one pack {p_med:.2f} s (medians; "
              f"{common.fmt_times([r[0] for r in seq])} vs {common.fmt_times([r[0] for r in pack])}); "
              f"held-out loss after training {seq[-1][1]:.4f} vs {pack[-1][1]:.4f}")
        print(f"{name}: ratio one at a time / pack = {s_med / p_med:.2f}x  (above 1: a pack pays)")


if __name__ == "__main__":
    main()
