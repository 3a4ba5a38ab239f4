"""The student stage on Ray: one task per target (and one for the gold-label ceiling), in parallel.

Each task (`workers.student_task`) runs the student recipe (`student.recipe`): it reads its own
pseudo-labels from the labels stage's parts (`labelfiles.LabelSource`, fetched from the run's
store on a node that lacks them), trains with the one student loop (`student.core.fit`),
evaluates and returns the `StudentResult` with its weights; the driver sends a `StudentJob`
(which student, where its labels are) and the test split with its posterior (`TestSplit`), and
writes `weights.pt`, `metrics.json` and a manifest per student. A student across Ray Train
workers (`student.workers > 1`) trains through `student.ray_train` with the same loop. No transfer row passes through the driver. Tasks start no Ray Data work of their own,
so they cannot starve it of CPUs. Studies fan out their students through the same
`StudentInputs.train_all`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Hashable, Iterator

import pyarrow as pa
import torch

from w2s_ray import artifacts
from w2s_ray.artifacts import fixed_list
from w2s_ray.config import StudentConfig, pack_of
from w2s_ray.errors import W2SError
from w2s_ray.labelfiles import LabelSource
from w2s_ray.labels import read_test_posterior
from w2s_ray.raytools import Progress
from w2s_ray.results import TEST_LOGP, DataStage, LabelStage, StudentResult, StudentStage, TeacherStage
from w2s_ray.run import RunContext
from w2s_ray.student.core import TrainResult
from w2s_ray.student.recipe import StudentJob, TestSplit, Trained
from w2s_ray.workers import evaluate_task, student_pack_task, student_task


class StudentInputs:
    """What every student task of a run shares: where its labels are (`LabelSource`: each task
    reads them itself) and the test split with its posterior (`TestSplit`, put in the object
    store once); `submit` starts one student task on a `StudentJob`."""

    def __init__(self, ctx: RunContext, src: LabelSource, test: TestSplit, n_classes: int, teachers: TeacherStage | None = None,
                 single: int = 0):
        self.ctx, self.src, self.test, self.n_classes = ctx, src, test, n_classes
        self.teachers, self.single = teachers, single  # the ensemble, and the teacher the labels' single column holds
        self.test_ref = ctx.executor.put(test)

    @classmethod
    def load(cls, ctx: RunContext, data: DataStage, labels: LabelStage, teachers: TeacherStage | None = None) -> "StudentInputs":
        test_post = read_test_posterior(labels.dir)
        test = TestSplit(
            x=torch.tensor(data.splits["test"].x),  # a copy: the split's array shares Arrow's read-only buffer
            y=torch.tensor(data.splits["test"].y),
            dual_log=test_post["dual_log"],
            single_log=test_post["single_log"],
        )
        src = LabelSource(ctx.run, labels.dir, data.splits.path("transfer"))
        return cls(ctx, src, test, data.n_classes, teachers, ctx.cfg.posterior.single_teacher)

    def job(self, scfg: StudentConfig, target: str | None, t: torch.Tensor | None = None, log_t: torch.Tensor | None = None,
            teacher: int | None = None) -> StudentJob:
        """A student on a named target, on given probabilities `t` (with logs; then `target` only
        names it), with `target` None on the gold labels (the ceiling), or for the single target
        on `teacher` (default: the designated one, in the labels table)."""
        single = None
        if target == "single" and teacher is not None and teacher != self.single:
            if self.teachers is None:
                raise ValueError("a single-teacher student on another teacher needs the teacher stage")
            single = (self.teachers, teacher)
        return StudentJob(scfg, target, self.src, self.n_classes, single, t, log_t)

    def submit(self, job: StudentJob | list[StudentJob]):
        """Start one student task, or one pack task for a list of jobs (`student.pack`), with the
        students' resources."""
        res = (job[0] if isinstance(job, list) else job).cfg.resources
        task = student_pack_task if isinstance(job, list) else student_task
        return self.ctx.submit(task, job, self.test_ref, max(1, int(res.num_cpus)), num_cpus=res.num_cpus, num_gpus=res.num_gpus)

    def evaluate(self, job: StudentJob, res: TrainResult) -> Any:
        """Evaluate a student trained across workers (`ray_train.fit_student`), in one task."""
        cpus = job.cfg.resources.num_cpus
        return self.ctx.submit(evaluate_task, job, res, self.test_ref, max(1, int(cpus)), num_cpus=cpus)

    def train_packs(self, packs: dict[Hashable, list[tuple]]) -> Iterator[tuple[Hashable, list[Trained]]]:
        """Train each pack (`job(*args)` for each member) in one task (`student.pack`); yield
        `(tag, the members trained)` as each pack finishes."""
        running = {self.submit([self.job(*args) for args in members]): tag for tag, members in packs.items()}
        for tag, ref in self.ctx.as_completed(running):
            yield tag, self.ctx.get(ref)

    def train_all(self, jobs: dict[Hashable, tuple]) -> Iterator[tuple[Hashable, Trained]]:
        """Train `job(*args)` for every job at once; yield `(tag, trained)` as each finishes."""
        running = {self.submit(self.job(*args)): tag for tag, args in jobs.items()}
        for tag, ref in self.ctx.as_completed(running):
            yield tag, self.ctx.get(ref)


def label(target: str | None, replicate: int = 0, teacher: int | None = None) -> str:
    name = "ceiling" if target is None else f"student[{target}]"
    if teacher is not None:
        name = f"student[{target} #{teacher}]"
    return name if replicate == 0 else f"{name} seed +{replicate}"


def single_teachers(cfg) -> list[int]:
    """The teacher of each replicate of the single target."""
    return list(cfg.posterior.single_teachers or [cfg.posterior.single_teacher] * cfg.student.seeds)


def stage_students(ctx: RunContext, data: DataStage, teachers: TeacherStage, labels: LabelStage) -> StudentStage:
    """`student.seeds` replicates of one student per configured target, plus the gold-label
    ceiling: replicate i uses seed `student.seed + i` (and, for the single target, teacher
    `posterior.single_teachers[i]`); each student is cached on its own key and saves its test
    predictions (`test_logp.parquet`) beside its metrics."""
    cfg = ctx.cfg
    scfg = cfg.student
    singles = single_teachers(cfg)
    plan: dict[tuple[str | None, int], tuple[Path, int | None]] = {}
    for i in range(scfg.seeds):
        seed = scfg.seed + i
        for tgt in scfg.targets:
            teacher = singles[i] if tgt == "single" else None
            plan[(tgt, i)] = (ctx.run.open_stage("student", ctx.keys.student(tgt, seed, teacher)), teacher)
        if scfg.ceiling:
            plan[(None, i)] = (ctx.run.open_stage("ceiling", ctx.keys.ceiling_seed(seed)), None)
    results = {job: r for job, (d, _) in plan.items() if (r := cached_student(d)) is not None}
    todo = [job for job in plan if job not in results]
    # the lock protocol per student, in one order for every run (two runs cannot deadlock); a
    # student another run finished while this one waited is taken from it
    with ctx.run.locks({plan[job][0] for job in todo}, "student"):
        if todo:
            results.update({job: r for job in todo if (r := cached_student(plan[job][0])) is not None})
            todo = [job for job in todo if job not in results]
        if results:
            ctx.log(f"students: {len(results)} of {len(plan)} cached")
        if todo:
            train_students(ctx, data, teachers, labels, plan, todo, results)
    replicates = {tgt: [results[(tgt, i)] for i in range(scfg.seeds)] for tgt in scfg.targets}
    ceilings = [results[(None, i)] for i in range(scfg.seeds)] if scfg.ceiling else []
    return StudentStage(replicates, ceilings, {job: d for job, (d, _) in plan.items()})


def cached_student(d: Path) -> StudentResult | None:
    """A student's result when its directory is complete and intact, else None."""
    if artifacts.read_manifest(d) is None or not (d / TEST_LOGP).is_file():
        return None
    return StudentResult.from_json(artifacts.read_json(d / "metrics.json"))


def train_students(ctx: RunContext, data: DataStage, teachers: TeacherStage, labels: LabelStage,
                   plan: dict[tuple[str | None, int], tuple[Path, int | None]], todo: list[tuple[str | None, int]],
                   results: dict[tuple[str | None, int], StudentResult]) -> None:
    """Train the students `todo` of `plan` (the caller holds their locks), writing each one's
    directory and adding its result to `results`."""
    cfg = ctx.cfg
    scfg = cfg.student
    singles = single_teachers(cfg)
    ctx.ray()
    each = scfg.resources
    per = "one student" if scfg.workers == 1 else f"one student's {scfg.workers} Ray Train workers"
    ctx.executor.check_placeable({"CPU": each.num_cpus * scfg.workers, "GPU": each.num_gpus * scfg.workers},
                                 {"CPU": "student.resources.num_cpus", "GPU": "student.resources.num_gpus"}, what=per, wait_s=cfg.ray.placement_wait_s)
    inputs = StudentInputs.load(ctx, data, labels, teachers)
    ctx.log(f"students: training {len(todo)} {scfg.model.name} students (width {scfg.model.width}, depth {scfg.model.depth}; "
            f"{scfg.seeds} seed(s) × {len(scfg.targets)} target(s){' + ceiling' if scfg.ceiling else ''}"
            f"{f'; seeds in packs of up to {scfg.pack_size}' if scfg.pack else ''})")
    # a student across several workers takes them all: those run one after another, first
    spread = [job for job in todo if job[0] is not None and scfg.workers > 1]
    alone = [job for job in todo if job not in spread]

    def replicate_cfg(i: int) -> StudentConfig:
        return scfg.model_copy(update={"seed": scfg.seed + i})

    def outputs() -> Iterator[tuple[tuple[str | None, int], Trained]]:
        for tgt, i in spread:
            d, teacher = plan[(tgt, i)]
            if teacher is not None and teacher != cfg.posterior.single_teacher:
                raise W2SError(f"student.workers > 1 trains the single target on the designated teacher only; "
                               f"posterior.single_teachers {singles} needs student.workers: 1")
            ctx.executor.needs_ray(f"student.workers: {scfg.workers} (Ray Train)")
            ctx.log(f"{label(tgt, i)}: across {scfg.workers} Ray Train workers, fed by a Ray Data stream of {labels.dir / 'parts'}")
            job = inputs.job(replicate_cfg(i), tgt)
            # imported here: ray.train and ray.data cost every command 0.6 s of start-up (measured
            # with -X importtime), and only a student across workers uses them
            from w2s_ray.student.ray_train import fit_student

            res = fit_student(job, data.in_dim, d / "train")
            yield (tgt, i), ctx.get(inputs.evaluate(job, res))
        if scfg.pack:
            # the whole pack of a target trains, whichever members are missing: a member's bits
            # depend on its pack, so one trained again comes out as it was
            packs = {(tgt, start): [(replicate_cfg(i), tgt, None, None, plan[(tgt, i)][1]) for i in range(start, stop)]
                     for tgt, start, stop in dict.fromkeys((tgt, *pack_of(scfg, i)) for tgt, i in alone)}
            for (tgt, start), members in inputs.train_packs(packs):
                yield from (((tgt, start + j), out) for j, out in enumerate(members) if (tgt, start + j) in alone)
            return
        jobs = {job: (replicate_cfg(job[1]), job[0], None, None, plan[job][1]) for job in alone}
        yield from inputs.train_all(jobs)

    test_ids = data.splits["test"].ids
    with Progress("students", len(todo), unit="student") as bar:
        for (tgt, i), out in outputs():
            d, teacher = plan[(tgt, i)]
            d = ctx.run.reset(d)
            with ctx.run.atomic(d / "weights.pt") as tmp:
                torch.save(out.state_dict, tmp)
            ctx.run.write_parquet(d / TEST_LOGP, pa.table({"id": test_ids, "logp": fixed_list(out.log_test.numpy())}))
            result = dataclasses.replace(out.result, seed=scfg.seed + i, teacher=teacher)
            ctx.run.write_json(d / "metrics.json", result.to_json())
            ctx.run.write_manifest(d, d.name, target=tgt, seed=scfg.seed + i, teacher=teacher)
            results[(tgt, i)] = result
            ctx.log(f"{label(tgt, i, teacher)}: test acc {result.test_acc:.4f} after {result.epochs_run} epochs ({result.seconds:.1f}s)")
            bar.update(1)
