"""Memory of the variance study's posterior pass as K grows: peak RSS at K=256 vs K=1024.

Trains (or reuses) one 1024-teacher ensemble, then runs the streaming posterior pass of the
variance study for K_max = 256 and K_max = 1024, each in a fresh child process, and prints each
child's peak RSS. Flat memory means the pass holds running sums, not the teachers' predictions.

    python benchmarks/bench_memory.py [--run-root /tmp/w2s-mem]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import tempfile

import common  # noqa: F401


def posterior_pass(args: tuple[str, int], queue) -> None:
    from w2s_ray import artifacts
    from w2s_ray.config import load_config
    from w2s_ray.pipeline import RunState, stage_data
    from w2s_ray.study import variance_table

    root, k = args
    cfg = load_config(None, {"output.root": root, "teachers.k": k})
    st = RunState(cfg)
    data = stage_data(st)
    tdir = artifacts.stage_dir(cfg.run_dir, "teachers", st.keys.teachers)
    packs = artifacts.read_manifest(tdir, verify=False)["packs"]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    variance_table(cfg, tdir, packs, data.splits["test"].y, data.n_classes)
    queue.put((k, before / 1024, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-root", default=tempfile.mkdtemp(prefix="w2s-mem-"))
    a = ap.parse_args()
    from w2s_ray.config import load_config
    from w2s_ray.pipeline import run_pipeline

    common.start_ray()
    run_pipeline(load_config(None, {"output.root": a.run_root, "teachers.k": 1024}), until="teachers")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    for k in (256, 1024):
        p = ctx.Process(target=posterior_pass, args=((a.run_root, k), queue))
        p.start()
        p.join()
        k_, before, peak = queue.get()
        print(f"K={k_:>5}: peak RSS {peak:,.0f} MB (after loading the data: {before:,.0f} MB)")


if __name__ == "__main__":
    main()
