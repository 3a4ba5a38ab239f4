"""The Tune trial: one student trained on one search point, reporting and checkpointing each epoch.

It runs in Tune's trial workers, so it sits in a module of its own that imports Ray Tune, torch
and the math modules only (not the driver's search, report and figure code in `tune`).
"""

from __future__ import annotations

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
from w2s_ray.ddp import fit_student
from w2s_ray.space import apply_params
from w2s_ray.training import holdout_split, label_columns, load_student, predict_log, target_of, train_student


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


def student_trial(config: dict, data: dict, base: dict, refs: dict, fault: TrialFault | None = None, finished: FinishedTrials | None = None) -> None:
    done = finished.get(config) if finished is not None else None
    if done is not None:  # this point ran to the end before the driver was interrupted
        tune.report(done)
        return
    cfg = apply_params(ExperimentConfig.model_validate(base), config)
    if cfg.student.workers > 1:
        last = spread_trial(cfg, data, refs)
    else:
        last = process_trial(cfg, data, refs, fault)
    if finished is not None and last:
        finished.put(config, last)


def trial_metrics(log_test: torch.Tensor, log_tr: torch.Tensor, labels: dict, log_t: torch.Tensor, hold: torch.Tensor, data: dict, refs: dict) -> dict[str, Any]:
    """What a trial reports of the student it would return now: its selection metrics on the
    held-out transfer slice (no gold label) and its test metrics."""
    evaluation = metrics.evaluate_student(log_test, data["test_y"], log_tr, log_t, data["test_dual_log"], data["test_single_log"], hold)
    return dict(
        val_teacher_ce=float(-(labels["t_dual"][hold] * log_tr[hold]).sum(-1).mean()),
        val_agreement=metrics.agreement(log_tr[hold], labels["logt_dual"][hold]),
        **asdict(evaluation),
        pgr_vs_teacher=metrics.pgr(evaluation.test_acc, refs["weak_acc"], refs["ceiling_acc"]),
        pgr_vs_ensemble=metrics.pgr(evaluation.test_acc, refs["ensemble_acc"], refs["ceiling_acc"]),
    )


def process_trial(cfg: ExperimentConfig, data: dict, refs: dict, fault: TrialFault | None) -> dict[str, Any]:
    """The student in this trial's process: a Tune report and checkpoint after every epoch
    (resumed from the last checkpoint when the trial is restarted). Returns the last report."""
    s = cfg.student
    torch.set_num_threads(max(1, int(refs.get("cpus", 1))))
    target = s.targets[0]
    src = data["src"]
    labels = src.read(label_columns(target, "t_dual"))  # in this trial's worker, from the labels stage's parts (its columns only)
    t, log_t = target_of(labels, target, s.log_floor)
    x = labels["x"]
    _, hold = holdout_split(len(x), s.holdout_frac, s.seed)
    y_gold = src.gold(labels["id"]) if s.selection == "oracle" else None

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
            model = load_student(s, state["model"], x.shape[1], refs["n_classes"])
            current.update(trial_metrics(predict_log(model, data["test_x"]), predict_log(model, x), labels, log_t, hold, data, refs), best_epoch=rec["epoch"])
        if fault and rec["epoch"] == fault.epoch and not (fault.marker and os.path.exists(fault.marker)):
            if fault.marker:
                Path(fault.marker).write_text("failed once\n")
            raise RuntimeError("injected failure (TrialFault)")
        last.clear()
        last.update({"epoch": rec["epoch"], "holdout_loss": rec["holdout_loss"], **current})
        with tempfile.TemporaryDirectory() as d:
            torch.save({**state, "metrics": current}, Path(d) / "state.pt")
            tune.report(dict(last), checkpoint=tune.Checkpoint.from_directory(d))

    train_student(s, x, t, log_t, refs["n_classes"], y_gold=y_gold, on_epoch=on_epoch, resume=resume)
    return last


def spread_trial(cfg: ExperimentConfig, data: dict, refs: dict) -> dict[str, Any]:
    """The student across `student.workers` Ray Train workers (`ddp.fit_student`), each holding
    the space's per-trial resources; this trial's own process holds none and only waits and
    evaluates. Rank 0's report after every epoch (epoch, best held-out loss and teacher CE so
    far) reaches Tune through `TuneReportCallback`, so ASHA can stop the trial; the full metrics
    of the best epoch follow once, at the end. A restarted trial trains again from its start
    (the Ray Train run keeps no Tune checkpoint)."""
    s = cfg.student
    s = s.model_copy(update={"resources": s.resources.model_copy(update={"num_cpus": refs.get("cpus", 1), "num_gpus": refs.get("gpus", 0)})})
    torch.set_num_threads(max(1, int(refs.get("cpus", 1))))
    target, src, n_classes = s.targets[0], data["src"], refs["n_classes"]
    in_dim = data["test_x"].shape[1]
    storage = Path(refs["train_dir"]) / tune.get_context().get_trial_id()
    res = fit_student(src.run, src.labels, s, target, in_dim, n_classes, storage, callbacks=[TuneReportCallback()])
    labels = src.read(label_columns(target, "t_dual"))
    _, log_t = target_of(labels, target, s.log_floor)
    _, hold = holdout_split(len(labels["x"]), s.holdout_frac, s.seed)
    model = load_student(s, res.state_dict, in_dim, n_classes)
    best = res.history[res.best_epoch - 1]
    last = {"epoch": res.epochs_run, "holdout_loss": best["holdout_loss"],
            **trial_metrics(predict_log(model, data["test_x"]), predict_log(model, labels["x"]), labels, log_t, hold, data, refs),
            "best_epoch": res.best_epoch}
    tune.report(dict(last))
    return last
