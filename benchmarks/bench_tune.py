"""Tune overhead: a 16-trial grid through `w2s-ray tune` vs the same 16 student trainings run one
after another in one process without Ray. The search's confirmation of its chosen point on
fresh seeds (`confirm_seeds`) is turned off: it trains students the reference does not.

    python benchmarks/bench_tune.py [--space tune_spaces/grid_capacity_x_rce.yaml] [--run-root /tmp/w2s-bench] [--smoke]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import tempfile
import time
from pathlib import Path

import common
import torch

from w2s_ray.config import load_config
from w2s_ray.pipeline import run_pipeline, run_tune
from w2s_ray.run import RunContext
from w2s_ray.space import apply_params, load_space
from w2s_ray.student import recipe
from w2s_ray.tune import trial_data


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--space", default="tune_spaces/grid_capacity_x_rce.yaml")
    ap.add_argument("--run-root", default=tempfile.mkdtemp(prefix="w2s-bench-"))
    ap.add_argument("--smoke", action="store_true", help="small data and a 2-point grid: checks that it runs")
    a = ap.parse_args()
    if a.smoke:
        a.space = str(Path(a.run_root) / "smoke_space.yaml")
        Path(a.space).write_text("search: grid\nscheduler: {type: none}\nconfirm_seeds: 0\n"
                                 "params: {student.rce_weight: {type: grid, values: [0.0, 0.5]}}\n")
    cfg = load_config(None, {"output.root": a.run_root, "output.name": "bench"} | (common.SMOKE_RUN if a.smoke else {}))
    # the search alone: its confirmation (`confirm_seeds`, fresh seeds of the chosen point and
    # the baseline after the trials) trains students the sequential reference does not
    space = load_space(a.space, cfg).model_copy(update={"confirm_seeds": 0})
    common.start_ray()
    import ray

    st = run_pipeline(cfg, until="student")  # cached teachers, labels and ceiling, outside the timing

    t0 = time.perf_counter()
    summary = run_tune(cfg, space, "bench")
    t_tune = time.perf_counter() - t0
    n = summary["n_trials"]

    with RunContext.open(cfg) as ctx:
        (job, test), refs = trial_data(ctx, st)
    names = list(space.params)
    points = [dict(zip(names, vals)) for vals in itertools.product(*(space.params[k].values for k in names))]
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    for point in points:  # what each trial does (`trial.process_trial`), without Tune's reports
        s = apply_params(cfg, point).student
        inputs = recipe.read_inputs(dataclasses.replace(job, cfg=s, target=s.targets[0]), test)
        recipe.evaluate(inputs, recipe.train(inputs).state_dict)
    t_seq = time.perf_counter() - t0
    cpus = int(ray.cluster_resources()["CPU"])
    print(f"Tune grid: {n} trials on {cpus} CPUs in {t_tune:.1f} s = {60 * n / t_tune:.1f} trials/min (confirm_seeds: 0)")
    print(f"sequential, one process, no Ray: {len(points)} trainings in {t_seq:.1f} s = {60 * len(points) / t_seq:.1f} trainings/min")
    print(f"ratio Tune wall / sequential wall = {t_tune / t_seq:.2f}x   (target <= 1.3 with 2 concurrent trials)")


if __name__ == "__main__":
    main()
