"""A teacher pack's files: where they live, how the worker that trained the pack writes them,
and how any process reads them back, whole or by a range of rows (the labels stage's own tables,
built from them, are in `labelfiles`).

Plain pyarrow and torch, no Ray (a test enforces it): the pack workers write with it, the label-block tasks and the
driver read with it. Per pack and split (transfer, test) there are three files:

- `sums/<split>/pack-NNNNN.parquet`: per row, float64 Σp[C], Σlog p[C], Σp·log p over the pack's
  teachers (the posterior's sufficient statistics), with `k` and `teacher_ids` in the schema
  metadata; the posterior over whole packs is a sum of these;
- `preds/<split>/pack-NNNNN.parquet`: the teachers' log-probs in long format (teacher_id, row,
  logp[C]), as `teachers.keep_predictions` says;
- `packs/pack-NNNNN.parquet`: the metadata row per teacher, written after those;
- `seals/pack-NNNNN.json`: the sizes and sha256 of the pack's five files, written last by the
  worker that wrote them. A resumed stage keeps a pack only when its files match its seal.

Every file is written with row groups of `ROW_GROUP` rows, so a reader of rows [r0, r1) reads
only the groups that hold them (`artifacts.read_rows`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from w2s_ray.artifacts import ROW_GROUP, dictionary_columns, matrix, read_rows
from w2s_ray.config import ALWAYS_KEPT
from w2s_ray.errors import W2SError
from w2s_ray.posterior import PosteriorAccumulator
from w2s_ray.results import TeacherStage
from w2s_ray.storage import RunDir

PRED_SPLITS = ("transfer", "test")

Rows = tuple[int, int] | None  # [r0, r1), or None for every row


# --- writing: by the worker that trained the pack ------------------------------------------


def pack_path(stage: Path, split: str, pack_index: int) -> Path:
    return stage / "preds" / split / f"pack-{pack_index:05d}.parquet"


def sums_path(stage: Path, split: str, pack_index: int) -> Path:
    return stage / "sums" / split / f"pack-{pack_index:05d}.parquet"


def meta_path(stage: Path, pack_index: int) -> Path:
    return stage / "packs" / f"pack-{pack_index:05d}.parquet"


def pack_files(stage: Path, pack_index: int) -> list[Path]:
    """Every file of one pack: the metadata row, and per split its sums and predictions."""
    return [meta_path(stage, pack_index), *(f(stage, split, pack_index) for split in PRED_SPLITS for f in (pack_path, sums_path))]


def pack_unit(pack_index: int) -> str:
    """The pack's name among the stage's seals (`artifacts.check_seal`)."""
    return f"pack-{pack_index:05d}"


def kept_teachers(split: str, ids: np.ndarray, keep: str) -> np.ndarray:
    """Which of a pack's teachers have their predictions on `split` written (a boolean mask)."""
    if keep == "none" and split == "transfer":
        return ids < ALWAYS_KEPT
    return np.ones(len(ids), dtype=bool)


def preds_table(teacher_id: np.ndarray, row: np.ndarray, logp: np.ndarray, c: int) -> pa.Table:
    """A prediction file's rows: `teacher_id`, `row` and `logp` (`[rows·C]` values, C per row),
    every column declared without nulls (none can occur). A nullable list column makes the
    Parquet writer encode a definition level per value besides the repetition level: one pack's
    file (128 teachers × 4,096 rows) wrote in 86 ms without, 105 ms with (medians of 15, 2026-12-07)."""
    values = pa.list_(pa.field("element", pa.from_numpy_dtype(logp.dtype), nullable=False), c)
    schema = pa.schema([pa.field("teacher_id", pa.int32(), nullable=False), pa.field("row", pa.int32(), nullable=False),
                        pa.field("logp", values, nullable=False)])
    return pa.Table.from_arrays([pa.array(teacher_id, pa.int32()), pa.array(row, pa.int32()),
                                 pa.FixedSizeListArray.from_arrays(pa.array(logp), type=values)], schema=schema)


def write_pack(run: RunDir, stage: Path, result: dict[str, Any], keep: str = "all",
               blocks: dict[str, Iterable[np.ndarray]] | None = None, y_test: np.ndarray | None = None) -> dict[str, Any]:
    """Write one trained pack's files where it was trained and return its metadata only.

    Per split: the posterior's sufficient statistics over the pack (float64 Σp, Σlog p, Σp·log p
    per row: `sums/<split>/`), and the teachers' log-probs (`preds/<split>/`, long format:
    teacher_id, row, logp[C]) as `keep` says: `all` (float32), `float16`, or `none` (the
    transfer split's predictions only for teachers with id < ALWAYS_KEPT, the candidates for the
    designated single teacher; the test split's are kept, for the bootstrap CIs and the variance
    study). The metadata row is written last: the pack's marker of completion.

    The log-probs come per split as `blocks` of consecutive rows (`[k, rows, C]` each, written
    as they come: memory is one block's, not `[k, N, C]`), or whole in `result["logp_<split>"]`.
    With `y_test`, the teachers' test accuracies are counted from the test blocks."""
    ids = np.asarray(result["teacher_ids"], dtype=np.int32)
    result = dict(result)
    correct = np.zeros(len(ids))
    for split in PRED_SPLITS:
        mask = kept_teachers(split, ids, keep)
        r0 = 0
        with run.atomic(sums_path(stage, split, result["pack"])) as sums_tmp, run.atomic(pack_path(stage, split, result["pack"])) as preds_tmp:
            sums_w = preds_w = None
            for logp in (blocks[split] if blocks is not None else [result[f"logp_{split}"]]):
                logp = np.asarray(logp, dtype=np.float32)  # [k, rows, C]
                k, n, c = logp.shape
                acc = PosteriorAccumulator(n, c)
                acc.add(torch.from_numpy(logp))
                sums = {name: t.numpy() for name, t in acc.sums().items()}
                table = pa.table(
                    {
                        "sum_p": pa.FixedSizeListArray.from_arrays(pa.array(sums["sum_p"].reshape(-1)), c),
                        "sum_logp": pa.FixedSizeListArray.from_arrays(pa.array(sums["sum_logp"].reshape(-1)), c),
                        "sum_neg_entropy": sums["sum_neg_entropy"],
                    },
                    metadata={"k": str(k), "teacher_ids": json.dumps(ids.tolist())},
                )
                kept = (logp if mask.all() else logp[mask]).astype(np.float16 if keep == "float16" else np.float32, copy=False)
                preds = preds_table(np.repeat(ids[mask], n), np.tile(np.arange(r0, r0 + n, dtype=np.int32), int(mask.sum())), kept.reshape(-1), c)
                sums_w = sums_w or pq.ParquetWriter(sums_tmp, table.schema, use_dictionary=dictionary_columns(table.schema))
                # statistics only for the columns readers filter on (`read_pack_logp`): the log-probs'
                # min/max per page cost 13% of the file's write (a pack of 128 teachers on 6,000 rows,
                # 158 ms against 182 ms, medians of 9) and no reader uses them; values handed to the
                # pages 65,536 at a time, not 1,024 (128 teachers × 4,096 rows: 92 against 105 ms,
                # 86 ms with `preds_table`'s columns without nulls, medians of 15)
                preds_w = preds_w or pq.ParquetWriter(preds_tmp, preds.schema, use_dictionary=dictionary_columns(preds.schema),
                                                      write_statistics=["teacher_id", "row"], write_batch_size=ROW_GROUP)
                sums_w.write_table(table, ROW_GROUP)
                preds_w.write_table(preds, ROW_GROUP)
                if split == "test" and y_test is not None:
                    correct += (logp.argmax(-1) == y_test[None, r0 : r0 + n]).sum(1)
                r0 += n
            sums_w.close()
            preds_w.close()
        if split == "test" and y_test is not None:
            result["acc_test"] = (correct / r0).tolist()
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
    run.seal(stage, pack_unit(result["pack"]), pack_files(stage, result["pack"]))
    return {key: value for key, value in result.items() if not key.startswith("logp_")}


# --- reading, whole or by rows ---------------------------------------------------------------


def pack_ids(teachers: TeacherStage) -> dict[int, np.ndarray]:
    """Teacher ids of every pack of the stage directory (it may hold more than the first k)."""
    t = pq.read_table(teachers.dir / "teachers.parquet", columns=["teacher_id", "pack"])
    ids, packs = t["teacher_id"].to_numpy(), t["pack"].to_numpy()
    return {int(p): np.sort(ids[packs == p]) for p in np.unique(packs)}


def read_pack_logp(stage: Path, split: str, pack_index: int, k: int | None = None, rows: Rows = None, first: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(teacher ids, `[k, N, C]` log-probs) of one pack, only teachers below `k` (and from
    `first` on) when given, only rows [r0, r1) when `rows` is given."""
    filters = [("teacher_id", "<", k)] if k is not None else []
    if first is not None:
        filters.append(("teacher_id", ">=", first))
    if rows is not None:
        filters += [("row", ">=", rows[0]), ("row", "<", rows[1])]
    t = pq.read_table(pack_path(stage, split, pack_index), filters=filters or None)
    c = t.schema.field("logp").type.list_size
    if t.num_rows == 0:
        return np.zeros(0, dtype=np.int32), np.zeros((0, 0, c), dtype=np.float32)
    ids = t["teacher_id"].to_numpy()
    if (np.diff(ids) < 0).any():  # written block by block of rows: teacher-major order again
        order = np.lexsort((t["row"].to_numpy(), ids))
        t, ids = t.take(order), ids[order]
    logp = t["logp"].combine_chunks().flatten().to_numpy().astype(np.float32, copy=False).reshape(-1, c)
    teacher_ids = np.unique(ids)
    return teacher_ids, logp.reshape(len(teacher_ids), -1, c)


def read_pack_sums(stage: Path, split: str, pack: int, rows: Rows = None) -> PosteriorAccumulator:
    path = sums_path(stage, split, pack)
    t = read_rows(path, rows)
    return PosteriorAccumulator.from_sums(
        int(pq.read_schema(path).metadata[b"k"]),
        torch.from_numpy(matrix(t["sum_p"]).copy()),  # copies: Arrow buffers are read-only
        torch.from_numpy(matrix(t["sum_logp"]).copy()),
        torch.from_numpy(t["sum_neg_entropy"].to_numpy().copy()),
    )


def split_posterior(teachers: TeacherStage, split: str, n: int, n_classes: int, rows: Rows = None, run: RunDir | None = None,
                    packs: dict[int, np.ndarray] | None = None) -> PosteriorAccumulator:
    """The posterior sums over the first k teachers on rows [r0, r1) of `split` (all `n` rows by
    default): each pack's stored sums when the pack lies wholly below k, its predictions
    otherwise (a stage trained with a larger K and used with a smaller one). Memory: a few
    `[rows, C]` float64 arrays, whatever K is. With `run`, files a worker on another node does
    not have are fetched from the run's store first. `packs`: the stage's `pack_ids`, when the
    caller has read them already."""
    r0, r1 = rows or (0, n)
    acc, seen = PosteriorAccumulator(r1 - r0, n_classes), set()
    if packs is None and run is not None:
        run.need(teachers.dir / "teachers.parquet", "the teachers stage's table")
    for p, ids in (packs if packs is not None else pack_ids(teachers)).items():
        inside = ids[ids < teachers.k]
        twice = seen.intersection(inside.tolist())
        if twice:
            raise W2SError(f"teachers stage {teachers.dir}: teachers {sorted(twice)[:5]} appear in two packs; the posterior would count them twice")
        seen.update(inside.tolist())
        sums = sums_path(teachers.dir, split, p)
        if len(inside) == len(ids):
            if not (sums.is_file() or (run is not None and run.fetch_file(sums))):
                raise W2SError(f"teachers stage {teachers.dir}: pack {p} has no {split} sums ({sums}); rerun the teachers stage")
            acc.merge(read_pack_sums(teachers.dir, split, p, rows))
        elif len(inside):  # the pack straddles k: its first teachers from their predictions
            if run is not None:
                run.need(pack_path(teachers.dir, split, p), f"teachers: pack {p}'s {split} predictions")
            got, logp = read_pack_logp(teachers.dir, split, p, teachers.k, rows)
            if len(got) != len(inside):
                raise W2SError(f"teachers stage {teachers.dir}: pack {p} straddles teachers.k={teachers.k} and its {split} predictions "
                               f"were not kept (teachers.keep_predictions: none); use K={int(ids.max()) + 1} or more, or retrain")
            acc.add(torch.tensor(logp), got.tolist())
    return acc


def bootstrap_block(teachers: TeacherStage, y: np.ndarray, rows: tuple[int, int], groups: list[tuple[int, int, int]], n_classes: int,
                    n_boot: int, seed: int, run: RunDir | None = None) -> dict[str, torch.Tensor]:
    """Per-replicate counts of correct test predictions of both posterior means on test rows
    [r0, r1) (`y` their gold labels) over Poisson resamples of the teachers: `groups` are
    (pack, first teacher, end teacher) read one at a time, so memory is `[B, rows, C]` plus one
    group's predictions for these rows. Rows are independent, so blocks add up
    (`labels.bootstrap_ci`). With `run`, files a worker on another node lacks are fetched first."""
    r0, r1 = rows
    acc = PosteriorAccumulator(r1 - r0, n_classes, n_boot=n_boot, boot_seed=seed)
    for p, t0, t1 in groups:  # only the row groups holding these teachers' rows of the block are read
        if run is not None:
            run.need(pack_path(teachers.dir, "test", p), f"teachers: pack {p}'s test predictions")
        ids, logp = read_pack_logp(teachers.dir, "test", p, t1, (r0, r1), first=t0)
        if len(ids):
            acc.add(torch.tensor(logp), ids.tolist())
    return acc.bootstrap_correct(torch.tensor(y))[1]  # a copy: in a Ray task `y` arrives read-only


def single_teacher(teachers: TeacherStage, split: str, teacher: int, rows: Rows = None, run: RunDir | None = None,
                   packs: dict[int, np.ndarray] | None = None) -> torch.Tensor:
    """`[rows, C]` log-probs of one teacher (kept for ids below `config.ALWAYS_KEPT` in any case).
    `packs`: the stage's `pack_ids`, when the caller has read them already."""
    if packs is None and run is not None:
        run.need(teachers.dir / "teachers.parquet", "the teachers stage's table")
    pack = next(p for p, ids in (packs if packs is not None else pack_ids(teachers)).items() if teacher in ids)
    path = pack_path(teachers.dir, split, pack)
    if run is not None:
        run.need(path, f"teachers: pack {pack}'s {split} predictions")
    filters = [("teacher_id", "=", teacher)] + ([("row", ">=", rows[0]), ("row", "<", rows[1])] if rows else [])
    t = pq.read_table(path, filters=filters)
    if t.num_rows == 0:
        raise W2SError(f"teachers stage {teachers.dir}: teacher {teacher}'s {split} predictions were not kept")
    return torch.from_numpy(matrix(t["logp"]).astype(np.float32, copy=False).copy())
