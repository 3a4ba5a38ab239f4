"""The student stage on Ray: one task per target (and one for the gold ceiling), in parallel.

The driver reads the pseudo-labels once through Ray Data, puts the tensors in the object store
(`StudentInputs`), and each task (`workers.student_task`) trains a student with
`training.train_student`, evaluates it with `metrics.evaluate_student` and returns a
`StudentResult` with its weights; the driver writes
`weights.pt`, `metrics.json` and a manifest per student. Tasks start no Ray Data work of their
own, so they cannot starve it of CPUs. Studies fan out their students through the same
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
from w2s_ray.labels import read_labels, read_test_posterior
from w2s_ray.raytools import Progress, as_completed
from w2s_ray.run import DataStage, LabelStage, RunContext, StudentResult, StudentStage
from w2s_ray.training import target_of
from w2s_ray.workers import evaluate_task, student_task


class StudentInputs:
    """What every student task of a run needs, read once (pseudo-labels through Ray Data) and put
    in the object store once; `submit` starts one student task."""

    def __init__(self, labels: dict, test: dict, y_gold: torch.Tensor, n_classes: int):
        self.labels, self.test, self.y_gold, self.n_classes = labels, test, y_gold, n_classes
        self.x_ref, self.test_ref = ray.put(labels["x"]), ray.put(test)

    @classmethod
    def load(cls, ctx: RunContext, data: DataStage, labels: LabelStage) -> "StudentInputs":
        table = read_labels(ctx.run, labels.dir, ctx.cfg.labels.read_batch_size)
        tr = data.splits["transfer"]
        if not torch.equal(table["id"], torch.from_numpy(tr.ids)):
            raise RuntimeError(f"pseudo-labels in {labels.dir} do not match the transfer split's rows")
        test_post = read_test_posterior(labels.dir)
        test = {
            "x": torch.from_numpy(data.splits["test"].x),
            "y": torch.from_numpy(data.splits["test"].y),
            "dual_log": test_post["dual_log"],
            "single_log": test_post["single_log"],
            "transfer_dual_log": table["logt_dual"],
        }
        return cls(table, test, torch.from_numpy(tr.y), data.n_classes)

    def submit(self, scfg: StudentConfig, target: str | None, t: torch.Tensor | None = None, log_t: torch.Tensor | None = None):
        """Start one student task on a named target, on given probabilities `t` (with logs; then
        `target` only names it), or with `target` None on the gold labels (the ceiling)."""
        if t is None and target is None:
            t = torch.nn.functional.one_hot(self.y_gold, self.n_classes).float()
            log_t = t.clamp_min(1e-8).log()
        elif t is None:
            t, log_t = target_of(self.labels, target, scfg.log_floor)
        # gold labels leave here only for the ceiling, or for oracle early stopping
        gold = self.y_gold if (scfg.selection == "oracle" or target is None) else None
        res = scfg.resources
        task = ray.remote(student_task).options(num_cpus=res.num_cpus, num_gpus=res.num_gpus)
        return task.remote(scfg.model_dump(mode="json"), target, self.x_ref, t, log_t, self.n_classes, gold, self.test_ref, max(1, int(res.num_cpus)))

    def evaluate(self, scfg: StudentConfig, target: str, res) -> Any:
        """Evaluate a student trained across workers (`ddp.fit_student`), in one task."""
        _, log_t = target_of(self.labels, target, scfg.log_floor)
        task = ray.remote(evaluate_task).options(num_cpus=scfg.resources.num_cpus)
        return task.remote(scfg.model_dump(mode="json"), target, res, self.x_ref, log_t, self.n_classes, self.test_ref, max(1, int(scfg.resources.num_cpus)))

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
                res = fit_student(ctx.run, labels.dir, data.splits["transfer"].ids, scfg, tgt, data.splits["transfer"].x.shape[1], data.n_classes, dirs[tgt] / "train")
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
