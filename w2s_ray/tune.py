"""Ray Tune search over the student: capacity × reverse-CE weight × target × learning rate.

The teachers, pseudo-labels, gold ceiling and baseline students come from the pipeline's cache
(computed once, never per trial). Every trial reads the label columns it needs from the labels
stage's parts itself (`packfiles.LabelSource`); the driver hands trials where they are and the
test split (`tune.with_parameters`). With `student.workers > 1` a trial runs a Ray Train run
(`trial.spread_trial`): its workers hold the space's resources, the trial itself no CPU, and the
label stream's Ray Data tasks ask for no CPU, so trials holding every CPU cannot starve it (the
known Tune + Ray Data hang).

Every trial reports, after each epoch, the metrics of the student it would return now (its
best epoch so far): `val_teacher_ce` (cross-entropy against the dual posterior mean on the
held-out transfer slice: no gold label) is the default selection metric; `test_acc` and PGR
are recorded for every trial, and `selection: oracle` selects on `test_acc` instead.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import pyarrow.fs as pafs
import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from w2s_ray import metrics, raytools
from w2s_ray.config import ExperimentConfig, to_yaml, with_values
from w2s_ray.errors import W2SError
from w2s_ray.report import plot_capacity, plot_heatmaps, write_table
from w2s_ray.run import RunContext
from w2s_ray.results import Stages
from w2s_ray.space import SearchSpace, apply_params, baseline_point
from w2s_ray.replicates import paired, summarize, verdict
from w2s_ray.student.recipe import StudentJob, TestSplit
from w2s_ray.students import StudentInputs, stage_students
from w2s_ray.trial import FinishedTrials, TrialFault, student_trial

REALISTIC = ("val_teacher_ce", "min")
ORACLE = ("test_acc", "max")
METRICS = ["val_teacher_ce", "val_agreement", *(f.name for f in dataclasses.fields(metrics.StudentEval)), "pgr_vs_teacher", "pgr_vs_ensemble", "best_epoch", "epoch"]


# --- search construction -------------------------------------------------------------------


def n_trials(space: SearchSpace) -> int:
    """Trials of a search: its samples, times the size of the grid."""
    return space.num_samples * math.prod(len(p.values) for p in space.params.values() if p.type == "grid")


def tune_param(p) -> Any:
    if p.type == "uniform":
        return tune.uniform(p.low, p.high)
    if p.type == "loguniform":
        return tune.loguniform(p.low, p.high)
    if p.type == "int":
        return tune.randint(int(p.low), int(p.high) + 1)
    if p.type == "logint":
        return tune.lograndint(int(p.low), int(p.high) + 1)
    if p.type == "choice":
        return tune.choice(list(p.values))
    return tune.grid_search(list(p.values))


def check_cluster(ctx: RunContext, space: SearchSpace) -> None:
    """Start or join the configured Ray (`ray.address`, `ray.num_cpus`: also when every stage is
    cached) and refuse trials the cluster cannot place, which would otherwise wait forever."""
    ctx.executor.needs_ray("w2s-ray tune (Ray Tune)")
    ctx.ray()
    check_placeable(space, None, ctx.cfg.student.workers, ctx.cfg.ray.placement_wait_s)


def check_placeable(space: SearchSpace, cluster: dict[str, float] | None, workers: int = 1, wait_s: float = 0.0) -> None:
    """Trials the cluster (`cluster`, or the live one when None) cannot place are refused."""
    per = "one trial" if workers == 1 else f"one trial ({workers} Ray Train workers)"
    raytools.check_placeable({"CPU": space.resources.cpu * workers, "GPU": space.resources.gpu * workers},
                             {"CPU": "the search space's resources.cpu", "GPU": "the search space's resources.gpu"}, cluster, per, wait_s)


def max_concurrent(space: SearchSpace, resources: dict[str, float], workers: int = 1) -> int:
    n = int(resources.get("CPU", 1) // (space.resources.cpu * workers))
    if space.resources.gpu > 0:
        n = min(n, int(resources.get("GPU", 0) / (space.resources.gpu * workers) + 1e-9))
    return max(1, min(space.max_concurrent or n, n))


class TrialLines(tune.Callback):
    """Tune's progress as one line per finished trial on stderr (Tune's own trial tables, printed
    over and over to stdout, only with `--verbose`)."""

    def __init__(self, params: list[str], total: int, log) -> None:
        self.params, self.total, self.log, self.ended = params, total, log, 0

    def _line(self, trial, how: str) -> None:
        self.ended += 1
        m = trial.last_result or {}
        point = ", ".join(f"{k.removeprefix('student.')}={_short(trial.config.get(k))}" for k in self.params)
        got = f"val_teacher_ce {m['val_teacher_ce']:.4f}, test acc {m['test_acc']:.4f}, {m.get('epoch', '?')} epochs" if "test_acc" in m else how
        self.log(f"tune: trial {self.ended}/{self.total} {trial.trial_id} ({point}): {got}")

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._line(trial, "done")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._line(trial, "failed (its error is in trials.parquet)")


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def build_tuner(ctx: RunContext, space: SearchSpace, name: str, search_dir: Path, trainable, resume: bool, verbose: bool = False):
    cfg = ctx.cfg
    metric, mode = ORACLE if cfg.student.selection == "oracle" else REALISTIC
    # Tune keeps its experiment state and checkpoints in the run's store when it has one
    fs, experiment = ctx.run.remote(search_dir) or (None, str(search_dir.resolve()))
    if resume and tune.Tuner.can_restore(experiment, storage_filesystem=fs):
        return tune.Tuner.restore(experiment, trainable=trainable, resume_errored=True, storage_filesystem=fs)
    param_space = {k: tune_param(p) for k, p in space.params.items()}
    limit = max_concurrent(space, ray.cluster_resources(), cfg.student.workers)
    search_alg = None
    if space.search == "optuna":
        search_dir.mkdir(parents=True, exist_ok=True)
        study_db = optuna.storages.RDBStorage(f"sqlite:///{(search_dir / 'optuna.db').resolve()}")
        baseline = baseline_point(space, cfg) if space.baseline else None
        searcher = OptunaSearch(
            metric=metric,
            mode=mode,
            sampler=optuna.samplers.TPESampler(seed=space.seed),
            study_name=name,
            storage=study_db,
            points_to_evaluate=[baseline] if baseline else None,
        )
        search_alg = ConcurrencyLimiter(searcher, max_concurrent=limit)
    elif space.search == "random":
        search_alg = BasicVariantGenerator(random_state=space.seed, max_concurrent=limit)
    scheduler = None
    if space.scheduler.type == "asha":
        scheduler = ASHAScheduler(time_attr="epoch", max_t=cfg.student.epochs, grace_period=min(space.scheduler.grace_period, cfg.student.epochs), reduction_factor=space.scheduler.reduction_factor)
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(metric=metric, mode=mode, search_alg=search_alg, scheduler=scheduler, num_samples=space.num_samples, max_concurrent_trials=limit, reuse_actors=True),
        run_config=tune.RunConfig(
            name=name,
            storage_path=experiment.rsplit("/", 1)[0],
            storage_filesystem=fs,
            failure_config=tune.FailureConfig(max_failures=space.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=4),  # >1: the saved experiment state may lag the newest checkpoint
            verbose=1 if verbose else 0,
            callbacks=None if verbose else [TrialLines(list(space.params), n_trials(space), ctx.log)],
        ),
    )


# --- the search ----------------------------------------------------------------------------


def trial_data(ctx: RunContext, stages: Stages) -> tuple[tuple[StudentJob, TestSplit], dict]:
    """What every trial needs: where its pseudo-labels are (each trial reads them itself), the
    test split with its posterior, and the reference accuracies."""
    inputs = StudentInputs.load(ctx, stages.data, stages.labels)
    job = inputs.job(ctx.cfg.student, ctx.cfg.student.targets[0])  # each trial puts its point's config in
    refs = {
        "n_classes": stages.data.n_classes,
        "weak_acc": float(stages.teachers.accuracies().mean()),
        "ensemble_acc": stages.labels.posterior.test_acc_dual,
        "ceiling_acc": stages.students.ceiling.test_acc,
    }
    return (job, inputs.test), refs


def run_search(ctx: RunContext, stages: Stages, space: SearchSpace, name: str, resume: bool = False, fault: TrialFault | None = None,
               verbose: bool = False) -> dict[str, Any]:
    """A Tune search over the student on the run's cached stages (which must include the ceiling)."""
    search_dir = ctx.run / "tune" / name
    if resume:
        ctx.run.fetch(search_dir)  # the Optuna study of a search begun on another machine
    else:
        old = search_dir.with_name(f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
        if ctx.run.move_aside(search_dir, old):
            ctx.log(f"tune: a previous search moved to {old}")
    search_dir.parent.mkdir(parents=True, exist_ok=True)
    # short epochs make Tune snapshot its state often (to never point at a deleted checkpoint)
    # and warn about it on every snapshot; the snapshot is cheap on local disk
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    (job, test), refs = trial_data(ctx, stages)
    refs["cpus"], refs["gpus"] = space.resources.cpu, space.resources.gpu
    refs["train_dir"] = str(search_dir / "train")  # a trial across workers keeps its Ray Train run here, by trial id
    fs, experiment = ctx.run.remote(search_dir) or (pafs.LocalFileSystem(), str(search_dir.resolve()))
    finished = FinishedTrials(fs, f"{experiment}/finished")
    workers = ctx.cfg.student.workers
    # a trial across Ray Train workers holds no CPU itself (its workers ask for theirs; holding
    # one would leave 2 workers no room on 2 CPUs); Tune refuses an empty bundle, so it holds a
    # token 1 MiB of Ray's logical `memory` resource
    own = {"cpu": space.resources.cpu, "gpu": space.resources.gpu} if workers == 1 else {"cpu": 0, "memory": 2**20}
    trainable = tune.with_resources(
        tune.with_parameters(student_trial, job=job, test=test, base=ctx.cfg.model_dump(mode="json"), refs=refs, fault=fault, finished=finished), own)
    per = "per trial" if workers == 1 else f"per worker, {workers} Ray Train workers per trial"
    ctx.log(f"tune: {space.search} search '{name}', {space.num_samples} sample(s), {space.resources.cpu} CPU / {space.resources.gpu} GPU {per} → {search_dir}")
    t0 = time.perf_counter()
    grid = build_tuner(ctx, space, name, search_dir, trainable, resume, verbose).fit()
    if (search_dir / "optuna.db").is_file():
        ctx.run.publish(search_dir / "optuna.db")
    ctx.log(f"tune: {len(grid)} trials in {time.perf_counter() - t0:.1f}s")
    drop_orphan_trials(ctx, search_dir, grid)
    expected = n_trials(space)
    if grid.num_terminated + grid.num_errors < max(len(grid), expected) or unfinished_in_saved_state(fs, experiment):
        raise W2SError(
            f"the search was interrupted ({grid.num_terminated + grid.num_errors} of {expected} trials done); "
            f"continue it with: w2s-ray tune ... --space ... --resume"
        )
    table = trials_table(grid, list(space.params))
    summary = write_outputs(ctx, space, search_dir, table, refs)
    if space.confirm_seeds:
        best = apply_params(ctx.cfg, {k: summary["chosen"][k] for k in space.params})  # best.yaml
        summary["confirmed"] = confirm(ctx, stages, space, search_dir, best)
        ctx.run.write_json(search_dir / "summary.json", summary)
    return summary


def unfinished_in_saved_state(fs: pafs.FileSystem, experiment: str) -> int:
    """Trials the experiment state Tune saved last calls neither TERMINATED nor ERROR.

    On SIGINT Tune saves its state, then stops every trial it has an actor for and marks it
    TERMINATED in the ResultGrid, pending trials whose actors were scheduled included: in one
    CI run all six trials of an interrupted grid read TERMINATED and the search wrote its
    results. The state saved before that stop keeps their true status (RUNNING, PENDING)."""
    saved = tune.ExperimentAnalysis(experiment, storage_filesystem=fs)
    return sum(t.status not in ("TERMINATED", "ERROR") for t in saved.trials)


CONFIRM_SEED_OFFSET = 1000
"""Confirmation seeds start here, away from the seed every trial used: the chosen point was
picked for how it did on that seed (the winner's curse), so it is measured again on others."""


def confirm(ctx: RunContext, stages: Stages, space: SearchSpace, search_dir: Path, best: ExperimentConfig) -> dict[str, Any]:
    """The chosen point and the space's baseline, each trained with `space.confirm_seeds` fresh
    seeds (the student stage, each student cached on its key), compared on the same seeds."""
    n = space.confirm_seeds
    fresh = {"student.seeds": n, "student.seed": ctx.cfg.student.seed + CONFIRM_SEED_OFFSET, "student.ceiling": False, "posterior.single_teachers": None}
    runs = {"chosen": with_values(best, fresh, "tune confirmation"),
            "baseline": with_values(apply_params(ctx.cfg, space.baseline, "search space baseline"), fresh, "tune confirmation")}
    accs = {}
    for name, cfg in runs.items():
        ctx.log(f"tune: confirming the {name} point with {n} fresh seeds")
        st = stage_students(ctx.derive(cfg), stages.data, stages.teachers, stages.labels)
        accs[name] = [r.test_acc for r in st.replicates[cfg.student.targets[0]]]
    out = {name: summarize(a) for name, a in accs.items()}
    out["chosen_minus_baseline"] = paired(accs["chosen"], accs["baseline"])
    rows = [{"point": name, "seed": runs[name].student.seed + i, "test_acc": a} for name, v in accs.items() for i, a in enumerate(v)]
    write_table(ctx.run, search_dir / "confirm.parquet", pd.DataFrame(rows))
    d = out["chosen_minus_baseline"]
    if d["ci"]:
        print(f"confirmed over {n} fresh seeds: chosen {out['chosen']['mean']:.4f} [{out['chosen']['ci'][0]:.4f}, {out['chosen']['ci'][1]:.4f}], "
              f"baseline {out['baseline']['mean']:.4f} [{out['baseline']['ci'][0]:.4f}, {out['baseline']['ci'][1]:.4f}]; "
              f"paired difference {d['mean']:+.4f} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}]: {verdict(d['ci'])} that the chosen point is better")
    return out


def drop_orphan_trials(ctx: RunContext, search_dir: Path, grid) -> None:
    """Remove trial directories the resumed search does not know: a trial created after Tune's
    last saved state, before the driver was killed, is created again on resume under a new name
    (it then returns its finished record at once, see `trial.FinishedTrials`)."""
    if ctx.run.remote(search_dir) is not None:
        return  # in an object store Tune's trial folders stay; the tables list the search's own
    known = {Path(r.path).name for r in grid}
    for d in search_dir.iterdir():
        if d.is_dir() and (d / "params.json").is_file() and d.name not in known:
            shutil.rmtree(d, ignore_errors=True)
            ctx.log(f"tune: removed {d.name}, a trial the resumed search replaced")


def trials_table(grid, param_names: list[str]) -> pd.DataFrame:
    rows = []
    for r in grid:
        m = r.metrics or {}
        row = {"trial_id": m.get("trial_id") or Path(r.path).name, "status": "ERROR" if r.error else "TERMINATED",
               "error": str(r.error).strip().splitlines()[-1] if r.error else None, "path": r.path}
        row.update({k: r.config.get(k) for k in param_names})
        row.update({key: m.get(key, math.nan) for key in METRICS})
        row["wall_s"] = m.get("time_total_s", math.nan)
        rows.append(row)
    return pd.DataFrame(rows)


def write_outputs(ctx: RunContext, space: SearchSpace, search_dir: Path, table: pd.DataFrame, refs: dict) -> dict[str, Any]:
    run = ctx.run
    write_table(run, search_dir / "trials.parquet", table)
    with run.atomic(search_dir / "trials.csv") as tmp:
        table.to_csv(tmp, index=False)
    ok = table.dropna(subset=["test_acc"])
    if ok.empty:
        first = table.iloc[0]
        raise W2SError(f"every trial failed; the first ({first['trial_id']}): {first['error']} (its log: {first['path']})")
    metric, mode = ORACLE if ctx.cfg.student.selection == "oracle" else REALISTIC
    pick = ok.loc[ok[metric].idxmin() if mode == "min" else ok[metric].idxmax()]
    oracle = ok.loc[ok["test_acc"].idxmax()]
    params = list(space.params)
    best_cfg = apply_params(ctx.cfg, {k: _plain(pick[k]) for k in params})
    run.write_text(search_dir / "best.yaml", to_yaml(best_cfg))
    plot_heatmaps(run, table, search_dir / "heatmap.png")
    plot_capacity(run, table, search_dir / "capacity.png")
    summary = {
        "selection_metric": metric,
        "chosen": {k: _plain(v) for k, v in pick.items()},
        "oracle": {k: _plain(v) for k, v in oracle.items()},
        "gap_test_acc": float(oracle["test_acc"] - pick["test_acc"]),
        "references": refs,
        "n_trials": int(len(table)),
        "n_errors": int((table["status"] == "ERROR").sum()),
    }
    run.write_json(search_dir / "summary.json", summary)
    cols = params + ["val_teacher_ce", "test_acc", "pgr_vs_teacher", "pgr_vs_ensemble", "epoch", "wall_s"]
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format", "{:.4f}".format):
        print(table.sort_values("test_acc", ascending=False)[cols].to_string(index=False))
    print(
        f"\nchosen by {metric} (no gold labels unless selection: oracle): test acc {pick['test_acc']:.4f}, PGR/teacher {pick['pgr_vs_teacher']:.3f}"
        f"\noracle best (gold test accuracy):                  test acc {oracle['test_acc']:.4f}   gap {summary['gap_test_acc']:.4f}"
        f"\nbest config: {search_dir / 'best.yaml'}"
    )
    return summary


def _plain(v: Any) -> Any:
    if isinstance(v, (np.generic,)):
        return v.item()
    return v
