"""The labels stage's files: the pseudo-label parts (one per label block, `parts/part-*.parquet`),
the test split's posterior, and how a student reads them (`LabelSource`, `batch_to_torch`).

Plain pyarrow and torch, no Ray (a test enforces it). A part has, per transfer row: `id`, `x`
(the student's features), the dual posterior mean (`t_dual`, `logt_dual`), the arithmetic mean
(`t_arith`), the designated single teacher (`t_single`, `logt_single`) and the per-row
statistics `STAT_COLUMNS`; matrices are fixed-size lists of float32 (`artifacts.fixed_list`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from w2s_ray import artifacts
from w2s_ray.artifacts import fixed_list, matrix
from w2s_ray.storage import RunDir


STAT_COLUMNS = ("variance", "pred_entropy", "mutual_info")


def labels_table(ids: np.ndarray, x: np.ndarray, post: dict[str, torch.Tensor]) -> pa.Table:
    cols: dict[str, Any] = {"id": ids, "x": fixed_list(x)}
    cols["t_dual"] = fixed_list(post["dual_log"].exp().numpy())
    cols["logt_dual"] = fixed_list(post["dual_log"].numpy())
    cols["t_arith"] = fixed_list(post["arith"].numpy())
    cols["t_single"] = fixed_list(post["single_log"].exp().numpy())
    cols["logt_single"] = fixed_list(post["single_log"].numpy())
    for s in STAT_COLUMNS:
        cols[s] = post[s].numpy()
    return pa.table(cols)


def test_table(ids: np.ndarray, post: dict[str, torch.Tensor]) -> pa.Table:
    return pa.table(
        {
            "id": ids,
            "logt_dual": fixed_list(post["dual_log"].numpy()),
            "t_arith": fixed_list(post["arith"].numpy()),
            "logt_single": fixed_list(post["single_log"].numpy()),
            **{s: post[s].numpy() for s in STAT_COLUMNS},
        }
    )


def batch_to_torch(batch: pa.Table | pa.RecordBatch) -> dict[str, torch.Tensor]:
    """Arrow columns → tensors without copies: fixed-size lists become `[rows, size]`.

    Ray Data's numpy format turns a fixed-size-list column into an object array of arrays,
    which costs more than the read; converting from Arrow ourselves avoids that. The tensors
    share the (read-only) Arrow buffers: copy before writing into them.
    """
    out = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for name, col in zip(batch.schema.names, batch.columns):
            if isinstance(col, pa.ChunkedArray):
                col = col.combine_chunks()
            a = matrix(col) if pa.types.is_fixed_size_list(col.type) else col.to_numpy()
            out[name] = torch.from_numpy(a)
    return out


def part_path(stage: Path, r0: int) -> Path:
    """The labels part whose first row is `r0` (one per label block)."""
    return stage / "parts" / f"part-{r0:012d}.parquet"


@dataclass(frozen=True)
class LabelSource:
    """Where a student task reads its inputs itself: the labels stage's parts and the data
    stage's transfer split (for gold labels: the ceiling, oracle selection). Small to pickle:
    the driver sends this, never the rows. Reading in the task with pyarrow delivers 1.0× of
    pyarrow's rate by construction; Ray Data's `read_parquet` measured 0.11× of it on 2 cores
    (`benchmarks/bench_labels.py`), so it is used only to split the stream across Ray Train
    workers (`student.ray_train`)."""

    run: RunDir
    labels: Path
    transfer: Path

    def parts(self) -> list[Path]:
        """The parts the labels manifest lists, fetched from the run's store where missing."""
        manifest = self.run.read_json(self.labels / artifacts.MANIFEST, "the labels stage's manifest (the stage is not complete)")
        names = sorted(f for f in manifest["files"] if f.startswith("parts/"))
        return [self.run.need(self.labels / name, "a labels part its manifest lists") for name in names]

    def read(self, columns: list[str] | None = None) -> dict[str, torch.Tensor]:
        """The pseudo-label columns of every row, as tensors, in row (id) order."""
        return batch_to_torch(pa.concat_tables([pq.read_table(p, columns=columns) for p in self.parts()]))

    def gold(self, ids: torch.Tensor) -> torch.Tensor:
        """The transfer split's gold labels, row for row with the pseudo-labels' `ids`."""
        t = self.run.read_table(self.transfer, "the data stage's transfer split", columns=["id", "y"])
        if not np.array_equal(t["id"].to_numpy(), ids.numpy()):
            raise RuntimeError(f"pseudo-labels in {self.labels} do not match the transfer split's rows in {self.transfer}")
        return torch.from_numpy(t["y"].to_numpy().astype(np.int64))
