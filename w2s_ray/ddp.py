"""One student across several Ray Train workers (`student.workers: N`), fed by a Ray Data stream.

`label_datasets` reads the labels stage's Parquet parts with Ray Data (from the run's store when
it has one) and splits them by row id into the training rows and the held-out slice, with the
same held-out rows as the single-process student (`training.holdout_split`). `fit_student`
runs `TorchTrainer`: each worker reads its shard of the training stream every epoch
(`streaming_split` through Ray Train's `DataConfig`; a local shuffle buffer per worker), wraps
the model in DDP (gloo on CPU, NCCL on GPUs) and takes a global batch of `student.batch_size`
rows (`batch_size // N` per worker). Every worker reads the whole held-out slice once and
scores it after each epoch; all workers hold the same model after each all-reduce, so they take
the same early-stopping decision without talking. Rank 0 returns the best weights as a Ray
Train checkpoint. No row of the pseudo-labels passes through the driver.

Not supported across workers (refused when the config is validated): `selection: oracle` (gold
labels never enter the labels table) and `adaptive_quantile` (a quantile over every training
row). The gold ceiling is trained by one task, as with one worker.
"""

from __future__ import annotations

import tempfile
import time
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
from w2s_ray.labels import configure_ray_data
from w2s_ray.packfiles import batch_to_torch
from w2s_ray.losses import student_loss
from w2s_ray.models import build_model, count_params
from w2s_ray.raytools import epoch_printer
from w2s_ray.storage import RunDir
from w2s_ray.training import TrainResult, holdout_split, label_columns, loss_options, random_roll, target_of


def _rows(batch: pa.Table, hold_ids: pa.Array, held_out: bool) -> pa.Table:
    mask = pc.is_in(batch["id"], value_set=hold_ids)
    return batch.filter(mask if held_out else pc.invert(mask))


def label_datasets(run: RunDir, labels_dir: Path, cfg: StudentConfig, target: str) -> tuple[ray.data.Dataset, ray.data.Dataset, int]:
    """(training rows, held-out rows, number of training rows) as Ray Datasets, with the columns
    a student on `target` reads (`training.label_columns`). The driver reads the labels' `id`
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
    read = {"columns": label_columns(target, "t_dual"), "num_cpus": 0, "concurrency": cpus,
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


def train_loop(config: dict[str, Any]) -> None:
    """Runs in every Ray Train worker."""
    t0 = time.perf_counter()
    cfg = StudentConfig.model_validate(config["cfg"])
    target, n_classes, in_dim = config["target"], config["n_classes"], config["in_dim"]
    torch.set_num_threads(max(1, config["threads"]))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)
    model = prepare_model(build_model(cfg.model, in_dim, n_classes))
    device = next(model.parameters()).device
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_worker = max(1, cfg.batch_size // world)
    steps_per_epoch = max(1, config["n_train"] // (per_worker * world))
    total_steps = steps_per_epoch * cfg.epochs

    held = [batch_to_torch(b) for b in ray.train.get_dataset_shard("holdout").iter_batches(batch_size=65536, batch_format="pyarrow")]
    held = {k: torch.cat([b[k] for b in held]) for k in held[0]}
    h_t, h_log_t = target_of(held, target, cfg.log_floor)
    h_x, h_t, h_log_t = held["x"].to(device), h_t.to(device), h_log_t.to(device)
    h_dual = held["t_dual"].to(device)

    def loss_of(logits, t, log_t, step):
        return student_loss(cfg.loss, logits, t, log_t, **loss_options(cfg, step, total_steps, cfg.adaptive_threshold)).mean()

    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    show = epoch_printer(f"student[{target}] (rank {rank}/{world})", cfg.epochs) if rank == 0 else (lambda rec: None)
    shard = ray.train.get_dataset_shard("train")
    best, best_state, best_epoch, bad, step, history, best_ce = float("inf"), None, 0, 0, 0, [], float("nan")
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        total, rows = 0.0, 0
        for d in epoch_batches(shard, per_worker, cfg.seed, epoch, rank):
            t, log_t = target_of(d, target, cfg.log_floor)
            xb = d["x"].to(device)
            if cfg.augment_shift:
                xb = random_roll(xb, cfg.augment_shift, gen)
            opt.zero_grad(set_to_none=True)
            loss = loss_of(model(xb), t.to(device), log_t.to(device), step)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(xb)
            rows += len(xb)
            step += 1
        with torch.no_grad():
            model.eval()
            logits = model(h_x)
            hold_loss = float(loss_of(logits, h_t, h_log_t, total_steps))  # the full λ, as the one-process loop scores it
            agree = float((logits.argmax(-1) == h_t.argmax(-1)).float().mean())
            teacher_ce = float(-(h_dual * torch.log_softmax(logits, -1)).sum(-1).mean())
        rec = {"epoch": epoch, "train_loss": total / max(rows, 1), "holdout_loss": hold_loss, "holdout_agreement": agree}
        history.append(rec)
        if hold_loss < best - 1e-6 or cfg.selection == "last":
            best, best_epoch, bad, best_ce = hold_loss, epoch, 0, teacher_ce
            best_state = {k: v.detach().cpu().clone() for k, v in _unwrap(model).state_dict().items()}
        else:
            bad += 1
        rec["best_epoch"] = best_epoch
        show(rec)
        if config.get("report_epochs"):  # every rank reports (Ray Train waits for all); Tune gets rank 0's
            ray.train.report({"epoch": epoch, "holdout_loss": best, "val_teacher_ce": best_ce, "best_epoch": best_epoch})
        if bad >= cfg.patience:
            break
    out = TrainResult(best_state, best_epoch, len(history), count_params(_unwrap(model)), time.perf_counter() - t0, history)
    # with per-epoch reports (a Tune trial) the last one carries the same keys as the others
    metrics = {"epoch": len(history), "holdout_loss": best, "val_teacher_ce": best_ce, "best_epoch": best_epoch, "epochs_run": len(history)}
    if rank == 0:
        with tempfile.TemporaryDirectory() as d:
            torch.save(out, Path(d) / "student.pt")
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))
    else:
        ray.train.report(metrics)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def fit_student(run: RunDir, labels_dir: Path, cfg: StudentConfig, target: str, in_dim: int, n_classes: int, storage: Path,
                callbacks: list | None = None) -> TrainResult:
    """Train one student on `target` across `cfg.workers` Ray Train workers; its best weights.
    With `callbacks` (a Tune trial's `TuneReportCallback`), every epoch is reported to them."""
    train, held, n_train = label_datasets(run, labels_dir, cfg, target)
    res = cfg.resources
    fs, path = run.remote(storage) or (None, str(storage.resolve()))
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "target": target, "n_classes": n_classes, "in_dim": in_dim,
                           "n_train": n_train, "threads": max(1, int(res.num_cpus)), "report_epochs": bool(callbacks)},
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=res.num_gpus > 0,
                                     resources_per_worker={"CPU": res.num_cpus, **({"GPU": res.num_gpus} if res.num_gpus else {})}),
        datasets={"train": train, "holdout": held},
        dataset_config=DataConfig(datasets_to_split=["train"]),
        run_config=RunConfig(name=f"student-{target}", storage_path=path, storage_filesystem=fs, callbacks=callbacks),
    )
    result = trainer.fit()
    if result.error is not None or result.checkpoint is None:
        raise W2SError(f"student[{target}] across {cfg.workers} workers failed: {result.error}")
    with result.checkpoint.as_directory() as d:
        return torch.load(Path(d) / "student.pt", weights_only=False)
