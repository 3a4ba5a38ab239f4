"""The student stage on Ray: one task per target (and one for the gold-label ceiling), in parallel.

Each task (`workers.student_task`) reads its own pseudo-labels from the labels stage's parts
(`packfiles.LabelSource`, fetched from the run's store on a node that lacks them), trains a
student with `training.train_student`, evaluates it with `metrics.evaluate_student` and returns a
`StudentResult` with its weights; the driver sends only where the labels are and the test split
with its posterior (`StudentInputs`), and writes `weights.pt`, `metrics.json` and a manifest per
student. No transfer row passes through the driver. Tasks start no Ray Data work of their own,
so they cannot starve it of CPUs. Studies fan out their students through the same
`StudentInputs.train_all`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Hashable, Iterator

import ray
import torch

from w2s_ray import artifacts
from w2s_ray.config import StudentConfig
from w2s_ray.ddp import fit_student
from w2s_ray.labels import read_test_posterior
from w2s_ray.packfiles import LabelSource
from w2s_ray.raytools import Progress, as_completed
from w2s_ray.run import DataStage, LabelStage, RunContext, StudentResult, StudentStage
from w2s_ray.workers import evaluate_task, student_task


class StudentInputs:
    """What every student task of a run needs: where its labels are (`LabelSource`: each task
    reads them itself) and the test split with its posterior (grows with the test split only),
    put in the object store once; `submit` starts one student task."""

    def __init__(self, src: LabelSource, test: dict, n_classes: int):
        self.src, self.test, self.n_classes = src, test, n_classes
        self.test_ref = ray.put(test)

    @classmethod
    def load(cls, ctx: RunContext, data: DataStage, labels: LabelStage) -> "StudentInputs":
        test_post = read_test_posterior(labels.dir)
        test = {
            "x": torch.from_numpy(data.splits["test"].x),
            "y": torch.from_numpy(data.splits["test"].y),
            "dual_log": test_post["dual_log"],
            "single_log": test_post["single_log"],
        }
        return cls(LabelSource(ctx.run, labels.dir, data.splits.path("transfer")), test, data.n_classes)

    def submit(self, scfg: StudentConfig, target: str | None, t: torch.Tensor | None = None, log_t: torch.Tensor | None = None):
        """Start one student task on a named target, on given probabilities `t` (with logs; then
        `target` only names it), or with `target` None on the gold labels (the ceiling)."""
        res = scfg.resources
        task = ray.remote(student_task).options(num_cpus=res.num_cpus, num_gpus=res.num_gpus)
        return task.remote(scfg.model_dump(mode="json"), target, self.src, self.n_classes, self.test_ref, max(1, int(res.num_cpus)), t, log_t)

    def evaluate(self, scfg: StudentConfig, target: str, res) -> Any:
        """Evaluate a student trained across workers (`ddp.fit_student`), in one task."""
        task = ray.remote(evaluate_task).options(num_cpus=scfg.resources.num_cpus)
        return task.remote(scfg.model_dump(mode="json"), target, res, self.src, self.n_classes, self.test_ref, max(1, int(scfg.resources.num_cpus)))

    def train_all(self, jobs: dict[Hashable, tuple]) -> Iterator[tuple[Hashable, dict[str, Any]]]:
        """Run `submit(*job)` for every job at once; yield `(tag, output)` as each finishes."""
        running = {self.submit(*job): tag for tag, job in jobs.items()}
        for tag, ref in as_completed(running):
            yield tag, ray.get(ref)


def label(target: str | None) -> str:
    return "ceiling" if target is None else f"student[{target}]"


def stage_students(ctx: RunContext, data: DataStage, labels: LabelStage) -> StudentStage:
    """One student per configured target, plus the gold-label ceiling; each cached on its own key."""
    scfg = ctx.cfg.student
    dirs: dict[str | None, Path] = {tgt: ctx.run.open_stage("student", ctx.keys.student(tgt)) for tgt in scfg.targets}
    if scfg.ceiling:
        dirs[None] = ctx.run.open_stage("ceiling", ctx.keys.ceiling)
    results: dict[str | None, StudentResult] = {}
    for tgt, d in dirs.items():
        if artifacts.read_manifest(d) is not None:
            results[tgt] = StudentResult.from_json(artifacts.read_json(d / "metrics.json"))
            ctx.log(f"{label(tgt)}: cached {d}")
    todo = [tgt for tgt in dirs if tgt not in results]
    if todo:
        ctx.ray()
        inputs = StudentInputs.load(ctx, data, labels)
        for tgt in todo:
            ctx.log(f"{label(tgt)}: training {scfg.model.name} (width {scfg.model.width}, depth {scfg.model.depth})")
        # a student across several workers takes them all: those run one after another, first
        spread = [tgt for tgt in todo if tgt is not None and scfg.workers > 1]
        alone = [tgt for tgt in todo if tgt not in spread]

        def outputs() -> Iterator[tuple[str | None, dict[str, Any]]]:
            for tgt in spread:
                ctx.log(f"{label(tgt)}: across {scfg.workers} Ray Train workers, fed by a Ray Data stream of {labels.dir / 'parts'}")
                res = fit_student(ctx.run, labels.dir, scfg, tgt, data.in_dim, data.n_classes, dirs[tgt] / "train")
                yield tgt, ray.get(inputs.evaluate(scfg, tgt, res))
            yield from inputs.train_all({tgt: (scfg, tgt) for tgt in alone})

        with Progress("students", len(todo), unit="student") as bar:
            for tgt, out in outputs():
                d = ctx.run.reset(dirs[tgt])
                with ctx.run.atomic(d / "weights.pt") as tmp:
                    torch.save(out["state_dict"], tmp)
                result: StudentResult = out["result"]
                ctx.run.write_json(d / "metrics.json", result.to_json())
                ctx.run.write_manifest(d, d.name, target=tgt)
                results[tgt] = result
                ctx.log(f"{label(tgt)}: test acc {result.test_acc:.4f} after {result.epochs_run} epochs ({result.seconds:.1f}s)")
                bar.update(1)
    return StudentStage({tgt: results[tgt] for tgt in scfg.targets}, results.get(None))
