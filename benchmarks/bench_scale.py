"""Driver memory of the teacher and labels stages as K grows, and what each keep_predictions
setting writes: the part of issue 12's scale benchmark that the pack-writing workers address.

A first child process builds the default data (cached); then each setting runs the teacher and
labels stages on it (`until="labels"`, data from the cache) in a fresh child process with its
own embedded Ray, which reports its own peak RSS (the driver's, not the workers'), the wall
time and the bytes the teacher stage wrote.

    python benchmarks/bench_scale.py [--ks 64 256 1024] [--keep all none] [--run-root DIR]

Not yet measured here (see benchmarks/README.md): N = 100k / 1M rows and K = 4096, which need
the data stage to stop loading every split into the driver.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import tempfile
import time
from pathlib import Path

import common  # noqa: F401


def one(args: tuple[str, int, str], queue) -> None:
    from w2s_ray.config import load_config
    from w2s_ray.pipeline import run_pipeline

    root, k, keep = args
    t0 = time.perf_counter()
    st = run_pipeline(load_config(None, {"output.root": root, "output.name": "scale", "teachers.k": max(k, 2), "teachers.keep_predictions": keep}), until="data" if k == 0 else "labels")
    if k == 0:
        queue.put(None)
        return
    wall = time.perf_counter() - t0
    written = sum(f.stat().st_size for f in Path(st.teachers.dir).rglob("*") if f.is_file())
    queue.put((k, keep, wall, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, written / 2**20))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ks", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--keep", nargs="+", default=["all", "none"])
    ap.add_argument("--run-root", default=tempfile.mkdtemp(prefix="w2s-scale-"))
    a = ap.parse_args()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=one, args=((a.run_root, 0, "all"), queue))  # the data, cached for the others
    p.start()
    p.join()
    queue.get()
    print(f"{'K':>6} {'keep':>7} {'wall s':>8} {'driver peak RSS MB':>19} {'teacher stage MB':>17}")
    for k in a.ks:
        for keep in a.keep:
            p = ctx.Process(target=one, args=((a.run_root, k, keep), queue))
            p.start()
            p.join()
            k_, keep_, wall, rss, mb = queue.get()
            print(f"{k_:>6} {keep_:>7} {wall:>8.1f} {rss:>19,.0f} {mb:>17,.1f}", flush=True)


if __name__ == "__main__":
    main()
