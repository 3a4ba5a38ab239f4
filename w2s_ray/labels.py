"""The labels stage: the posterior over teachers, and pseudo-labels written and read through Ray Data.

`build_posterior` adds up the per-pack sums the pack workers stored (`split_posterior`: a few
`[N, C]` float64 arrays in the driver, whatever K is; no per-teacher prediction is read unless a
pack straddles K), reads the designated single teacher's rows, and counts the bootstrap
replicates' correct predictions block by block of test rows (`bootstrap_ci`). `posterior_summary`
condenses it into the typed `posterior.json`. `write_labels` writes the transfer split with its targets through
`ray.data ... write_parquet` into a fresh directory that replaces the old one (never appends),
plus the test-split posterior the report needs and a manifest. `read_labels` reads them back
with `ray.data.read_parquet` and batches them into torch tensors.

The labels table holds no gold label: the student stage cannot see one by accident.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray.data
import torch

from w2s_ray import artifacts
from w2s_ray.errors import W2SError
from w2s_ray.config import ExperimentConfig
from w2s_ray.metrics import accuracy
from w2s_ray.posterior import PosteriorAccumulator, percentile_ci
from w2s_ray.raytools import alive_nodes
from w2s_ray.run import DataStage, LabelStage, PosteriorSummary, RunContext, TeacherStage
from w2s_ray.storage import RunDir
from w2s_ray.teachers import pack_ids, read_pack_logp
from w2s_ray.workers import pack_path, sums_path

STAT_COLUMNS = ("variance", "pred_entropy", "mutual_info")


def configure_ray_data() -> None:
    """Ray 2.60's V2 Parquet reader starts many footer-reader actors: 25 s for 3,000 rows on 2 cores.

    The V1 reader does the same read in 0.2 s. w2s-ray uses V1 unless RAY_DATA_USE_DATASOURCE_V2
    says otherwise; the context flag decides even when `ray.data` was imported before this ran.
    Called before every Ray Data use in this module.
    """
    os.environ.setdefault("RAY_DATA_USE_DATASOURCE_V2", "0")
    ctx = ray.data.DataContext.get_current()
    ctx.use_datasource_v2 = os.environ["RAY_DATA_USE_DATASOURCE_V2"] not in ("0", "false", "False")
    ctx.enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # its one line says the progress bars we just turned off are off: not a warning for users
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def _fixed_list(a: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(a, np.float32).reshape(-1)), a.shape[1])


def _list_to_numpy(col: Any) -> np.ndarray:
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    return col.flatten().to_numpy().reshape(len(col), col.type.list_size)


BOOT_BLOCK_BYTES = 256 * 2**20
"""Memory bound of the bootstrap's `[B, rows, C]` float32 sums (two of them) per row block."""


def read_pack_sums(stage: Path, split: str, pack: int) -> PosteriorAccumulator:
    t = pq.read_table(sums_path(stage, split, pack))
    return PosteriorAccumulator.from_sums(
        int(t.schema.metadata[b"k"]),
        torch.from_numpy(_list_to_numpy(t["sum_p"]).copy()),  # copies: Arrow buffers are read-only
        torch.from_numpy(_list_to_numpy(t["sum_logp"]).copy()),
        torch.from_numpy(t["sum_neg_entropy"].to_numpy().copy()),
    )


def split_posterior(teachers: TeacherStage, split: str, n: int, n_classes: int) -> PosteriorAccumulator:
    """The posterior sums over the first k teachers: each pack's stored sums when the pack lies
    wholly below k, its predictions otherwise (a stage trained with a larger K and used with a
    smaller one). Memory: a few `[N, C]` float64 arrays, whatever K is."""
    acc, seen = PosteriorAccumulator(n, n_classes), set()
    for p, ids in pack_ids(teachers).items():
        inside = ids[ids < teachers.k]
        twice = seen.intersection(inside.tolist())
        if twice:
            raise W2SError(f"teachers stage {teachers.dir}: teachers {sorted(twice)[:5]} appear in two packs; the posterior would count them twice")
        seen.update(inside.tolist())
        if len(inside) == len(ids) and sums_path(teachers.dir, split, p).is_file():
            acc.merge(read_pack_sums(teachers.dir, split, p))
        elif len(inside):  # straddles k, or a stage written before packs stored their sums
            got, logp = read_pack_logp(teachers.dir, split, p, teachers.k)
            if len(got) != len(inside):
                raise W2SError(f"teachers stage {teachers.dir}: pack {p} straddles teachers.k={teachers.k} and its {split} predictions "
                               f"were not kept (teachers.keep_predictions: none); use K={int(ids.max()) + 1} or more, or retrain")
            acc.add(torch.tensor(logp), got.tolist())
    return acc


def single_teacher(teachers: TeacherStage, split: str, teacher: int) -> torch.Tensor:
    """`[N, C]` log-probs of one teacher (kept for ids below `config.ALWAYS_KEPT` in any case)."""
    pack = next(p for p, ids in pack_ids(teachers).items() if teacher in ids)
    t = pq.read_table(pack_path(teachers.dir, split, pack), filters=[("teacher_id", "=", teacher)])
    if t.num_rows == 0:
        raise W2SError(f"teachers stage {teachers.dir}: teacher {teacher}'s {split} predictions were not kept")
    return torch.from_numpy(_list_to_numpy(t["logp"]).astype(np.float32, copy=False).copy())


def bootstrap_ci(teachers: TeacherStage, y: np.ndarray, n_classes: int, n_boot: int, seed: int, ci: float) -> dict[str, list[float]]:
    """Percentile CIs of both posterior means' test accuracy over Poisson resamples of the
    teachers, counted block by block of test rows: memory `[B, block, C]`, never `[B, N, C]`."""
    if not n_boot:
        return {}
    block = max(1, BOOT_BLOCK_BYTES // (2 * 4 * n_boot * n_classes))
    packs = [p for p, ids in pack_ids(teachers).items() if ids.min() < teachers.k]
    total: dict[str, torch.Tensor] = {}
    for r0 in range(0, len(y), block):
        r1 = min(len(y), r0 + block)
        acc = PosteriorAccumulator(r1 - r0, n_classes, n_boot=n_boot, boot_seed=seed)
        for p in packs:  # TODO(scale): a row-block read, not the whole pack file per block
            ids, logp = read_pack_logp(teachers.dir, "test", p, teachers.k)
            acc.add(torch.tensor(logp[:, r0:r1]), ids.tolist())
        _, correct = acc.bootstrap_correct(torch.from_numpy(y[r0:r1]))
        total = {name: total.get(name, 0) + c for name, c in correct.items()}
    return percentile_ci({name: c.float() / len(y) for name, c in total.items()}, ci)


def build_posterior(cfg: ExperimentConfig, data: DataStage, teachers: TeacherStage) -> dict[str, Any]:
    """Per-split posterior statistics, the designated single teacher's predictions, and CIs,
    from the packs' stored sums: the driver never holds a `[k, N, C]` array."""
    pcfg = cfg.posterior
    out: dict[str, Any] = {}
    for split in ("transfer", "test"):
        acc = split_posterior(teachers, split, len(data.splits[split].y), data.n_classes)
        out[split] = acc.finalize()
        out[split]["single_log"] = single_teacher(teachers, split, pcfg.single_teacher)
        out["k"] = acc.k
    out["ci"] = bootstrap_ci(teachers, data.splits["test"].y, data.n_classes, pcfg.n_boot, cfg.teachers.seed, pcfg.ci)
    return out


def posterior_summary(post: dict[str, Any], y_test: np.ndarray) -> PosteriorSummary:
    y = torch.from_numpy(y_test)
    te, tr = post["test"], post["transfer"]
    return PosteriorSummary(
        k=post["k"],
        test_acc_dual=accuracy(te["dual_log"], y),
        test_acc_arith=accuracy(te["arith"], y),
        test_acc_single=accuracy(te["single_log"], y),
        ci_dual=post["ci"].get("dual"),
        ci_arith=post["ci"].get("arith"),
        variance_test=float(te["variance"].mean()),
        variance_transfer=float(tr["variance"].mean()),
        mutual_info_test=float(te["mutual_info"].mean()),
        pred_entropy_test=float(te["pred_entropy"].mean()),
        expected_entropy_test=float(te["expected_entropy"].mean()),
    )


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


def write_labels(run: RunDir, stage: Path, table: pa.Table, test: pa.Table, summary: PosteriorSummary, key: str, rows_per_file: int) -> dict:
    """Write through Ray Data into a temporary directory, then swap it in whole. For a run in a
    store, Ray Data writes straight into the store (its write tasks may run on any node) and
    the parts are then fetched into the local copy for the manifest."""
    configure_ray_data()
    n_blocks = max(1, math.ceil(table.num_rows / rows_per_file))
    ds = ray.data.from_arrow(table).repartition(n_blocks)
    write = {"min_rows_per_file": min(rows_per_file, table.num_rows)}
    parts_tmp = stage / ".parts.tmp"
    if parts_tmp.exists():
        shutil.rmtree(parts_tmp)
    remote = run.remote(stage / "parts")
    if remote is None:
        ds.write_parquet(str(parts_tmp), **write)
    else:
        fs, path = remote
        fs.delete_dir_contents(path, missing_dir_ok=True)  # the manifest, written last, marks the parts complete
        ds.write_parquet(path, filesystem=fs, **write)
        run.fetch(stage / "parts", into=parts_tmp)
    artifacts.replace_dir(parts_tmp, stage / "parts")
    run.write_parquet(stage / "test_posterior.parquet", test)
    run.write_json(stage / "posterior.json", summary.to_json())
    schema = {f.name: str(f.type) for f in table.schema}
    return run.write_manifest(stage, key, rows=table.num_rows, k=summary.k, schema=schema)


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


def iter_label_batches(run: RunDir, stage: Path, batch_size: int = 65536):
    """Stream the pseudo-labels through `ray.data.read_parquet` as dicts of tensors."""
    configure_ray_data()
    remote = run.remote(stage / "parts")  # in a store, read tasks on any node can reach the parts
    ds = ray.data.read_parquet(remote[1], filesystem=remote[0]) if remote else ray.data.read_parquet(str(stage / "parts"))
    for batch in ds.iter_batches(batch_size=batch_size, batch_format="pyarrow", prefetch_batches=4):
        yield batch_to_torch(batch)


def read_labels(run: RunDir, stage: Path, batch_size: int = 65536) -> dict[str, torch.Tensor]:
    """All pseudo-label rows as tensors (streamed through Ray Data), ordered by id."""
    chunks: dict[str, list[torch.Tensor]] = {}
    for batch in iter_label_batches(run, stage, batch_size):
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


# --- the stage -----------------------------------------------------------------------------


def warn_if_unshared(ctx: RunContext) -> None:
    """Ray Data writes and reads the pseudo-labels on any node: a local run directory must be
    one every node mounts at the same path. We cannot see whether it is; say what is needed."""
    nodes = alive_nodes()
    if nodes > 1 and ctx.run.store is None:
        ctx.log(f"warning: the cluster has {nodes} nodes and output.root={ctx.cfg.output.root!r} is a local path; "
                "it must be a filesystem every node mounts at the same path (NFS), or use a URI such as s3://bucket/prefix")


def stage_labels(ctx: RunContext, data: DataStage, teachers: TeacherStage) -> LabelStage:
    """The posterior over the K teachers and the pseudo-label table (no gold label in it)."""
    d = ctx.run.open_stage("labels", ctx.keys.labels)
    if artifacts.read_manifest(d) is None:
        ctx.ray()
        warn_if_unshared(ctx)
        ctx.log(f"labels: posterior over teachers, pseudo-labels via Ray Data → {d}")
        with ctx.run.lock(d, "labels stage"):
            ctx.run.reset(d)
            post = build_posterior(ctx.cfg, data, teachers)
            summary = posterior_summary(post, data.splits["test"].y)
            tr, te = data.splits["transfer"], data.splits["test"]
            write_labels(ctx.run, d, labels_table(tr.ids, tr.x, post["transfer"]), test_table(te.ids, post["test"]), summary, ctx.keys.labels, ctx.cfg.labels.rows_per_file)
    else:
        ctx.log(f"labels: cached {d}")
    return LabelStage(d, PosteriorSummary.read(d / "posterior.json"))
