"""Would students pay as packs, as teachers do? S students of one model trained one after
another (the student stage's layout: one task per student) against the same S trained as one
vmapped pack with stacked parameters (the teachers' trick), each member on its own batch order
and soft targets, with the held-out slice scored every epoch (what per-member early stopping
needs). Same rows, batch size, epochs and Adam (`w2s_ray.adam`), one thread, data in memory,
no Ray: only the training step's cost is compared.

    python benchmarks/bench_student_pack.py                       # MLP and the default CNN, S = 10
    python benchmarks/bench_student_pack.py --students 20 --epochs 5 --reps 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import common
from w2s_ray import numerics

numerics.pin_this_process()  # before torch loads, as every process of a run starts

import torch  # noqa: E402
from torch.nn.functional import log_softmax  # noqa: E402

from w2s_ray import worker_setup  # noqa: E402
from w2s_ray.adam import Adam  # noqa: E402
from w2s_ray.config import ModelConfig  # noqa: E402
from w2s_ray.packs import TeacherPack, init_model  # noqa: E402

MODELS = {"mlp": ModelConfig(name="mlp", width=64, depth=2), "cnn1d": ModelConfig(name="cnn1d", width=32, depth=3)}


def soft_ce(logits: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return -(t * log_softmax(logits, -1)).sum(-1).mean()


def one_at_a_time(model_cfg, x, t, hold, students: int, epochs: int, batch: int) -> tuple[float, float]:
    """Seconds for every student trained after the other, and their mean final held-out loss."""
    t0, finals = time.perf_counter(), []
    for s in range(students):
        m = init_model(model_cfg, x.shape[1], t.shape[1], s)
        opt = Adam(m.parameters(), lr=2e-3)
        gen = torch.Generator().manual_seed(s)
        for _ in range(epochs):
            perm = torch.randperm(len(x), generator=gen)
            for i in range(0, len(x), batch):
                rows = perm[i : i + batch]
                opt.zero_grad(set_to_none=True)
                soft_ce(m(x[rows]), t[rows]).backward()
                opt.step()
            with torch.no_grad():
                loss = float(soft_ce(m(hold[0]), hold[1]))
        finals.append(loss)
    return time.perf_counter() - t0, statistics.mean(finals)


def as_pack(model_cfg, x, t, hold, students: int, epochs: int, batch: int) -> tuple[float, float]:
    """Seconds for the same students as one pack (the teachers' `TeacherPack`: stacked
    parameters, a vmapped step), each on its own batch order and soft targets; the held-out loss
    of every member every epoch."""
    t0 = time.perf_counter()
    pack = TeacherPack(model_cfg, x.shape[1], t.shape[1], list(range(students)))
    params, buffers = pack.params, pack.buffers
    opt = Adam(params.values(), lr=2e-3)
    gens = [torch.Generator().manual_seed(s) for s in range(students)]
    for _ in range(epochs):
        perms = torch.stack([torch.randperm(len(x), generator=g) for g in gens])  # [S, N]
        for i in range(0, len(x), batch):
            rows = perms[:, i : i + batch]
            xb, tb = x[rows], t[rows]  # [S, B, D], [S, B, C]
            opt.zero_grad(set_to_none=True)
            logits = pack._batched(params, buffers, xb)
            (-(tb * log_softmax(logits, -1)).sum(-1).mean(-1)).sum().backward()  # each member its own mean loss
            opt.step()
        with torch.no_grad():
            per_member = -(hold[1] * log_softmax(pack._shared(params, buffers, hold[0]), -1)).sum(-1).mean(-1)  # [S]
    return time.perf_counter() - t0, float(per_member.mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--students", type=int, default=10)
    ap.add_argument("--rows", type=int, default=5400, help="training rows (the default run's transfer split less its held-out 10%%)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="2 students, 300 rows, 1 epoch, 1 rep: checks that it runs")
    a = ap.parse_args()
    if a.smoke:
        a.students, a.rows, a.epochs, a.reps = 2, 300, 1, 1
    worker_setup.setup_process()  # oneDNN off, as in a run's workers
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.rows, 40, generator=g)
    t = torch.softmax(2 * torch.randn(a.rows, 10, generator=g), -1)
    hold = (torch.randn(a.rows // 9, 40, generator=g), torch.softmax(2 * torch.randn(a.rows // 9, 10, generator=g), -1))
    print(f"{a.students} students, {a.rows} rows × 40 features, 10 classes, batch {a.batch}, {a.epochs} epoch(s); 1 process × 1 thread, "
          f"data in memory, no Ray; {a.reps} rep(s), the two layouts alternated")
    for name, model_cfg in MODELS.items():
        seq, pack = [], []
        for _ in range(a.reps):
            seq.append(one_at_a_time(model_cfg, x, t, hold, a.students, a.epochs, a.batch))
            pack.append(as_pack(model_cfg, x, t, hold, a.students, a.epochs, a.batch))
        s_med, p_med = statistics.median(r[0] for r in seq), statistics.median(r[0] for r in pack)
        print(f"{name} {model_cfg.width}×{model_cfg.depth}: one at a time {s_med:.2f} s, as one pack {p_med:.2f} s (medians; "
              f"{common.fmt_times([r[0] for r in seq])} vs {common.fmt_times([r[0] for r in pack])}); "
              f"held-out loss after training {seq[-1][1]:.3f} vs {pack[-1][1]:.3f}")
        print(f"{name}: ratio one at a time / pack = {s_med / p_med:.2f}x  (above 1: a pack pays)")


if __name__ == "__main__":
    main()
