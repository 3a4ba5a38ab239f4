"""The teacher ensemble on Ray: actors train packs of teachers; the driver collects them.

The driver ships the weak, transfer and test inputs to the object store once, starts a few
`PackTrainer` actors, hands each a pack of teacher ids at a time and collects packs with
`ray.wait` as they finish. Each finished pack is written at once (its teachers' log-probs on
the transfer and test splits, long format: teacher_id, row, logp[C]), so an interrupted stage
resumes with the teachers it has not trained yet.

Actors are placed with the SPREAD strategy, so a cluster's nodes share the packs. When a node
dies, Ray restarts its actors elsewhere and retries their pack (`max_restarts`,
`max_task_retries`); if that is not enough (restarts used up, the result lost with the node),
the driver puts the pack back in the queue with a fresh actor. Since a teacher is a pure
function of its seed and a pack keeps its teacher ids, a retried pack reproduces exactly the
teachers it would have given: a lost node changes no posterior statistic.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from w2s_ray import artifacts
from w2s_ray.config import ExperimentConfig, TeachersConfig
from w2s_ray.raytools import progress

PRED_SPLITS = ("transfer", "test")


def plan_packs(todo: list[int], n_actors: int, max_pack: int) -> list[list[int]]:
    """Split teacher ids into packs: one per actor when they fit, never above `max_pack`."""
    if not todo:
        return []
    size = max(1, min(max_pack, math.ceil(len(todo) / n_actors)))
    return [todo[i : i + size] for i in range(0, len(todo), size)]


def default_num_actors(cfg: TeachersConfig, resources: dict[str, float]) -> int:
    """As many actors as the cluster's resources hold at once (never more: an actor that cannot be
    placed would sit on its pre-assigned pack forever while the placed ones idle)."""
    fit = int(resources.get("CPU", 1) // cfg.num_cpus_per_actor)
    if cfg.num_gpus_per_actor > 0:
        fit = min(fit, int(resources.get("GPU", 0) / cfg.num_gpus_per_actor))
    fit = max(1, fit)
    return min(cfg.num_actors, fit) if cfg.num_actors else fit


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
    import torch

    from w2s_ray.packs import TeacherPack, teacher_indices, teacher_seed

    t0 = time.perf_counter()
    # arrays from the object store are read-only; torch.tensor copies them into writable memory
    x_weak = torch.tensor(teacher_view(data["x_weak"], cfg))
    y_weak = torch.tensor(data["y_weak"])
    n = len(y_weak)
    seeds = [teacher_seed(cfg.seed, t) for t in teacher_ids]
    index_sets = [teacher_indices(cfg.resample, n, cfg.k, t, s, cfg.seed) for t, s in zip(teacher_ids, seeds)]
    pack = TeacherPack(cfg.model, x_weak.shape[1], n_classes, seeds, device=device, compile=cfg.compile)
    steps = pack.fit(x_weak, y_weak, index_sets, cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight_decay)
    out: dict[str, Any] = {"teacher_ids": list(teacher_ids), "seeds": seeds, "steps": steps}
    for split in PRED_SPLITS:
        out[f"logp_{split}"] = pack.log_probs(torch.tensor(teacher_view(data[f"x_{split}"], cfg))).numpy()
    y_test = data["y_test"]
    out["acc_test"] = (out["logp_test"].argmax(-1) == y_test[None]).mean(1).tolist()
    out["acc_weak"] = (pack.log_probs(x_weak).numpy().argmax(-1) == data["y_weak"][None]).mean(1).tolist()
    out["seconds"] = time.perf_counter() - t0
    return out


def _pack_trainer_class():
    import ray

    @ray.remote
    class PackTrainer:
        """Trains pack after pack on its CPU or GPU; stateless between packs, so a restarted
        actor (after a node loss) retries its pack with nothing to recover."""

        def __init__(self, threads: int):
            import torch

            torch.set_num_threads(max(1, threads))
            gpu = bool(ray.get_gpu_ids()) and torch.cuda.is_available()
            self.device = "cuda" if gpu else "cpu"
            self.node = ray.get_runtime_context().get_node_id()

        def train(self, data: dict, cfg_json: dict, n_classes: int, pack_index: int, teacher_ids: list[int]) -> dict[str, Any]:
            cfg = TeachersConfig.model_validate(cfg_json)
            out = train_pack_local(data, cfg, n_classes, teacher_ids, self.device)
            # provenance: a pack trained by an actor Ray restarted after losing it (a node died)
            restarted = ray.get_runtime_context().was_current_actor_reconstructed
            out.update(pack=pack_index, node=self.node, device=self.device, restarted=restarted)
            return out

    return PackTrainer


class ActorPool:
    """The pack-training actors of this driver, kept between calls of `train_teachers`.

    Starting an actor costs about a second (a worker process importing torch); studies that
    train many ensembles reuse the pool. Actors hold their CPUs/GPUs while alive, so the
    pipeline releases the pool before students need those resources.
    """

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.actors: list = []

    def _start(self, cfg: TeachersConfig):
        trainer = _pack_trainer_class().options(
            num_cpus=cfg.num_cpus_per_actor,
            num_gpus=cfg.num_gpus_per_actor,
            max_restarts=cfg.max_retries,
            max_task_retries=cfg.max_retries,
            scheduling_strategy="SPREAD",
        )
        return trainer.remote(max(1, int(cfg.num_cpus_per_actor)))

    def get(self, cfg: TeachersConfig, n: int) -> list:
        key = (cfg.num_cpus_per_actor, cfg.num_gpus_per_actor, cfg.max_retries)
        if key != self.key:
            self.release()
            self.key = key
        self.actors += [self._start(cfg) for _ in range(n - len(self.actors))]
        return self.actors[:n]

    def replace(self, cfg: TeachersConfig, dead):
        """A fresh actor in place of one Ray gave up on (restarts used up, or its node gone)."""
        import ray

        ray.kill(dead)
        new = self._start(cfg)
        self.actors[self.actors.index(dead)] = new
        return new

    def release(self) -> None:
        import ray

        if ray.is_initialized():
            for actor in self.actors:
                ray.kill(actor)
        self.actors, self.key = [], None


POOL = ActorPool()


# --- on-disk layout ------------------------------------------------------------------------


def pack_path(stage: Path, split: str, pack_index: int) -> Path:
    return stage / "preds" / split / f"pack-{pack_index:05d}.parquet"


def write_pack(stage: Path, result: dict[str, Any]) -> None:
    """Predictions first (one file per split), then the pack's metadata row: its marker of completion."""
    ids = np.asarray(result["teacher_ids"], dtype=np.int32)
    for split in PRED_SPLITS:
        logp = np.asarray(result[f"logp_{split}"], dtype=np.float32)  # [k, N, C]
        k, n, c = logp.shape
        flat = pa.array(logp.reshape(-1), type=pa.float32())
        table = pa.table(
            {
                "teacher_id": np.repeat(ids, n),
                "row": np.tile(np.arange(n, dtype=np.int32), k),
                "logp": pa.FixedSizeListArray.from_arrays(flat, c),
            }
        )
        artifacts.write_parquet(pack_path(stage, split, result["pack"]), table)
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
    artifacts.write_parquet(stage / "packs" / f"pack-{result['pack']:05d}.parquet", meta)


def finished_packs(stage: Path) -> pa.Table | None:
    files = sorted((stage / "packs").glob("pack-*.parquet"))
    # promote: packs written before a column was added (provenance) still concatenate
    return pa.concat_tables([pq.read_table(f) for f in files], promote_options="default") if files else None


def read_teacher_table(stage: Path, k: int) -> pa.Table:
    """Teachers 0..k-1 of a stage that may hold more (an extended ensemble)."""
    import pyarrow.compute as pc

    t = pq.read_table(stage / "teachers.parquet")
    return t.filter(pc.less(t["teacher_id"], k))


def read_pack_logp(stage: Path, split: str, pack_index: int, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(teacher ids, `[k, N, C]` log-probs) of one pack, only teachers below `k` when given."""
    filters = [("teacher_id", "<", k)] if k is not None else None
    t = pq.read_table(pack_path(stage, split, pack_index), filters=filters)
    c = t.schema.field("logp").type.list_size
    if t.num_rows == 0:
        return np.zeros(0, dtype=np.int32), np.zeros((0, 0, c), dtype=np.float32)
    ids = t["teacher_id"].to_numpy()
    logp = t["logp"].combine_chunks().flatten().to_numpy().reshape(-1, c)
    teacher_ids = np.unique(ids)
    return teacher_ids, logp.reshape(len(teacher_ids), -1, c)


# --- the stage -----------------------------------------------------------------------------


def _lost_errors() -> tuple[type[Exception], ...]:
    """Failures of the system (a dead actor, worker or node; a lost result), not of training."""
    from ray import exceptions as e

    return (e.RayActorError, e.ObjectLostError, e.WorkerCrashedError, e.NodeDiedError)


def log_lost(pack: int, err: Exception) -> None:
    sys.stderr.write(f"\nteachers: pack {pack} lost ({type(err).__name__}); queued again\n")


def train_teachers(cfg: ExperimentConfig, splits: dict, n_classes: int, stage: Path) -> pa.Table:
    """Train the K teachers not yet on disk in `stage`; return the per-teacher table."""
    import ray

    from w2s_ray.raytools import cluster_resources

    tcfg = cfg.teachers
    lost_errors = _lost_errors()
    done = finished_packs(stage)
    done_ids = set(done["teacher_id"].to_pylist()) if done is not None else set()
    todo = [t for t in range(tcfg.k) if t not in done_ids]
    next_pack = (max(done["pack"].to_pylist()) + 1) if done is not None else 0
    n_actors = default_num_actors(tcfg, cluster_resources())
    packs = plan_packs(todo, n_actors, tcfg.max_pack_size)
    if packs:
        data = {f"x_{s}": splits[s].x for s in splits} | {f"y_{s}": splits[s].y for s in splits}
        data_ref = ray.put(data)
        cfg_json = tcfg.model_dump(mode="json")
        actors = POOL.get(tcfg, min(n_actors, len(packs)))
        queue = list(enumerate(packs, start=next_pack))
        running: dict[Any, Any] = {}

        def submit(actor) -> None:
            p, ids = queue.pop(0)
            running[actor.train.remote(data_ref, cfg_json, n_classes, p, ids)] = (actor, p, ids)

        for actor in actors:
            if queue:
                submit(actor)
        n_done, t0 = len(done_ids), time.perf_counter()
        requeued: dict[int, int] = {}
        progress("teachers", n_done, tcfg.k)
        while running:
            [ref], _ = ray.wait(list(running), num_returns=1)
            actor, p, ids = running.pop(ref)
            try:
                result = ray.get(ref)
            except lost_errors as err:
                # Ray's own restarts and retries did not save this pack: queue it again
                requeued[p] = requeued.get(p, 0) + 1
                if requeued[p] > tcfg.max_retries + 1:
                    raise
                log_lost(p, err)
                queue.insert(0, (p, ids))
                actor = POOL.replace(tcfg, actor) if isinstance(err, ray.exceptions.RayActorError) else actor
                submit(actor)
                continue
            write_pack(stage, result)
            n_done += len(result["teacher_ids"])
            progress("teachers", n_done, tcfg.k, f"{time.perf_counter() - t0:.1f}s")
            if queue:
                submit(actor)
    table = finished_packs(stage)
    return table.sort_by("teacher_id")
