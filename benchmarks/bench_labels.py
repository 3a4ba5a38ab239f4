"""(b) Pseudo-label streaming into torch: the project's Ray Data path vs pyarrow directly, and
the student's own input pipelines measured at the training loop with training stubbed out.

Writes a labels table of --rows rows (same schema as the labels stage) as the labels stage's
blocks write it (parts of 100,000 rows, `packfiles.part_path`), then:

1. streams all of it into torch tensors, batch by batch, with Ray Data and with pyarrow, with
   the same Arrow → torch conversion (`packfiles.batch_to_torch`);
2. the inputs of a one-process student (`student.workers: 1`): `LabelSource.read` of the
   target's columns in the task, then `student.core.InMemory` batches of `student.batch_size`
   gathered from them, for --epochs epochs: rows delivered per second against pyarrow reading
   the same columns in-process (a fresh read per epoch);
3. the inputs of a student across 2 Ray Train workers (`student.workers: 2`): `ray_train.label_datasets`
   (read once into the object store), then every worker's `ray_train.epoch_batches` for --epochs
   epochs inside a real `TorchTrainer`, the loop doing nothing with the batches.

    python benchmarks/bench_labels.py [--rows 500000] [--batch 65536] [--reps 3] [--epochs 3] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import time

import common  # noqa: F401
import numpy as np
import pyarrow.parquet as pq
import torch

from w2s_ray.artifacts import ROW_GROUP
from w2s_ray.config import StudentConfig
from w2s_ray.student.ray_train import iter_label_batches
from w2s_ray.labelfiles import batch_to_torch, labels_table, LabelSource, part_path
from w2s_ray.storage import RunDir
from w2s_ray.student.core import in_memory, label_columns, target_of

TARGET = "dual_mean"


def pyarrow_read(parts: Path, batch: int) -> int:
    """The same conversion to torch as the project's path, reading with pyarrow in-process."""
    n = 0
    for f in sorted(parts.glob("*.parquet")):
        for rb in pq.ParquetFile(f).iter_batches(batch_size=batch):
            n += len(batch_to_torch(rb)["id"])
    return n


def pyarrow_columns(parts: Path, columns: list[str], batch: int) -> int:
    """pyarrow reading the student's columns in-process, `batch` rows at a time, to tensors:
    the reference rate (the same Parquet read afresh each epoch, in training-sized batches)."""
    n = 0
    for f in sorted(parts.glob("*.parquet")):
        for rb in pq.ParquetFile(f).iter_batches(batch_size=batch, columns=columns):
            n += len(batch_to_torch(rb)["id"])
    return n


def task_input(src: LabelSource, cfg: StudentConfig, epochs: int) -> int:
    """A one-process student's input with training stubbed: the read, then every batch gathered."""
    labels = src.read(label_columns(TARGET))
    t, log_t = target_of(labels, TARGET, cfg.log_floor)
    world = in_memory(cfg, labels["x"], t, log_t)
    n = 0
    for epoch in range(1, epochs + 1):
        for xb, *_ in world.batches(epoch):  # the loop's gathers; the step is stubbed
            n += len(xb)
    return n


def stub_loop(config: dict) -> None:
    """A Ray Train worker's loop with training stubbed: every epoch's batches, nothing done."""
    import ray.train

    from w2s_ray.student import ray_train as ddp

    ddp.STREAM_ROWS = config["stream_rows"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    shard = ray.train.get_dataset_shard("train")
    per_worker = max(1, config["batch"] // world)
    times, rows = [], 0
    for epoch in range(1, config["epochs"] + 1):
        t0 = time.perf_counter()
        for d in ddp.epoch_batches(shard, per_worker, 0, epoch, rank):
            rows += len(d["x"])
        times.append(time.perf_counter() - t0)
    # Ray Train V2 keeps a report's metrics only with a checkpoint: each rank writes its own
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps({"rows": rows, "seconds": sum(times), "epoch_s": times}))
    ray.train.report({"rows": rows})


def ddp_input(run: RunDir, d: Path, cfg: StudentConfig, epochs: int, workers: int, stream_rows: int) -> tuple[float, int, float]:
    """(seconds to read the stream into the object store, rows delivered per worker-epoch loop,
    the slowest worker's seconds over all epochs)."""
    from ray.train import DataConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from w2s_ray.student.ray_train import label_datasets

    t0 = time.perf_counter()
    train, held, n_train = label_datasets(run, d, cfg, TARGET)
    t_read = time.perf_counter() - t0
    trainer = TorchTrainer(stub_loop, train_loop_config={"batch": cfg.batch_size, "epochs": epochs, "out": str(d), "stream_rows": stream_rows},
                           scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
                           datasets={"train": train}, dataset_config=DataConfig(datasets_to_split=["train"]),
                           run_config=RunConfig(name="stub", storage_path=str(d / "train")))
    trainer.fit()
    ranks = [json.loads((d / f"rank{r}.json").read_text()) for r in range(workers)]
    return t_read, sum(r["rows"] for r in ranks), max(r["seconds"] for r in ranks)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=500_000)
    ap.add_argument("--batch", type=int, default=65536)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--stream-rows", type=int, nargs="+", default=[8192], help="ray_train.STREAM_ROWS values to compare")
    ap.add_argument("--student-only", action="store_true", help="skip the Ray Data vs pyarrow read (1.)")
    ap.add_argument("--smoke", action="store_true", help="20,000 rows, one rep, one epoch: checks that it runs")
    a = ap.parse_args()
    if a.smoke:
        a.rows, a.reps, a.epochs = 20_000, 1, 1
    common.start_ray()
    rng = np.random.default_rng(0)
    n, c = a.rows, 10
    logits = torch.from_numpy(rng.normal(size=(n, c)).astype(np.float32))
    post = {
        "dual_log": torch.log_softmax(logits, -1),
        "arith": torch.softmax(logits * 0.9, -1),
        "single_log": torch.log_softmax(logits * 1.1, -1),
        "variance": torch.rand(n),
        "pred_entropy": torch.rand(n),
        "mutual_info": torch.rand(n),
    }
    d = Path(tempfile.mkdtemp())
    run = RunDir(d)
    try:
        table = labels_table(np.arange(n), rng.normal(size=(n, 40)).astype(np.float32), post)
        for r0 in range(0, n, 100_000):
            run.write_parquet(part_path(d, r0), table.slice(r0, 100_000), ROW_GROUP)
        mb = sum(f.stat().st_size for f in (d / "parts").glob("*.parquet")) / 1e6
        print(f"{n:,} rows, {len(table.schema)} columns, {mb:.0f} MB of Parquet in {len(list((d / 'parts').glob('*.parquet')))} files")
        def ray_read() -> int:
            return sum(len(b["id"]) for b in iter_label_batches(run, d, a.batch))

        if not a.student_only:
            ray_read()  # warm-up
            t_ray, ts_ray, m = common.timed(ray_read, a.reps)
            assert m == n
            t_pa, ts_pa, m = common.timed(lambda: pyarrow_read(d / "parts", a.batch), a.reps)
            assert m == n
            print(f"Ray Data read_parquet -> torch batches  {n / t_ray:>12,.0f} rows/s  median of {common.fmt_times(ts_ray)}")
            print(f"pyarrow iter_batches  -> torch batches  {n / t_pa:>12,.0f} rows/s  median of {common.fmt_times(ts_pa)}")
            print(f"ratio Ray Data / pyarrow = {t_pa / t_ray:.2f}x   (target >= 0.8)")

        # the student's input at the training loop, training stubbed
        cfg = StudentConfig()
        cols = label_columns(TARGET)
        run.write_manifest(d, "labels")
        src = LabelSource(run, d, d / "transfer.parquet")
        print(f"\nstudent input, training stubbed (batch {cfg.batch_size}, columns {cols})")
        for size in (a.batch, cfg.batch_size):
            t_ref, ts_ref, m = common.timed(lambda: pyarrow_columns(d / "parts", cols, size), a.reps)
            assert m == n
            print(f"pyarrow iter_batches({size}) of those columns    {n / t_ref:>12,.0f} rows/s  median of {common.fmt_times(ts_ref)}")
        ref = n / t_ref  # the reference: pyarrow in-process at the training batch size
        for epochs in sorted({1, a.epochs}):
            t_task, ts_task, rows = common.timed(lambda: task_input(src, cfg, epochs), a.reps)
            print(f"workers: 1, read + {epochs} epoch(s) of batches       {rows / t_task:>12,.0f} rows/s  median of {common.fmt_times(ts_task)}"
                  f"   ratio {rows / t_task / ref:.2f}x against pyarrow reading every epoch (target >= 0.8)")
        # the fair reference for several workers: the one-process input (read once, batches
        # gathered in memory), over the same epochs, in one process
        mem = rows / t_task
        print(f"reference for the Ray Train input: workers: 1 (1 process, read once, gathered in memory), {a.epochs} epoch(s): {mem:,.0f} rows/s")
        for stream_rows in a.stream_rows:
            t_read, rows, t_loop = ddp_input(run, d, cfg, a.epochs, a.workers, stream_rows)
            print(f"workers: {a.workers}, read into the object store once          {n / t_read:>12,.0f} rows/s  ({t_read:.1f} s)")
            print(f"workers: {a.workers}, {a.epochs} epochs of shard batches ({stream_rows}-row takes) {rows / t_loop:>12,.0f} rows/s  "
                  f"ratio {rows / t_loop / mem:.2f}x the in-memory reference; with the read {rows / (t_loop + t_read) / mem:.2f}x "
                  "(target >= 0.5)", flush=True)
    finally:
        shutil.rmtree(d)


if __name__ == "__main__":
    main()
