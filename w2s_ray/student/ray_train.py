"""One student across several Ray Train workers (`student.workers: N`): the Ray Train world of
the one student loop (`core.fit`).

`fit_student` runs `TorchTrainer`; every worker builds a `World` and calls `core.fit`, the loop
the `workers: 1` task runs. The worker wraps the model in DDP (`prepare_model`: gloo on CPU,
NCCL on GPUs) and takes 1/N of each global batch of `student.batch_size` rows. Its batches come
from one of two sources (`student.input`):

- `stream` (default): `label_datasets` reads the labels stage's Parquet parts with Ray Data (from
  the run's store when it has one) and splits them by row id into the training rows and the
  held-out slice, with the same held-out rows as the one-process student (`core.holdout_split`).
  Each worker reads its shard of the training stream every epoch (`streaming_split` through Ray
  Train's `DataConfig`; a local shuffle buffer per worker) and the whole held-out slice once. No
  row of the pseudo-labels passes through the driver, and a worker holds a few batches of them.
- `memory`: each worker reads the columns it needs of the labels table itself (`LabelSource`) and
  draws the same global batches as the one-process student (`core.InMemory`), so a student at N
  workers takes the same steps as at one, up to the order of the gradient all-reduce; every
  selection rule works. A worker holds the table's columns its target reads.

Every worker scores the whole held-out slice after each epoch; all workers hold the same model
after each all-reduce, so they take the same early-stopping decision without talking. Rank 0
returns the best weights as a Ray Train checkpoint. Not supported with the stream source (refused
when the config is validated): `selection: oracle` (gold labels never enter the labels table)
and `adaptive_quantile` (a quantile over every training row). A restarted Tune trial across
workers trains again from its start (the Ray Train run keeps no per-epoch checkpoint). The gold
ceiling is trained by one task, as with one worker.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pyarrow.compute as pc
import ray.data
import ray.train
import torch
from ray.train import Checkpoint, DataConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer, prepare_model

from w2s_ray.config import StudentConfig
from w2s_ray.errors import W2SError
from w2s_ray.labelfiles import batch_to_torch
from w2s_ray.raytools import configure_ray_data, epoch_printer
from w2s_ray.storage import RunDir
from w2s_ray.student.recipe import StudentJob, read_inputs
from w2s_ray.student.core import Batch, Holdout, TrainResult, fit, holdout_split, label_columns, quantile_threshold, random_roll, target_of


def iter_label_batches(run: RunDir, stage: Path, batch_size: int = 65536):
    """Stream the pseudo-labels through `ray.data.read_parquet` as dicts of tensors."""
    configure_ray_data()
    remote = run.remote(stage / "parts")  # in a store, read tasks on any node can reach the parts
    ds = ray.data.read_parquet(remote[1], filesystem=remote[0]) if remote else ray.data.read_parquet(str(stage / "parts"))
    for batch in ds.iter_batches(batch_size=batch_size, batch_format="pyarrow", prefetch_batches=4):
        yield batch_to_torch(batch)


def _rows(batch: pa.Table, hold_ids: pa.Array, held_out: bool) -> pa.Table:
    mask = pc.is_in(batch["id"], value_set=hold_ids)
    return batch.filter(mask if held_out else pc.invert(mask))


def label_datasets(run: RunDir, labels_dir: Path, cfg: StudentConfig, target: str) -> tuple[ray.data.Dataset, ray.data.Dataset, int]:
    """(training rows, held-out rows, number of training rows) as Ray Datasets, with the columns
    a student on `target` reads (`core.label_columns`). The driver reads the labels' `id`
    column alone (8 bytes a row) to name the held-out rows."""
    configure_ray_data()
    ids = pq.read_table(labels_dir / "parts", columns=["id"])["id"].to_numpy()
    remote = run.remote(labels_dir / "parts")
    # the stream's tasks ask for no CPU: the trainers may hold every CPU (2 workers on 2 CPUs
    # here), and Ray Data tasks waiting for one would never run (the Tune/Train + Ray Data hang).
    # Zero-CPU tasks are not limited by the CPUs either: without `concurrency` a 500,000-row
    # table started 120 worker processes on 2 CPUs, so at most one task per cluster CPU runs
    # One read task per part (the labels stage writes one per `rows_per_file` rows): left to
    # choose, Ray Data cut 5 parts of 500,000 rows into some 200 tiny read tasks.
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    read = {"columns": label_columns(target), "num_cpus": 0, "concurrency": cpus,
            "override_num_blocks": max(1, len(list((labels_dir / "parts").glob("*.parquet"))))}
    if remote:
        ds = ray.data.read_parquet(remote[1], filesystem=remote[0], **read)
    else:
        ds = ray.data.read_parquet(str(labels_dir / "parts"), **read)
    _, hold = holdout_split(len(ids), cfg.holdout_frac, cfg.seed)
    hold_ids = pa.array(np.sort(ids[hold.numpy()]))
    split = {"batch_format": "pyarrow", "zero_copy_batch": True, "num_cpus": 0, "compute": ray.data.TaskPoolStrategy(size=cpus)}
    # read once into the object store (blocks stay on the nodes that read them, spilled to disk
    # beyond its size; the driver holds references only): re-reading the Parquet parts every
    # epoch cost 17 s per epoch for 3,600 rows on 2 CPUs, mostly Ray Data's start-up per execution;
    # leaving the held-out slice for each worker to read made a 4-epoch student 5× slower
    train = ds.map_batches(_rows, fn_kwargs={"hold_ids": hold_ids, "held_out": False}, **split).materialize()
    held = ds.map_batches(_rows, fn_kwargs={"hold_ids": hold_ids, "held_out": True}, **split).materialize()
    return train, held, len(ids) - len(hold)


STREAM_ROWS = 8192
"""Rows a worker takes from its shard at a time; it cuts them into its training batches. Asking
Ray Data for 64-row batches delivered 0.22× of pyarrow's in-process rate at the same batch size
(`benchmarks/bench_labels.py`, 500,000 rows, 2 workers on 2 CPUs): each batch pays Ray Data's
per-batch cost."""


def epoch_batches(shard, per_worker: int, seed: int, epoch: int, rank: int) -> Iterator[dict[str, torch.Tensor]]:
    """One epoch of a worker's input: its shard of the label stream through a local shuffle
    buffer (seeded per epoch and rank), `STREAM_ROWS` rows at a time, shuffled again within
    those and cut into batches of `per_worker` rows, as tensors (a last short batch is dropped:
    every worker then takes the same number of steps, its shard being of equal size)."""
    chunk = max(per_worker, STREAM_ROWS // per_worker * per_worker)
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch * 101 + rank)
    batches = shard.iter_batches(batch_size=chunk, batch_format="pyarrow", drop_last=False,
                                 local_shuffle_buffer_size=2 * chunk, local_shuffle_seed=seed * 100_003 + epoch * 101 + rank)
    for b in batches:
        d = batch_to_torch(b)
        order = torch.randperm(len(d["id"]), generator=gen)
        for s in range(0, len(order) - per_worker + 1, per_worker):
            rows = order[s : s + per_worker]
            yield {k: v[rows] for k, v in d.items()}


class StreamWorld:
    """Rank `rank` of `size` workers reading its shard of the label stream (`epoch_batches`):
    `batch_size // size` rows a step, augmentation drawn from this rank's own generator."""

    def __init__(self, cfg: StudentConfig, target: str, shard, n_train: int, holdout: Holdout, device: str, rank: int, size: int):
        self.cfg, self.target, self.shard, self.device, self.rank, self.size = cfg, target, shard, device, rank, size
        self.holdout = holdout.to(device)
        self.per_worker = max(1, cfg.batch_size // size)
        self.steps_per_epoch = max(1, n_train // (self.per_worker * size))
        self.gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return prepare_model(model)

    def batches(self, epoch: int) -> Iterator[Batch]:
        for d in epoch_batches(self.shard, self.per_worker, self.cfg.seed, epoch, self.rank):
            t, log_t = target_of(d, self.target, self.cfg.log_floor)
            xb = d["x"].to(self.device)
            if self.cfg.augment_shift:
                xb = random_roll(xb, self.cfg.augment_shift, self.gen)
            yield xb, t.to(self.device), log_t.to(self.device), None  # no row weights in the stream (config refuses weighting here)


def stream_holdout(target: str, log_floor: float) -> Holdout:
    """The held-out slice, read whole by this worker from its `holdout` dataset."""
    held = [batch_to_torch(b) for b in ray.train.get_dataset_shard("holdout").iter_batches(batch_size=65536, batch_format="pyarrow")]
    held = {k: torch.cat([b[k] for b in held]) for k in held[0]}
    t, log_t = target_of(held, target, log_floor)
    return Holdout(held["x"], t, log_t, held["logt_dual"].exp())


def train_loop(config: dict[str, Any]) -> None:
    """Runs in every Ray Train worker: its world, then the one student loop."""
    cfg = StudentConfig.model_validate(config["cfg"])
    target, n_classes, in_dim = config["target"], config["n_classes"], config["in_dim"]
    torch.set_num_threads(max(1, config["threads"]))
    ctx = ray.train.get_context()
    rank, size = ctx.get_world_rank(), ctx.get_world_size()
    device = str(ray.train.torch.get_device())
    threshold = None
    if cfg.input == "memory":  # the one-process student's inputs and global batches, 1/N of each here
        inputs = read_inputs(config["job"])
        world = inputs.world(device, rank, size, wrap=prepare_model)
        threshold = quantile_threshold(inputs.cfg, inputs.t, world.train_rows)
    else:
        world = StreamWorld(cfg, target, ray.train.get_dataset_shard("train"), config["n_train"], stream_holdout(target, cfg.log_floor), device, rank, size)
    show = epoch_printer(f"student[{target}] (rank {rank}/{size})", cfg.epochs) if rank == 0 else (lambda rec: None)
    records: list[dict] = []

    def best_so_far(rec: dict) -> dict[str, Any]:
        best = records[rec["best_epoch"] - 1]
        return {"epoch": rec["epoch"], "holdout_loss": best["holdout_loss"], "val_teacher_ce": best["val_teacher_ce"], "best_epoch": rec["best_epoch"]}

    def on_epoch(rec: dict, _checkpoint) -> None:
        records.append(rec)
        show(rec)
        if config.get("report_epochs"):  # every rank reports (Ray Train waits for all); Tune gets rank 0's
            ray.train.report(best_so_far(rec))

    out = fit(cfg, world, in_dim, n_classes, threshold=threshold, on_epoch=on_epoch)
    # with per-epoch reports (a Tune trial) the last one carries the same keys as the others
    metrics = {**best_so_far(records[-1]), "epoch": out.epochs_run, "epochs_run": out.epochs_run}
    if rank == 0:
        with tempfile.TemporaryDirectory() as d:
            torch.save(out, Path(d) / "student.pt")
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))
    else:
        ray.train.report(metrics)


HEALTH_CHECK_S = "0.5"
"""How often the Ray Train controller polls its workers, unless RAY_TRAIN_HEALTH_CHECK_INTERVAL_S
is set (Ray's default: 2 s). The controller sees the end of training only at its next poll,
and a student here trains in seconds: measured on 2 CPUs, a 4-epoch student took 5.3 s from the
workers' last report to `fit` returning at 2 s, 2.4 s at 0.2 s."""


@contextmanager
def controller_polling() -> Iterator[None]:
    """`HEALTH_CHECK_S` in this process's environment while a trainer starts and runs (Ray Train
    passes the variable on to its controller), as it was afterwards."""
    name = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
    if name in os.environ:
        yield
        return
    os.environ[name] = HEALTH_CHECK_S
    try:
        yield
    finally:
        os.environ.pop(name, None)


def fit_student(job: StudentJob, in_dim: int, storage: Path, callbacks: list | None = None) -> TrainResult:
    """Train `job`'s student across `job.cfg.workers` Ray Train workers; its best weights. With
    `callbacks` (a Tune trial's `TuneReportCallback`), every epoch is reported to them."""
    cfg, target, src = job.cfg, job.target, job.src
    res = cfg.resources
    config = {"cfg": cfg.model_dump(mode="json"), "target": target, "n_classes": job.n_classes, "in_dim": in_dim,
              "threads": max(1, int(res.num_cpus)), "report_epochs": bool(callbacks)}
    datasets, dataset_config = None, None
    if cfg.input == "memory":
        config["job"] = job
    else:
        train, held, config["n_train"] = label_datasets(src.run, src.labels, cfg, target)
        datasets, dataset_config = {"train": train, "holdout": held}, DataConfig(datasets_to_split=["train"])
    fs, path = src.run.remote(storage) or (None, str(storage.resolve()))
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=res.num_gpus > 0,
                                     resources_per_worker={"CPU": res.num_cpus, **({"GPU": res.num_gpus} if res.num_gpus else {})}),
        datasets=datasets,
        dataset_config=dataset_config,
        run_config=RunConfig(name=f"student-{target}", storage_path=path, storage_filesystem=fs, callbacks=callbacks),
    )
    with controller_polling():
        result = trainer.fit()
    if result.error is not None or result.checkpoint is None:
        raise W2SError(f"student[{target}] across {cfg.workers} workers failed: {result.error}")
    with result.checkpoint.as_directory() as d:
        return torch.load(Path(d) / "student.pt", weights_only=False)
