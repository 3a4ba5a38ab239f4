"""(h) One pack of teachers at scale, without Ray: training, prediction and the posterior's sums
timed apart, and the sums as they were before they were taken in blocks of rows.

A pack of --k MLP teachers (the default teacher model) trains on 2,000 synthetic rows
(MNIST-1D's shape), then predicts --n rows block by block as a pack worker does
(`workers.pack_log_probs`, `workers.pred_rows` rows per block) and folds each block into the
float64 sums (`PosteriorAccumulator.add`, cache-sized blocks of rows). Beside it, in the same
process on the same blocks: the former prediction (`vmap` and autograd's ops, before the
written-out chain of `packs.chain_forward`) and the former whole-block float64 formula, each
with whether it gives the same bits. One process with --threads torch threads; this process's peak RSS at the end (the
former formula runs last, so the peak before it is printed first).

    python benchmarks/bench_pack_sums.py [--n 300000] [--k 64] [--threads 1] [--smoke]
"""

from __future__ import annotations

import argparse
import resource
import time

import common  # noqa: F401
from w2s_ray import numerics

numerics.pin_this_process()  # before torch loads: the references compute as the stage's workers do

import numpy as np
import torch

from w2s_ray.config import DataConfig, TeachersConfig
from w2s_ray.packs import TeacherPack
from w2s_ray.posterior import PosteriorAccumulator, sum_rows
from w2s_ray.synthetic import load_synthetic
from w2s_ray.workers import fit_pack, pack_log_probs, pred_rows


def former_add(acc: PosteriorAccumulator, logp: torch.Tensor) -> None:
    """`PosteriorAccumulator.add` before blocks of rows: the whole `[k, rows, C]` at once."""
    logp64 = logp.double()
    p64 = logp64.exp()
    acc.sum_p += p64.sum(0)
    acc.sum_logp += logp64.sum(0)
    acc.sum_neg_entropy += torch.where(p64 > 0, p64 * logp64, torch.zeros_like(p64)).sum((0, 2))
    acc.k += logp.shape[0]


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300_000)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--smoke", action="store_true", help="N 5,000, K 4: checks that it runs")
    a = ap.parse_args()
    if a.smoke:
        a.n, a.k = 5_000, 4
    torch.set_num_threads(a.threads)
    x, y = load_synthetic(DataConfig(source="synthetic", num_samples=a.n + 2_010, n_weak=2_000, n_transfer=a.n, n_test=10, chunk_size=100_000))
    cfg = TeachersConfig(k=max(a.k, 2), epochs=10)
    c = int(y.max()) + 1
    data = {"x_weak": x[:2000], "y_weak": y[:2000]}
    t0 = time.perf_counter()
    pack, _ = fit_pack(data, cfg, c, list(range(a.k)))
    train_s = time.perf_counter() - t0
    x_n = x[2000 : 2000 + a.n]
    print(f"pack of {a.k} MLP teachers, N = {a.n:,} rows, C = {c}, 1 process × {a.threads} thread(s); "
          f"prediction blocks of {pred_rows(a.k, c):,} rows, sums in blocks of {sum_rows(a.k, c)} rows")
    blocks, predict_s = [], 0.0
    it = pack_log_probs(pack, x_n, cfg, a.k, c)
    acc, sums_s = PosteriorAccumulator(a.n, c), 0.0
    r0 = 0
    while True:
        t0 = time.perf_counter()
        block = next(it, None)
        predict_s += time.perf_counter() - t0
        if block is None:
            break
        part = PosteriorAccumulator(block.shape[1], c)
        t0 = time.perf_counter()
        part.add(torch.from_numpy(block))
        sums_s += time.perf_counter() - t0
        for name, t in part.sums().items():
            getattr(acc, name)[r0 : r0 + block.shape[1]] = t
        blocks.append(block)
        r0 += block.shape[1]
    peak_now = peak_mb()
    former_s, same = 0.0, True
    r0 = 0
    for block in blocks:
        part = PosteriorAccumulator(block.shape[1], c)
        t0 = time.perf_counter()
        former_add(part, torch.from_numpy(block))
        former_s += time.perf_counter() - t0
        same &= all(torch.equal(t, getattr(acc, name)[r0 : r0 + block.shape[1]]) for name, t in part.sums().items())
        r0 += block.shape[1]
    # the former prediction, `vmap` with autograd's path (`TeacherPack(autograd=True)`), same parameters
    former = TeacherPack(cfg.model, x.shape[1], c, pack.seeds, autograd=True)
    for name, t in pack.params.items():
        former.params[name].data.copy_(t)
    t0 = time.perf_counter()
    pred_same = all(np.array_equal(b, f) for b, f in zip(blocks, pack_log_probs(former, x_n, cfg, a.k, c)))
    former_predict_s = time.perf_counter() - t0
    print(f"training  {train_s:8.2f} s")
    print(f"prediction {predict_s:7.2f} s   (through vmap, as before the written-out chain: {former_predict_s:.2f} s, "
          f"ratio former / now {former_predict_s / max(predict_s, 1e-9):.1f}x; same bits: {pred_same})")
    print(f"sums      {sums_s:8.2f} s   (former whole-block formula on the same blocks: {former_s:.2f} s, "
          f"ratio former / now {former_s / max(sums_s, 1e-9):.1f}x; same float64 bits: {same})")
    print(f"peak RSS of this process: {peak_now:,.0f} MB before the former formula ran, {peak_mb():,.0f} MB after "
          f"(it holds every block's log-probs for the comparison: {sum(b.nbytes for b in blocks) / 2**20:,.0f} MB)")
    if not same:
        raise SystemExit("the sums in blocks of rows differ from the former formula")
    if not pred_same:
        raise SystemExit("the written-out chain's log-probs differ from vmap's")


if __name__ == "__main__":
    main()
