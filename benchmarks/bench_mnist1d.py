"""(c) MNIST-1D generation: the project's seeded chunks as parallel Ray tasks vs the package's loop.

    python benchmarks/bench_mnist1d.py [--samples 20000] [--reps 3] [--smoke]
"""

from __future__ import annotations

import argparse

import common

from w2s_ray.config import DataConfig
from w2s_ray.mnist1d_gen import load_mnist1d, mnist1d_chunk, mnist1d_plan


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=20000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, one rep: checks that it runs")
    a = ap.parse_args()
    if a.smoke:
        a.samples, a.reps = 2000, 1
    common.start_ray()
    import ray

    from w2s_ray.raytools import parallel_map

    n_cpus = int(ray.cluster_resources()["CPU"])
    cfg = DataConfig(num_samples=a.samples, chunk_size=-(-a.samples // n_cpus), n_weak=10, n_transfer=10, n_test=10)
    ray_map = lambda fn, items: parallel_map(fn, list(items))  # noqa: E731
    load_mnist1d(cfg.model_copy(update={"num_samples": 100, "chunk_size": 100}), ray_map)  # warm workers
    t_ray, ts_ray, (x, _) = common.timed(lambda: load_mnist1d(cfg, ray_map), a.reps)
    assert len(x) >= a.samples
    t_pkg, ts_pkg, _ = common.timed(lambda: mnist1d_chunk(a.samples, 0), a.reps)
    print(f"project: {len(mnist1d_plan(cfg))} Ray tasks on {n_cpus} CPUs  {a.samples / t_ray:>10,.0f} samples/s  median of {common.fmt_times(ts_ray)}")
    print(f"package make_dataset loop          {a.samples / t_pkg:>10,.0f} samples/s  median of {common.fmt_times(ts_pkg)}")
    print(f"ratio project / package = {t_pkg / t_ray:.2f}x   (target >= 1.8 on 2 cores)")


if __name__ == "__main__":
    main()
