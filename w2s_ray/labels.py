"""Pseudo-labels: the posterior over teachers, written and read back through Ray Data.

`build_posterior` streams the teacher stage's pack files through `PosteriorAccumulator`s (memory
does not grow with K). `write_labels` writes the transfer split with its targets through
`ray.data ... write_parquet` into a fresh directory that replaces the old one (never appends),
plus the test-split posterior the report needs and a manifest. `read_labels` reads them back
with `ray.data.read_parquet` and batches them into torch tensors.

The labels table holds no gold label: the student stage cannot see one by accident.
"""

from __future__ import annotations

import math
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from w2s_ray import artifacts, storage
from w2s_ray.config import ExperimentConfig
from w2s_ray.posterior import PosteriorAccumulator
from w2s_ray.teachers import read_pack_logp

STAT_COLUMNS = ("variance", "pred_entropy", "mutual_info")


def _fixed_list(a: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(a, np.float32).reshape(-1)), a.shape[1])


def _list_to_numpy(col: Any) -> np.ndarray:
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    return col.flatten().to_numpy().reshape(len(col), col.type.list_size)


def build_posterior(cfg: ExperimentConfig, teacher_stage: Path, packs: list[int], sizes: dict[str, int], n_classes: int, y_test: np.ndarray) -> dict[str, Any]:
    """Per-split posterior statistics, the designated single teacher's predictions, and CIs."""
    pc = cfg.posterior
    acc = {
        "transfer": PosteriorAccumulator(sizes["transfer"], n_classes),
        "test": PosteriorAccumulator(sizes["test"], n_classes, n_boot=pc.n_boot, boot_seed=cfg.teachers.seed),
    }
    single: dict[str, np.ndarray] = {}
    for p in packs:
        for split, a in acc.items():
            ids, logp = read_pack_logp(teacher_stage, split, p, cfg.teachers.k)
            if len(ids) == 0:
                continue
            a.add(torch.tensor(logp), ids.tolist())
            hit = np.nonzero(ids == pc.single_teacher)[0]
            if len(hit):
                single[split] = logp[hit[0]]
    out = {split: a.finalize() for split, a in acc.items()}
    for split in acc:
        out[split]["single_log"] = torch.tensor(single[split])
    out["ci"] = acc["test"].bootstrap_accuracy(torch.from_numpy(y_test), pc.ci)
    out["k"] = acc["test"].k
    return out


def labels_table(ids: np.ndarray, x: np.ndarray, post: dict[str, torch.Tensor]) -> pa.Table:
    cols: dict[str, Any] = {"id": ids, "x": _fixed_list(x)}
    cols["t_dual"] = _fixed_list(post["dual_log"].exp().numpy())
    cols["logt_dual"] = _fixed_list(post["dual_log"].numpy())
    cols["t_arith"] = _fixed_list(post["arith"].numpy())
    cols["t_single"] = _fixed_list(post["single_log"].exp().numpy())
    cols["logt_single"] = _fixed_list(post["single_log"].numpy())
    for s in STAT_COLUMNS:
        cols[s] = post[s].numpy()
    return pa.table(cols)


def test_table(ids: np.ndarray, post: dict[str, torch.Tensor]) -> pa.Table:
    return pa.table(
        {
            "id": ids,
            "logt_dual": _fixed_list(post["dual_log"].numpy()),
            "t_arith": _fixed_list(post["arith"].numpy()),
            "logt_single": _fixed_list(post["single_log"].numpy()),
            **{s: post[s].numpy() for s in STAT_COLUMNS},
        }
    )


def write_labels(stage: Path, table: pa.Table, test: pa.Table, summary: dict, key: str, rows_per_file: int) -> dict:
    """Write through Ray Data into a temporary directory, then swap it in whole. For a run in a
    store, Ray Data writes straight into the store (its write tasks may run on any node) and
    the parts are then fetched into the local copy for the manifest."""
    import ray.data

    n_blocks = max(1, math.ceil(table.num_rows / rows_per_file))
    ds = ray.data.from_arrow(table).repartition(n_blocks)
    write = {"min_rows_per_file": min(rows_per_file, table.num_rows)}
    parts_tmp = stage / ".parts.tmp"
    if parts_tmp.exists():
        shutil.rmtree(parts_tmp)
    store = storage.remote(stage / "parts")
    if store is None:
        ds.write_parquet(str(parts_tmp), **write)
    else:
        fs, path = store
        fs.delete_dir_contents(path, missing_dir_ok=True)  # the manifest, written last, marks the parts complete
        ds.write_parquet(path, filesystem=fs, **write)
        storage.pull_into(stage / "parts", parts_tmp)
    artifacts.replace_dir(parts_tmp, stage / "parts")
    artifacts.write_parquet(stage / "test_posterior.parquet", test)
    artifacts.write_json(stage / "posterior.json", summary)
    schema = {f.name: str(f.type) for f in table.schema}
    return artifacts.write_manifest(stage, key, rows=table.num_rows, k=summary.get("k"), schema=schema)


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
            a = _list_to_numpy(col) if pa.types.is_fixed_size_list(col.type) else col.to_numpy()
            out[name] = torch.from_numpy(a)
    return out


def iter_label_batches(stage: Path, batch_size: int = 65536):
    """Stream the pseudo-labels through `ray.data.read_parquet` as dicts of tensors."""
    import ray.data

    store = storage.remote(stage / "parts")  # in a store, read tasks on any node can reach the parts
    ds = ray.data.read_parquet(store[1], filesystem=store[0]) if store else ray.data.read_parquet(str(stage / "parts"))
    for batch in ds.iter_batches(batch_size=batch_size, batch_format="pyarrow", prefetch_batches=4):
        yield batch_to_torch(batch)


def read_labels(stage: Path, batch_size: int = 65536) -> dict[str, torch.Tensor]:
    """All pseudo-label rows as tensors (streamed through Ray Data), ordered by id."""
    chunks: dict[str, list[torch.Tensor]] = {}
    for batch in iter_label_batches(stage, batch_size):
        for name, t in batch.items():
            chunks.setdefault(name, []).append(t)
    out = {name: torch.cat(ts) for name, ts in chunks.items()}
    ids = out["id"]
    if not bool((ids[1:] > ids[:-1]).all()):
        order = torch.argsort(ids)
        out = {name: t[order] for name, t in out.items()}
    return out


def read_test_posterior(stage: Path) -> dict[str, torch.Tensor]:
    t = pq.read_table(stage / "test_posterior.parquet")
    return {
        "dual_log": torch.from_numpy(_list_to_numpy(t["logt_dual"])),
        "arith_log": torch.from_numpy(_list_to_numpy(t["t_arith"])).clamp_min(1e-30).log(),
        "single_log": torch.from_numpy(_list_to_numpy(t["logt_single"])),
        **{s: torch.from_numpy(t[s].to_numpy()) for s in STAT_COLUMNS},
    }


def target_of(labels: dict[str, torch.Tensor], target: str, log_floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities, log-probabilities) of the student's chosen target."""
    if target == "dual_mean":
        return labels["t_dual"], labels["logt_dual"]
    if target == "single":
        return labels["t_single"], labels["logt_single"]
    if target == "arith_mean":
        t = labels["t_arith"]
        return t, t.clamp_min(math.exp(log_floor)).log()
    if target == "hard":
        hard = torch.nn.functional.one_hot(labels["t_dual"].argmax(-1), labels["t_dual"].shape[1]).float()
        return hard, hard.clamp_min(math.exp(log_floor)).log()
    raise ValueError(f"unknown target {target!r}")
