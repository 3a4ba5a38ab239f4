"""The student recipe: read its inputs → fit → evaluate → its result. No Ray.

Every place a student trains runs this recipe: the student stage's task (`workers.student_task`),
the evaluation of a student trained across Ray Train workers (`workers.evaluate_task`), a Tune
trial in one process and a Tune trial across workers (`trial`), and the Ray Train workers with
`student.input: memory` (`ray_train`, which read their inputs with `read_inputs`). What crosses
the Ray boundary is typed: a `StudentJob` (which student, where its labels are) and a `TestSplit`
(the test split and its posterior, put in the object store once per run).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from w2s_ray import metrics
from w2s_ray.config import StudentConfig
from w2s_ray.labelfiles import LabelSource
from w2s_ray.packfiles import single_teacher
from w2s_ray.results import StudentResult, TeacherStage
from w2s_ray.student.core import (InMemory, TrainResult, fit, fit_pack, holdout_split, in_memory, label_columns, load_student, predict_log, quantile_threshold,
                                  row_weights, target_of)


@dataclass(frozen=True)
class TestSplit:
    """The test split and its posterior: what evaluating any student needs. It grows with the
    test split only; the driver puts it in the object store once and every task shares it."""

    __test__ = False  # not a pytest test class, whatever its name

    x: torch.Tensor
    y: torch.Tensor
    dual_log: torch.Tensor  # the dual posterior mean's log-probabilities
    single_log: torch.Tensor  # the designated single teacher's


@dataclass(frozen=True)
class StudentJob:
    """One student to train: its config, its target (None: the gold-label ceiling), where its
    labels are (`src`, read by the process that trains it), and optionally the probabilities to
    learn from (`t`, `log_t`: a study's own target, `target` then only names it) or, for the
    single target, another teacher than the designated one (`single = (stage, teacher id)`)."""

    cfg: StudentConfig
    target: str | None
    src: LabelSource
    n_classes: int
    single: tuple[TeacherStage, int] | None = None
    t: torch.Tensor | None = None
    log_t: torch.Tensor | None = None

    @property
    def name(self) -> str:
        return "ceiling" if self.target is None else f"student[{self.target}]"


@dataclass(frozen=True)
class Inputs:
    """A student's inputs, read in the process that trains it: the config it trains with (the
    ceiling's: forward CE on one-hot gold labels, without the students' augmentation unless
    `ceiling_augment`), the label columns, its target, the gold labels when it needs them, the
    loss override and the test split it is evaluated on."""

    job: StudentJob
    cfg: StudentConfig
    labels: dict[str, torch.Tensor]
    t: torch.Tensor
    log_t: torch.Tensor
    gold: torch.Tensor | None
    loss: str | None
    test: TestSplit | None
    weights: torch.Tensor | None = None  # the training loss's per-row weights (`student.weighting`; never the ceiling's)

    def world(self, device: str = "cpu", rank: int = 0, size: int = 1, wrap=None) -> InMemory:
        """The in-memory world on these inputs (one process, or rank `rank` of `size`)."""
        return in_memory(self.cfg, self.labels["x"], self.t, self.log_t, self.labels["logt_dual"].exp(), self.gold, device, rank, size, wrap,
                         self.weights)

    def misfit_target(self) -> torch.Tensor:
        """What the misfit is measured against: the student's target; the ceiling, having none,
        against the dual posterior mean."""
        return self.labels["logt_dual"] if self.job.target is None else self.log_t


def read_inputs(job: StudentJob, test: TestSplit | None = None, shared: Inputs | None = None) -> Inputs:
    """Read a student's labels (its target's columns only) and pick its target; `test`: the
    split it is evaluated on (none for a Ray Train worker, which only trains); `shared`: the
    inputs of a student on the same target and labels, whose columns and gold labels are reused
    instead of read again (a pack's members)."""
    cfg = job.cfg
    ceiling = job.target is None
    weighted = cfg.weighting != "none" and not ceiling
    if shared is not None:
        labels, gold = shared.labels, shared.gold
    else:
        labels = job.src.read(label_columns(None if job.t is not None else job.target, *(("variance",) if weighted else ())))
        gold = job.src.gold(labels["id"]) if (ceiling or cfg.selection == "oracle") else None
    loss = None
    if ceiling:
        cfg = cfg.model_copy(update={"rce_weight": 0.0, "weighting": "none"} | ({} if cfg.ceiling_augment else {"augment_shift": 0}))
        t = torch.nn.functional.one_hot(gold, job.n_classes).float()
        log_t, loss = t.clamp_min(1e-8).log(), "mixture"
    elif job.single is not None:
        stage, tid = job.single
        log_t = single_teacher(stage, "transfer", tid, run=job.src.run)
        t = log_t.exp()
        if test is not None:
            test = dataclasses.replace(test, single_log=single_teacher(stage, "test", tid, run=job.src.run))
    elif job.t is not None:
        t, log_t = job.t, job.log_t
    else:
        t, log_t = target_of(labels, job.target, cfg.log_floor)
    return Inputs(job, cfg, labels, t, log_t, gold, loss, test, row_weights(cfg, labels["variance"]) if weighted else None)


def train(inputs: Inputs, device: str = "cpu", on_epoch=None, resume: dict | None = None) -> TrainResult:
    """Fit the student in one process (`core.fit` in its in-memory world)."""
    world = inputs.world(device)
    x = inputs.labels["x"]
    return fit(inputs.cfg, world, x.shape[1], inputs.job.n_classes, loss=inputs.loss,
               threshold=quantile_threshold(inputs.cfg, inputs.t, world.train_rows), on_epoch=on_epoch, resume=resume)


def train_pack(inputs: list[Inputs], device: str = "cpu", on_epoch=None) -> list[TrainResult]:
    """Fit the students of `inputs` (one target, seeds apart) as one pack (`core.fit_pack`) in
    one process, each in its own in-memory world."""
    worlds = [i.world(device) for i in inputs]
    thresholds = [quantile_threshold(i.cfg, i.t, w.train_rows) for i, w in zip(inputs, worlds)]
    first = inputs[0]
    return fit_pack([i.cfg for i in inputs], worlds, first.labels["x"].shape[1], first.job.n_classes, loss=first.loss, thresholds=thresholds,
                    on_epoch=on_epoch)


def read_pack_inputs(jobs: list[StudentJob], test: TestSplit) -> list[Inputs]:
    """The inputs of a pack's students: the label columns read once for all of them."""
    first = read_inputs(jobs[0], test)
    return [first] + [read_inputs(job, test, shared=first) for job in jobs[1:]]


@dataclass(frozen=True)
class Evaluation:
    """A student's weights evaluated: its metrics (`metrics.StudentEval`), its agreement with
    the dual posterior mean on the held-out transfer slice, and its test log-probabilities."""

    eval: metrics.StudentEval
    val_agreement: float
    log_test: torch.Tensor


def evaluate(inputs: Inputs, state_dict: dict[str, torch.Tensor]) -> Evaluation:
    """Evaluate weights on the test split and the transfer split (misfit; held-out slice)."""
    x = inputs.labels["x"]
    model = load_student(inputs.cfg, state_dict, x.shape[1], inputs.job.n_classes)
    log_test = predict_log(model, inputs.test.x)
    log_transfer = predict_log(model, x)
    holdout = holdout_split(len(x), inputs.cfg.holdout_frac, inputs.cfg.seed)[1]
    ev = metrics.evaluate_student(log_test, inputs.test.y, log_transfer, inputs.misfit_target(), inputs.test.dual_log, inputs.test.single_log, holdout)
    agree = metrics.agreement(log_transfer[holdout], inputs.labels["logt_dual"][holdout])
    return Evaluation(ev, agree, log_test)


@dataclass(frozen=True)
class Trained:
    """A student trained and evaluated: its result (saved as `metrics.json`), its weights and
    its test log-probabilities."""

    result: StudentResult
    state_dict: dict[str, torch.Tensor]
    log_test: torch.Tensor


def finish(inputs: Inputs, res: TrainResult, device: str = "cpu") -> Trained:
    """The evaluated student of a finished training run."""
    ev = evaluate(inputs, res.state_dict)
    result = StudentResult(inputs.job.target, ev.eval, res.best_epoch, res.epochs_run, res.n_params, res.seconds, device, res.history)
    return Trained(result, res.state_dict, ev.log_test)
