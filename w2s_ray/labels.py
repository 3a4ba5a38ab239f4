"""The labels stage: the posterior over teachers and the pseudo-label table, built where the data is.

The transfer split's pseudo-labels are built in blocks of `labels.rows_per_file` rows, one task
(the run's executor: Ray) per block (`workers.label_block`): each reads its rows of the transfer split and of every
pack's stored posterior sums, computes the posterior and writes its part of the table
(`parts/part-<first row>.parquet`) into the run's store itself, returning only counts and summed
statistics. The driver holds no transfer row, whatever N and K are; an interrupted stage keeps
the parts it finished. The test split's posterior (`test_posterior.parquet`), the designated
single teacher's rows are built in the driver, and the bootstrap CIs are counted block by block
of test rows (`bootstrap_ci`; several blocks run as tasks that return `[B]` counts):
their memory grows with the test split, not with the transfer split or K. `posterior_summary`
condenses them into the typed `posterior.json`.
Students read the parts with pyarrow in their own workers, or, across Ray Train workers, with Ray
Data (`student.ray_train.iter_label_batches`).

The labels table holds no gold label: the student stage cannot see one by accident.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from w2s_ray import artifacts
from w2s_ray.errors import W2SError
from w2s_ray.config import ExperimentConfig
from w2s_ray.metrics import accuracy
from w2s_ray.labelfiles import part_path, STAT_COLUMNS, test_table
from w2s_ray.packfiles import bootstrap_block, pack_ids, single_teacher, split_posterior
from w2s_ray.artifacts import matrix
from w2s_ray.posterior import percentile_ci
from w2s_ray.raytools import Progress
from w2s_ray.results import DataStage, LabelStage, PosteriorSummary, TeacherStage
from w2s_ray.run import RunContext
from w2s_ray.workers import label_block

BOOT_BLOCK_BYTES = 256 * 2**20
"""Memory bound of the bootstrap's `[B, rows, C]` float32 sums (two of them) per row block."""
BOOT_TEACHERS = 32
"""Teachers read at a time by the bootstrap: its input is `[32, rows, C]`, whatever the pack size
(the default run's packs hold 32 teachers, so its sums are added in the same order as before)."""


def bootstrap_ci(teachers: TeacherStage, y: np.ndarray, n_classes: int, n_boot: int, seed: int, ci: float,
                 ctx: RunContext | None = None) -> dict[str, list[float]]:
    """Percentile CIs of both posterior means' test accuracy over Poisson resamples of the
    teachers, counted block by block of test rows (`packfiles.bootstrap_block`): memory
    `[B, block, C]`, never `[B, N, C]`. With a run context `ctx`, several blocks run as its
    tasks (one CPU each), which return `[B]` counts: the driver adds integers, so the CIs
    are those of one process. One block (the default run's test split) runs here."""
    if not n_boot:
        return {}
    block = max(1, BOOT_BLOCK_BYTES // (2 * 4 * n_boot * n_classes))
    groups = [(p, t0, min(t0 + BOOT_TEACHERS, teachers.k))
              for p, ids in pack_ids(teachers).items() for t0 in range(int(ids.min()), min(int(ids.max()) + 1, teachers.k), BOOT_TEACHERS)]
    blocks = [(r0, min(len(y), r0 + block)) for r0 in range(0, len(y), block)]
    args = (groups, n_classes, n_boot, seed)
    if ctx is not None and len(blocks) > 1:
        running = {ctx.submit(bootstrap_block, teachers, y[r0:r1], (r0, r1), *args, ctx.run): (r0, r1) for r0, r1 in blocks}
        counts = [ctx.get(ref) for _, ref in ctx.as_completed(running)]
    else:
        counts = [bootstrap_block(teachers, y[r0:r1], (r0, r1), *args) for r0, r1 in blocks]
    total = {name: sum(c[name] for c in counts) for name in counts[0]}
    return percentile_ci({name: c.float() / len(y) for name, c in total.items()}, ci)


def test_posterior(cfg: ExperimentConfig, y_test: np.ndarray, n_classes: int, teachers: TeacherStage,
                   ctx: RunContext | None = None) -> tuple[dict[str, torch.Tensor], int, dict[str, list[float]]]:
    """(the test split's posterior with the single teacher's rows, K, bootstrap CIs), from the
    packs' stored sums: the driver never holds a `[k, N, C]` array. With `ctx`, the bootstrap's
    row blocks run as its tasks."""
    acc = split_posterior(teachers, "test", len(y_test), n_classes)
    post = acc.finalize()
    post["single_log"] = single_teacher(teachers, "test", cfg.posterior.single_teacher)
    ci = bootstrap_ci(teachers, y_test, n_classes, cfg.posterior.n_boot, cfg.teachers.seed, cfg.posterior.ci, ctx)
    return post, acc.k, ci


def posterior_summary(te: dict[str, torch.Tensor], k: int, ci: dict[str, list[float]], variance_transfer: float, y_test: np.ndarray) -> PosteriorSummary:
    y = torch.from_numpy(y_test)
    return PosteriorSummary(
        k=k,
        test_acc_dual=accuracy(te["dual_log"], y),
        test_acc_arith=accuracy(te["arith"], y),
        test_acc_single=accuracy(te["single_log"], y),
        ci_dual=ci.get("dual"),
        ci_arith=ci.get("arith"),
        variance_test=float(te["variance"].mean()),
        variance_transfer=variance_transfer,
        mutual_info_test=float(te["mutual_info"].mean()),
        pred_entropy_test=float(te["pred_entropy"].mean()),
        expected_entropy_test=float(te["expected_entropy"].mean()),
    )


def label_parts(ctx: RunContext, data: DataStage, teachers: TeacherStage, stage: Path) -> dict[str, float]:
    """The pseudo-label table as parts written by `workers.label_block` tasks, one per block of
    rows; parts a previous, interrupted attempt finished are kept. Returns the rows, K and the
    summed per-row statistics over all blocks."""
    n, per = data.sizes["transfer"], ctx.cfg.labels.rows_per_file
    blocks = {part_path(stage, r0): (r0, min(n, r0 + per)) for r0 in range(0, n, per)}
    for old in (stage / "parts").glob("*"):  # another block size, or an older layout
        if old not in blocks:
            ctx.run.remove(old)
            ctx.run.remove(stage / artifacts.seal_name(old.stem))
    totals: dict[str, float] = {}

    def add(out: dict[str, float]) -> None:
        if totals and out["k"] != totals["k"]:
            raise W2SError(f"labels stage {stage}: blocks saw {out['k']} and {totals['k']} teachers")
        for name, value in out.items():
            totals[name] = value if name == "k" else totals.get(name, 0) + value

    todo = {}
    for path, rows in blocks.items():
        if not path.exists():
            todo[path] = rows
            continue
        # kept only if it is what its task wrote: a same-size damaged part still parses
        why = artifacts.check_seal(stage, path.stem)
        t = pq.read_table(path, columns=list(STAT_COLUMNS)) if why is None else None
        if why is None and t.num_rows != rows[1] - rows[0]:
            why = f"{t.num_rows} rows, the block has {rows[1] - rows[0]}"
        if why is not None:
            ctx.log(f"labels: part {path.name} is damaged ({why}); it is built again")
            ctx.run.remove(path)
            todo[path] = rows
            continue
        add({"rows": t.num_rows, "k": teachers.k, **{f"sum_{s}": float(t[s].to_numpy().astype(np.float64).sum()) for s in STAT_COLUMNS}})
    if todo:
        single, c = ctx.cfg.posterior.single_teacher, data.n_classes
        running = {ctx.submit(label_block, ctx.run, data.dir, teachers, single, c, rows, path): path for path, rows in todo.items()}
        with Progress("labels", len(blocks), len(blocks) - len(todo), unit="block") as bar:
            for path, ref in ctx.as_completed(running):
                add(ctx.get(ref))
                ctx.run.need(path, "labels: a part written on another node")
                bar.update(1)
    return totals


def read_test_posterior(stage: Path) -> dict[str, torch.Tensor]:
    t = pq.read_table(stage / "test_posterior.parquet")
    # copies (the test split is small): Arrow's buffers are read-only, and torch warns on them
    return {
        "dual_log": torch.from_numpy(matrix(t["logt_dual"]).copy()),
        "arith_log": torch.from_numpy(matrix(t["t_arith"]).copy()).clamp_min(1e-30).log(),
        "single_log": torch.from_numpy(matrix(t["logt_single"]).copy()),
        **{s: torch.from_numpy(t[s].to_numpy().copy()) for s in STAT_COLUMNS},
    }


# --- the stage -----------------------------------------------------------------------------


def stage_labels(ctx: RunContext, data: DataStage, teachers: TeacherStage) -> LabelStage:
    """The posterior over the K teachers and the pseudo-label table (no gold label in it)."""
    d = ctx.run.open_stage("labels", ctx.keys.labels)
    with ctx.run.claim(d, "labels stage", lambda: artifacts.read_manifest(d)) as manifest:
        if manifest is None:
            ctx.ray()
            ctx.warn_if_unshared("Ray Data writes and reads the pseudo-labels on any node")
            ctx.log(f"labels: posterior over teachers, pseudo-labels in blocks of {ctx.cfg.labels.rows_per_file} rows → {d}")
            ctx.run.remove(d / artifacts.MANIFEST)
            totals = label_parts(ctx, data, teachers, d)
            y_test = data.splits["test"].y
            te, k, ci = test_posterior(ctx.cfg, y_test, data.n_classes, teachers, ctx)
            if k != totals["k"]:
                raise W2SError(f"labels stage {d}: the transfer split saw {totals['k']} teachers, the test split {k}")
            summary = posterior_summary(te, k, ci, totals["sum_variance"] / totals["rows"], y_test)
            ctx.run.write_parquet(d / "test_posterior.parquet", test_table(data.splits["test"].ids, te))
            ctx.run.write_json(d / "posterior.json", summary.to_json())
            schema = {f.name: str(f.type) for f in pq.read_schema(next(iter(sorted((d / "parts").glob("part-*.parquet")))))}
            ctx.run.write_manifest(d, ctx.keys.labels, rows=int(totals["rows"]), k=k, schema=schema)
        else:
            ctx.log(f"labels: cached {d}")
    return LabelStage(d, PosteriorSummary.read(d / "posterior.json"))
