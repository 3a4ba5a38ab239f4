"""The student stage on Ray: one task per target (and one for the gold ceiling), in parallel.

The driver reads the pseudo-labels once through Ray Data, puts the tensors in the object store,
and each task trains a student with `student.train_student`, evaluates it and returns its
weights and metrics; the driver writes `weights.pt`, `metrics.json` and a manifest per student.
Tasks start no Ray Data work of their own, so they cannot starve it of CPUs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from w2s_ray import artifacts
from w2s_ray.config import StudentConfig

CEILING = "gold"


def evaluate(model_log_test, model_log_transfer, target_log_transfer, test: dict[str, torch.Tensor]) -> dict[str, float]:
    from w2s_ray import metrics as M

    y = test["y"]
    return {
        "test_acc": M.accuracy(model_log_test, y),
        "test_gold_ce": M.gold_ce(model_log_test, y),
        "misfit": M.misfit(model_log_transfer, target_log_transfer),
        "entropy_test": M.mean_entropy(model_log_test),
        "agree_ensemble_test": M.agreement(model_log_test, test["dual_log"]),
        "agree_single_test": M.agreement(model_log_test, test["single_log"]),
    }


def student_job(cfg_json: dict, target: str, x: torch.Tensor, t: torch.Tensor, log_t: torch.Tensor, n_classes: int, y_gold: torch.Tensor | None, test: dict[str, torch.Tensor], threads: int = 1) -> dict[str, Any]:
    """Train and evaluate one student; runs in a Ray task or in-process."""
    import ray

    from w2s_ray.student import predict_log, load_student, train_student

    torch.set_num_threads(max(1, threads))
    cfg = StudentConfig.model_validate(cfg_json)
    device = "cuda" if ray.is_initialized() and ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
    loss = "mixture" if target == CEILING else None
    if target == CEILING:
        cfg = cfg.model_copy(update={"rce_weight": 0.0})
    res = train_student(cfg, x, t, log_t, n_classes, loss=loss, y_gold=y_gold, device=device)
    model = load_student(cfg, res.state_dict, x.shape[1], n_classes)
    log_test = predict_log(model, test["x"])
    log_transfer = predict_log(model, x)
    # the ceiling has no teacher target: its misfit is measured against the dual posterior mean
    misfit_ref = test["transfer_dual_log"] if target == CEILING else log_t
    metrics = evaluate(log_test, log_transfer, misfit_ref, test)
    metrics.update(best_epoch=res.best_epoch, epochs_run=res.epochs_run, n_params=res.n_params, seconds=res.seconds, device=device)
    return {"target": target, "state_dict": res.state_dict, "metrics": metrics, "history": res.history, "log_test": log_test}


class StudentInputs:
    """What every student task of a run needs, read once (pseudo-labels through Ray Data) and put
    in the object store once; `submit` starts one student task on a target."""

    def __init__(self, labels: dict, test: dict, y_gold: torch.Tensor, n_classes: int):
        import ray

        self.labels, self.test, self.y_gold, self.n_classes = labels, test, y_gold, n_classes
        self.x_ref, self.test_ref = ray.put(labels["x"]), ray.put(test)

    @classmethod
    def load(cls, st, data, labels_dir: Path) -> "StudentInputs":
        from w2s_ray.labels import read_labels, read_test_posterior

        labels = read_labels(labels_dir, st.cfg.labels.read_batch_size)
        tr = data.splits["transfer"]
        if not torch.equal(labels["id"], torch.from_numpy(tr.ids)):
            raise RuntimeError(f"pseudo-labels in {labels_dir} do not match the transfer split's rows")
        test_post = read_test_posterior(labels_dir)
        test = {
            "x": torch.from_numpy(data.splits["test"].x),
            "y": torch.from_numpy(data.splits["test"].y),
            "dual_log": test_post["dual_log"],
            "single_log": test_post["single_log"],
            "transfer_dual_log": labels["logt_dual"],
        }
        return cls(labels, test, torch.from_numpy(tr.y), data.n_classes)

    def submit(self, scfg: StudentConfig, target: str, t: torch.Tensor | None = None, log_t: torch.Tensor | None = None):
        """Start one student task on a named target, or on given probabilities `t` (with logs)."""
        import ray

        from w2s_ray.labels import target_of

        if t is None and target == CEILING:
            t = torch.nn.functional.one_hot(self.y_gold, self.n_classes).float()
            log_t = t.clamp_min(1e-8).log()
        elif t is None:
            t, log_t = target_of(self.labels, target, scfg.log_floor)
        # gold labels leave here only for the ceiling, or for oracle early stopping
        gold = self.y_gold if (scfg.selection == "oracle" or target == CEILING) else None
        task = ray.remote(student_job).options(num_cpus=scfg.num_cpus, num_gpus=scfg.num_gpus)
        return task.remote(scfg.model_dump(mode="json"), target, self.x_ref, t, log_t, self.n_classes, gold, self.test_ref, max(1, int(scfg.num_cpus)))


def run_students(st, data, labels_dir: Path) -> dict[str, dict]:
    import ray

    from w2s_ray.pipeline import log
    from w2s_ray.raytools import init_ray

    scfg = st.cfg.student
    jobs = {tgt: artifacts.stage_dir(st.run_dir, "student", st.keys.student(tgt)) for tgt in scfg.targets}
    if scfg.ceiling:
        jobs[CEILING] = artifacts.stage_dir(st.run_dir, "ceiling", st.keys.ceiling)
    results: dict[str, dict] = {}
    todo = []
    for tgt, d in jobs.items():
        if artifacts.read_manifest(d) is not None:
            results[tgt] = artifacts.read_json(d / "metrics.json")
            log(f"student[{tgt}]: cached {d}")
        else:
            todo.append(tgt)
    if not todo:
        return results

    init_ray(st.cfg.ray)
    inputs = StudentInputs.load(st, data, labels_dir)
    running = {}
    for tgt in todo:
        log(f"student[{tgt}]: training {scfg.model.name} (width {scfg.model.width}, depth {scfg.model.depth})")
        running[inputs.submit(scfg, tgt)] = tgt
    while running:
        [ref], _ = ray.wait(list(running), num_returns=1)
        tgt = running.pop(ref)
        out = ray.get(ref)
        d = artifacts.reset_dir(jobs[tgt])
        with artifacts.atomic_path(d / "weights.pt") as tmp:
            torch.save(out["state_dict"], tmp)
        artifacts.write_json(d / "metrics.json", {**out["metrics"], "target": tgt, "history": out["history"]})
        artifacts.write_manifest(d, d.name, target=tgt)
        results[tgt] = artifacts.read_json(d / "metrics.json")
        m = out["metrics"]
        log(f"student[{tgt}]: test acc {m['test_acc']:.4f} after {m['epochs_run']} epochs ({m['seconds']:.1f}s)")
    return {tgt: results[tgt] for tgt in jobs}  # in config order, not completion order
