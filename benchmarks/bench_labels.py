"""(b) Pseudo-label streaming into torch: the project's Ray Data path vs pyarrow directly.

Writes a labels table of --rows rows (same schema as the labels stage) as the labels stage's
blocks write it (parts of 100,000 rows, `packfiles.part_path`), then streams all of it into torch tensors, batch by batch, both ways, with the
same Arrow → torch conversion (`packfiles.batch_to_torch`).

    python benchmarks/bench_labels.py [--rows 500000] [--batch 65536] [--reps 3]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import common  # noqa: F401
import numpy as np
import pyarrow.parquet as pq
import torch

from w2s_ray.artifacts import ROW_GROUP
from w2s_ray.labels import iter_label_batches
from w2s_ray.packfiles import batch_to_torch, part_path
from w2s_ray.packfiles import labels_table
from w2s_ray.storage import RunDir


def pyarrow_read(parts: Path, batch: int) -> int:
    """The same conversion to torch as the project's path, reading with pyarrow in-process."""
    n = 0
    for f in sorted(parts.glob("*.parquet")):
        for rb in pq.ParquetFile(f).iter_batches(batch_size=batch):
            n += len(batch_to_torch(rb)["id"])
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=500_000)
    ap.add_argument("--batch", type=int, default=65536)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
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

        ray_read()  # warm-up
        t_ray, ts_ray, m = common.timed(ray_read, a.reps)
        assert m == n
        t_pa, ts_pa, m = common.timed(lambda: pyarrow_read(d / "parts", a.batch), a.reps)
        assert m == n
        print(f"Ray Data read_parquet -> torch batches  {n / t_ray:>12,.0f} rows/s  median of {common.fmt_times(ts_ray)}")
        print(f"pyarrow iter_batches  -> torch batches  {n / t_pa:>12,.0f} rows/s  median of {common.fmt_times(ts_pa)}")
        print(f"ratio Ray Data / pyarrow = {t_pa / t_ray:.2f}x   (target >= 0.8)")
    finally:
        shutil.rmtree(d)


if __name__ == "__main__":
    main()
