"""The embed stage's files, and the encoder actor's work on them. Plain pyarrow and torch, no Ray.

One directory per encoder, `embed/<key>/` (`config.StageKeys.embed`):

- `input.parquet`: `row` (the row in the user's file) and `text`, for every row that has a
  text, in row groups of `embed.rows_per_part` rows. The driver writes it once, after it has
  read and checked the column; row group `i` is part `i`'s input.
- `parts/part-<i>.parquet`: `row` and `emb` (a fixed-size list of float32, the encoder's
  vector) for the rows of row group `i`, written and sealed (`artifacts.check_seal`) by the
  encoder actor that computed them. A resume keeps each part whose seal verifies.
- `manifest.json`: the encoder's width, the rows, the throughput; written last.

`gather` reads the parts back in the data stage, row by row of the kept rows.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from w2s_ray import artifacts, encoders
from w2s_ray.artifacts import fixed_list, matrix
from w2s_ray.config import EncoderConfig
from w2s_ray.storage import RunDir

INPUT = "input.parquet"


def part_path(stage: Path, i: int) -> Path:
    return Path(stage) / "parts" / f"part-{i:05d}.parquet"


def input_table(rows: np.ndarray, texts: pa.Array) -> pa.Table:
    return pa.table({"row": pa.array(rows, pa.int64()), "text": texts})


def check_part(stage: Path, i: int, rows: int, dim: int) -> str | None:
    """None when part `i` is what its actor wrote (its seal verifies) with `rows` rows of width
    `dim`; else why not. A same-size damaged part still parses: only the seal tells."""
    why = artifacts.check_seal(stage, part_path(stage, i).stem)
    if why is None:
        meta = pq.read_metadata(part_path(stage, i))  # one footer read: rows and schema
        width = meta.schema.to_arrow_schema().field("emb").type.list_size
        if meta.num_rows != rows or width != dim:
            why = f"{meta.num_rows} rows of width {width}, its input has {rows} rows and the encoder's width is {dim}"
    return why


class EncodeParts:
    """An encoder actor's work (Ray Data's pool in `embed.stage_embed`; `executor.InProcess`
    builds one here): the model is built once, on the GPU Ray gave the actor if any, then each
    call encodes the parts it is given. A part's rows are read from the input's row group, its
    vectors written and sealed into the run's store by this actor, and one summary row per part
    is returned: the driver never holds a vector."""

    def __init__(self, enc: dict, run: RunDir, stage: Path, threads: int, device: str = "cpu") -> None:
        self.threads = max(1, threads)
        torch.set_num_threads(self.threads)
        self.device = device
        self.encoder = encoders.build(EncoderConfig.model_validate(enc), device)
        self.run, self.stage = run, Path(stage)
        self.input = pq.ParquetFile(run.need(self.stage / INPUT, "embed: its input"))

    def encode_part(self, i: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        table = self.input.read_row_group(i, columns=["row", "text"])
        emb = np.asarray(self.encoder.encode(table["text"].to_pylist()), np.float32)
        path = part_path(self.stage, i)
        self.run.write_parquet(path, pa.table({"row": table["row"], "emb": fixed_list(emb)}))
        self.run.seal(self.stage, path.stem, [path])
        return {"item": i, "rows": table.num_rows, "dim": int(emb.shape[1]), "seconds": time.perf_counter() - t0}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch.set_num_threads(self.threads)  # again: an in-process "actor" shares its process's setting
        out = [self.encode_part(int(i)) for i in batch["item"]]
        return {k: np.asarray([o[k] for o in out]) for k in out[0]}


def gather(run: RunDir, stage: Path, rows: np.ndarray) -> np.ndarray:
    """The vectors of source rows `rows` (sorted), `[len(rows), dim]` float32, from the parts.
    Every kept row has a text, so every row is there; a row that is not is an error."""
    parts = sorted((Path(stage) / "parts").glob("part-*.parquet"))
    table = pa.concat_tables(pq.read_table(run.need(p, "embed: a part")) for p in parts)
    have = table["row"].to_numpy()
    at = np.searchsorted(have, rows)
    if np.any(at >= len(have)) or np.any(have[np.minimum(at, len(have) - 1)] != rows):
        missing = rows[(at >= len(have)) | (have[np.minimum(at, len(have) - 1)] != rows)]
        raise ValueError(f"{stage}: no embedding for rows {missing[:5].tolist()} ({len(missing)} in all)")
    return matrix(table["emb"])[at]
