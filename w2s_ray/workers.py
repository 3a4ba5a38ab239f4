"""What runs inside Ray workers: the pack-training actor and the student task (the Tune trial
is in `trial`, which needs Ray Tune).

They live apart from the stage modules so that a worker imports only what it runs: Ray core,
torch, pydantic and the math modules, not pandas, Ray Data, matplotlib, TensorBoard or the
dataset packages the driver's stages use. Every worker process that unpickles one of these
functions imports this module: measured on 2 cores, importing it costs 0.4 s beyond Ray
and torch, where importing the stage modules that used to hold them cost 1.1–1.4 s.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch

from w2s_ray import metrics
from w2s_ray.config import ALWAYS_KEPT, StudentConfig, TeachersConfig
from w2s_ray.packs import TeacherPack, teacher_indices, teacher_seed
from w2s_ray.posterior import PosteriorAccumulator
from w2s_ray.raytools import epoch_printer, gpu_device
from w2s_ray.run import StudentResult
from w2s_ray.storage import RunDir
from w2s_ray.training import StudentResult as TrainResult
from w2s_ray.training import load_student, predict_log, train_student

PRED_SPLITS = ("transfer", "test")
MIN_PACK = 4  # smaller packs are padded with copies of their teachers (see train_pack_local)


# --- teachers ------------------------------------------------------------------------------


def teacher_view(x: np.ndarray, cfg: TeachersConfig) -> np.ndarray:
    """The teachers' view of the inputs (weak, transfer and test alike)."""
    if cfg.view.kind == "full":
        return x
    out = np.zeros_like(x)
    sl = slice(cfg.view.start, cfg.view.start + cfg.view.length)
    out[:, sl] = x[:, sl]
    return out


def train_pack_local(data: dict[str, np.ndarray], cfg: TeachersConfig, n_classes: int, teacher_ids: list[int], device: str = "cpu") -> dict[str, Any]:
    """Train one pack in this process and return what the driver stores. Used by actors and benchmarks."""
    t0 = time.perf_counter()
    # arrays from the object store are read-only; torch.tensor copies them into writable memory
    x_weak = torch.tensor(teacher_view(data["x_weak"], cfg))
    y_weak = torch.tensor(data["y_weak"])
    n, k = len(y_weak), len(teacher_ids)
    # CPU kernels for packs of one or two teachers differ from those for larger packs: measured
    # here, an MLP teacher trained in a pack of 1 or 2 is off by up to 2e-7 in log p after 5
    # epochs (0.02 after 30, 0.1% of argmaxes) from the same teacher in any pack of 3 to 32,
    # which are bitwise equal. So a small pack trains beside copies of its teachers, and a
    # resumed or extended ensemble of MLP or logistic teachers is the same whatever its pack
    # plan. (1-D CNN teachers differ at float32 rounding between every pack size measured.)
    ids = (list(teacher_ids) * MIN_PACK)[: max(k, MIN_PACK)]
    seeds = [teacher_seed(cfg.seed, t) for t in ids]
    index_sets = [teacher_indices(cfg.resample, n, cfg.k, t, s, cfg.seed) for t, s in zip(ids, seeds)]
    pack = TeacherPack(cfg.model, x_weak.shape[1], n_classes, seeds, device=device, compile=cfg.resources.compile)
    steps = pack.fit(x_weak, y_weak, index_sets, cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight_decay) // len(ids) * k
    out: dict[str, Any] = {"teacher_ids": list(teacher_ids), "seeds": seeds[:k], "steps": steps}
    for split in PRED_SPLITS:
        out[f"logp_{split}"] = pack.log_probs(torch.tensor(teacher_view(data[f"x_{split}"], cfg))).numpy()[:k]
    y_test = data["y_test"]
    out["acc_test"] = (out["logp_test"].argmax(-1) == y_test[None]).mean(1).tolist()
    out["acc_weak"] = (pack.log_probs(x_weak).numpy()[:k].argmax(-1) == data["y_weak"][None]).mean(1).tolist()
    out["seconds"] = time.perf_counter() - t0
    return out


@ray.remote
class PackTrainer:
    """Trains pack after pack on its CPU or GPU; stateless between packs, so a restarted
    actor (after a node loss) retries its pack with nothing to recover."""

    def __init__(self, threads: int):
        torch.set_num_threads(max(1, threads))
        self.device = gpu_device()
        self.node = ray.get_runtime_context().get_node_id()

    def train(self, data: dict, cfg_json: dict, n_classes: int, pack_index: int, teacher_ids: list[int], run: RunDir, stage: Path) -> dict[str, Any]:
        """Train a pack, write its files into the run's store from here, return its metadata
        (ids, seeds, accuracies, timings: a few hundred bytes, never its predictions)."""
        cfg = TeachersConfig.model_validate(cfg_json)
        out = train_pack_local(data, cfg, n_classes, teacher_ids, self.device)
        # provenance: a pack trained by an actor Ray restarted after losing it (a node died);
        # Ray 2.60 deprecates the property with a warning per actor but offers no replacement
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            restarted = ray.get_runtime_context().was_current_actor_reconstructed
        out.update(pack=pack_index, node=self.node, device=self.device, restarted=restarted)
        return write_pack(run, stage, out, cfg.keep_predictions)



# --- a pack's files, written by the worker that trained it ---------------------------------


def pack_path(stage: Path, split: str, pack_index: int) -> Path:
    return stage / "preds" / split / f"pack-{pack_index:05d}.parquet"


def sums_path(stage: Path, split: str, pack_index: int) -> Path:
    return stage / "sums" / split / f"pack-{pack_index:05d}.parquet"


def meta_path(stage: Path, pack_index: int) -> Path:
    return stage / "packs" / f"pack-{pack_index:05d}.parquet"


def kept_teachers(split: str, ids: np.ndarray, keep: str) -> np.ndarray:
    """Which of a pack's teachers have their predictions on `split` written (a boolean mask)."""
    if keep == "none" and split == "transfer":
        return ids < ALWAYS_KEPT
    return np.ones(len(ids), dtype=bool)


def write_pack(run: RunDir, stage: Path, result: dict[str, Any], keep: str = "all") -> dict[str, Any]:
    """Write one trained pack's files where it was trained and return its metadata only.

    Per split: the posterior's sufficient statistics over the pack (float64 Σp, Σlog p, Σp·log p
    per row: `sums/<split>/`), and the teachers' log-probs (`preds/<split>/`, long format:
    teacher_id, row, logp[C]) as `keep` says: `all` (float32), `float16`, or `none` (the
    transfer split's predictions only for teachers with id < ALWAYS_KEPT, the candidates for the
    designated single teacher; the test split's are kept, for the bootstrap CIs and the variance
    study). The metadata row is written last: the pack's marker of completion."""
    ids = np.asarray(result["teacher_ids"], dtype=np.int32)
    for split in PRED_SPLITS:
        logp = np.asarray(result[f"logp_{split}"], dtype=np.float32)  # [k, N, C]
        k, n, c = logp.shape
        acc = PosteriorAccumulator(n, c)
        acc.add(torch.from_numpy(logp))
        sums = {name: t.numpy() for name, t in acc.sums().items()}
        run.write_parquet(sums_path(stage, split, result["pack"]), pa.table(
            {
                "sum_p": pa.FixedSizeListArray.from_arrays(pa.array(sums["sum_p"].reshape(-1)), c),
                "sum_logp": pa.FixedSizeListArray.from_arrays(pa.array(sums["sum_logp"].reshape(-1)), c),
                "sum_neg_entropy": sums["sum_neg_entropy"],
            },
            metadata={"k": str(k), "teacher_ids": json.dumps(ids.tolist())},
        ))
        mask = kept_teachers(split, ids, keep)
        kept = logp[mask].astype(np.float16 if keep == "float16" else np.float32)
        run.write_parquet(pack_path(stage, split, result["pack"]), pa.table(
            {
                "teacher_id": np.repeat(ids[mask], n),
                "row": np.tile(np.arange(n, dtype=np.int32), int(mask.sum())),
                "logp": pa.FixedSizeListArray.from_arrays(pa.array(kept.reshape(-1)), c),
            }
        ))
    meta = pa.table(
        {
            "teacher_id": ids,
            "seed": np.asarray(result["seeds"], dtype=np.int64),
            "pack": np.full(len(ids), result["pack"], dtype=np.int32),
            "node": [result.get("node", "local")] * len(ids),
            "restarted": [bool(result.get("restarted", False))] * len(ids),
            "acc_test": np.asarray(result["acc_test"], dtype=np.float64),
            "acc_weak": np.asarray(result["acc_weak"], dtype=np.float64),
            "seconds": np.full(len(ids), result["seconds"], dtype=np.float64),
        }
    )
    run.write_parquet(meta_path(stage, result["pack"]), meta)
    return {key: value for key, value in result.items() if not key.startswith("logp_")}


# --- students ------------------------------------------------------------------------------


def student_task(cfg_json: dict, target: str | None, x: torch.Tensor, t: torch.Tensor, log_t: torch.Tensor, n_classes: int, y_gold: torch.Tensor | None, test: dict[str, torch.Tensor], threads: int = 1) -> dict[str, Any]:
    """Train and evaluate one student (`target` None: the gold-label ceiling); runs in a Ray task."""
    torch.set_num_threads(max(1, threads))
    cfg = StudentConfig.model_validate(cfg_json)
    device = gpu_device()
    ceiling = target is None
    if ceiling:  # forward CE on one-hot gold labels, whatever the students' loss
        cfg = cfg.model_copy(update={"rce_weight": 0.0})
    show = epoch_printer("ceiling" if ceiling else f"student[{target}]", cfg.epochs)
    res = train_student(cfg, x, t, log_t, n_classes, loss="mixture" if ceiling else None, y_gold=y_gold, device=device, on_epoch=lambda rec, _: show(rec))
    return evaluate_trained(cfg, target, res, x, log_t, n_classes, test, device)


def evaluate_task(cfg_json: dict, target: str, res: TrainResult, x: torch.Tensor, log_t: torch.Tensor, n_classes: int, test: dict[str, torch.Tensor], threads: int = 1) -> dict[str, Any]:
    """Evaluate a student trained elsewhere (across Ray Train workers); runs in a Ray task."""
    torch.set_num_threads(max(1, threads))
    return evaluate_trained(StudentConfig.model_validate(cfg_json), target, res, x, log_t, n_classes, test, "cpu")


def evaluate_trained(cfg: StudentConfig, target: str | None, res: TrainResult, x: torch.Tensor, log_t: torch.Tensor, n_classes: int, test: dict[str, torch.Tensor], device: str) -> dict[str, Any]:
    model = load_student(cfg, res.state_dict, x.shape[1], n_classes)
    log_test = predict_log(model, test["x"])
    log_transfer = predict_log(model, x)
    # the ceiling has no teacher target: its misfit is measured against the dual posterior mean
    evaluation = metrics.evaluate_student(log_test, test["y"], log_transfer, test["transfer_dual_log"] if target is None else log_t, test["dual_log"], test["single_log"])
    result = StudentResult(target, evaluation, res.best_epoch, res.epochs_run, res.n_params, res.seconds, device, res.history)
    return {"result": result, "state_dict": res.state_dict, "log_test": log_test}
