"""The Tune trial: one student trained on one search point, reporting and checkpointing each epoch.

It runs in Tune's trial workers, so it sits in a module of its own that imports Ray Tune, torch
and the math modules only (not the driver's search, report and figure code in `tune`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from w2s_ray import metrics
from w2s_ray.config import ExperimentConfig
from w2s_ray.space import apply_params
from w2s_ray.student import recipe
from w2s_ray.student.ray_train import fit_student
from w2s_ray.student.recipe import Evaluation, StudentJob, TestSplit


@dataclass(frozen=True)
class TrialFault:
    """For tests of fault tolerance only (not in the space schema): the first trial to reach
    `epoch` raises once, `marker` being the file that says it has; without a marker every trial
    raises there, every time."""

    epoch: int
    marker: str | None = None


@dataclass(frozen=True)
class FinishedTrials:
    """The final report of every trial that ran to its last epoch, one JSON file per search
    point under `<search>/finished/`, written by the trial itself (any pyarrow filesystem).

    Tune saves its experiment state every few seconds; a driver killed between a trial's end
    and the next save resumed that trial (or, when the searcher's state was older still, asked
    for the same point again as a new trial) and trained it again: 1–2 finished trials per
    resume in 5 of 5 tries. A trial whose point has a record reports it and returns at once."""

    fs: pafs.FileSystem
    base: str

    def path(self, config: dict) -> str:
        key = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:20]
        return f"{self.base}/{key}.json"

    def get(self, config: dict) -> dict | None:
        path = self.path(config)
        if self.fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with self.fs.open_input_stream(path) as f:
            record = json.loads(f.read())
        return record["result"] if record.get("config") == json.loads(json.dumps(config, default=str)) else None

    def put(self, config: dict, result: dict) -> None:
        self.fs.create_dir(self.base, recursive=True)
        tmp = f"{self.base}/.{uuid.uuid4().hex[:8]}.tmp"
        with self.fs.open_output_stream(tmp) as f:
            f.write(json.dumps({"config": config, "result": result}, default=str).encode())
        self.fs.move(tmp, self.path(config))


# --- the trial (runs in a Ray worker) ------------------------------------------------------


def student_trial(config: dict, job: StudentJob, test: TestSplit, base: dict, refs: dict, fault: TrialFault | None = None,
                  finished: FinishedTrials | None = None) -> None:
    """One search point: `job` (where the labels are) with the point's student config."""
    done = finished.get(config) if finished is not None else None
    if done is not None:  # this point ran to the end before the driver was interrupted
        tune.report(done)
        return
    cfg = apply_params(ExperimentConfig.model_validate(base), config)
    s = cfg.student
    job = dataclasses.replace(job, cfg=s, target=s.targets[0])
    torch.set_num_threads(max(1, int(refs.get("cpus", 1))))
    if s.workers > 1:
        last = spread_trial(job, test, refs)
    else:
        last = process_trial(job, test, refs, fault)
    if finished is not None and last:
        finished.put(config, last)


def trial_metrics(ev: Evaluation, record: dict, refs: dict) -> dict[str, Any]:
    """What a trial reports of the student it would return now: its selection metrics on the
    held-out transfer slice (no gold label; `val_teacher_ce` from the loop's record of that
    epoch) and its test metrics."""
    return dict(
        val_teacher_ce=record["val_teacher_ce"],
        val_agreement=ev.val_agreement,
        **asdict(ev.eval),
        pgr_vs_teacher=metrics.pgr(ev.eval.test_acc, refs["weak_acc"], refs["ceiling_acc"]),
        pgr_vs_ensemble=metrics.pgr(ev.eval.test_acc, refs["ensemble_acc"], refs["ceiling_acc"]),
    )


def process_trial(job: StudentJob, test: TestSplit, refs: dict, fault: TrialFault | None) -> dict[str, Any]:
    """The student in this trial's process (the recipe, `student.recipe`): a Tune report and
    checkpoint after every epoch (resumed from the last checkpoint when the trial is restarted).
    Returns the last report."""
    inputs = recipe.read_inputs(job, test)  # in this trial's worker, from the labels stage's parts (its columns only)
    resume = None
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            resume = torch.load(Path(d) / "state.pt", weights_only=True)
    current: dict[str, Any] = dict(resume.get("metrics", {})) if resume else {}
    last: dict[str, Any] = {}

    def on_epoch(rec: dict, checkpoint) -> None:
        state = checkpoint()
        if rec["best_epoch"] == rec["epoch"]:  # improved: evaluate the new best student
            current.update(trial_metrics(recipe.evaluate(inputs, state["model"]), rec, refs), best_epoch=rec["epoch"])
        if fault and rec["epoch"] == fault.epoch and not (fault.marker and os.path.exists(fault.marker)):
            if fault.marker:
                Path(fault.marker).write_text("failed once\n")
            raise RuntimeError("injected failure (TrialFault)")
        last.clear()
        last.update({"epoch": rec["epoch"], "holdout_loss": rec["holdout_loss"], **current})
        with tempfile.TemporaryDirectory() as d:
            torch.save({**state, "metrics": current}, Path(d) / "state.pt")
            tune.report(dict(last), checkpoint=tune.Checkpoint.from_directory(d))

    recipe.train(inputs, on_epoch=on_epoch, resume=resume)
    return last


def spread_trial(job: StudentJob, test: TestSplit, refs: dict) -> dict[str, Any]:
    """The student across `student.workers` Ray Train workers (`ray_train.fit_student`), each
    holding the space's per-trial resources; this trial's own process holds none and only waits
    and evaluates. Rank 0's report after every epoch (epoch, best held-out loss and teacher CE so
    far) reaches Tune through `TuneReportCallback`, so ASHA can stop the trial; the full metrics
    of the best epoch follow once, at the end. A restarted trial trains again from its start
    (the Ray Train run keeps no Tune checkpoint)."""
    s = job.cfg
    s = s.model_copy(update={"resources": s.resources.model_copy(update={"num_cpus": refs.get("cpus", 1), "num_gpus": refs.get("gpus", 0)})})
    job = dataclasses.replace(job, cfg=s)
    storage = Path(refs["train_dir"]) / tune.get_context().get_trial_id()
    res = fit_student(job, test.x.shape[1], storage, callbacks=[TuneReportCallback()])
    best = res.history[res.best_epoch - 1]
    ev = recipe.evaluate(recipe.read_inputs(job, test), res.state_dict)
    last = {"epoch": res.epochs_run, "holdout_loss": best["holdout_loss"], **trial_metrics(ev, best, refs), "best_epoch": res.best_epoch}
    tune.report(dict(last))
    return last
