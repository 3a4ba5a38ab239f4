"""Memory of the variance study's posterior pass as K grows: peak RSS at K=256 vs K=1024.

Trains (or reuses) one 1024-teacher ensemble, then runs the streaming posterior pass of the
variance study for K_max = 256 and K_max = 1024, each in a fresh child process, and prints each
child's peak RSS. Flat memory means the pass holds running sums, not the teachers' predictions.

    python benchmarks/bench_memory.py [--run-root /tmp/w2s-mem] [--smoke]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import tempfile

import common

from w2s_ray.config import load_config
from w2s_ray.data import stage_data
from w2s_ray.pipeline import run_pipeline
from w2s_ray.run import RunContext
from w2s_ray.studies.variance import variance_table
from w2s_ray.teachers import stage_teachers


def posterior_pass(args: tuple[str, int, dict], queue) -> None:
    root, k, extra = args
    cfg = load_config(None, {"output.root": root, "teachers.k": k} | extra)
    with RunContext.open(cfg) as ctx:  # both stages are cached: no Ray starts here
        data = stage_data(ctx)
        teachers = stage_teachers(ctx, data)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        variance_table(cfg, teachers, data.splits["test"].y, data.n_classes)
    queue.put((k, before / 1024, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-root", default=tempfile.mkdtemp(prefix="w2s-mem-"))
    ap.add_argument("--smoke", action="store_true", help="K 4 and 8 on small data: checks that it runs")
    a = ap.parse_args()
    ks, extra = ((4, 8), {**common.SMOKE_RUN, "teachers.epochs": 1}) if a.smoke else ((256, 1024), {})
    common.start_ray()
    run_pipeline(load_config(None, {"output.root": a.run_root, "teachers.k": ks[-1]} | extra), until="teachers")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    for k in ks:
        p = ctx.Process(target=posterior_pass, args=((a.run_root, k, extra), queue))
        p.start()
        p.join()
        k_, before, peak = queue.get()
        print(f"K={k_:>5}: peak RSS {peak:,.0f} MB (after loading the data: {before:,.0f} MB)")


if __name__ == "__main__":
    main()
