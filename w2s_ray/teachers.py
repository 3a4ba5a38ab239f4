"""The teacher stage on Ray: actors train packs of teachers and write them where they run.

The driver starts a few `PackTrainer` actors (each reads the weak, transfer and test splits from
the data stage's files once), hands each a pack of teacher ids at a time and waits on the packs as they finish
(`ctx.as_completed`: `ray.wait` on Ray). The actor that trained a pack writes its files into the run's store itself
(`packfiles.write_pack`: the posterior's per-pack sums, the predictions `teachers.keep_predictions`
asks for, the metadata row last) and returns only metadata, so no `[k, N, C]` array reaches the
driver, and an interrupted stage resumes with the teachers it has not trained yet.

Actors are placed with the SPREAD strategy, so a cluster's nodes share the packs. When a node
dies, Ray restarts its actors elsewhere and retries their pack (`max_restarts`,
`max_task_retries`); if that is not enough (restarts used up, the result lost with the node),
the driver puts the pack back in the queue with a fresh actor. Since a teacher is a pure
function of its seed and a pack keeps its teacher ids, a retried pack reproduces exactly the
teachers it would have given: a lost node changes no posterior statistic.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from ray import exceptions as ray_errors

from w2s_ray import artifacts
from w2s_ray.errors import W2SError
from w2s_ray.config import TeacherResources
from w2s_ray.raytools import Progress
from w2s_ray.results import DataStage, TeacherStage
from w2s_ray.run import RunContext
from w2s_ray.storage import RunDir
from w2s_ray.packfiles import kept_teachers, meta_path, pack_files, pack_ids, pack_path, pack_unit, PRED_SPLITS, read_pack_logp, sums_path
from w2s_ray.workers import PackTrainer

def plan_packs(todo: list[int], n_actors: int, max_pack: int) -> list[list[int]]:
    """Split teacher ids into packs: one per actor when they fit, never above `max_pack`."""
    if not todo:
        return []
    size = max(1, min(max_pack, math.ceil(len(todo) / n_actors)))
    return [todo[i : i + size] for i in range(0, len(todo), size)]


def default_num_actors(res: TeacherResources, cluster: dict[str, float], lanes: int = 1) -> int:
    """As many actors as the cluster's resources hold at once (never more: an actor that cannot be
    placed would sit on its pre-assigned pack forever while the placed ones idle), divided among
    the `lanes` that share the cluster (`RunContext.lanes`), at least one each. Without the
    division, two suite tasks side by side on 2 CPUs each placed one of their two actors and
    waited forever for the other (seen: both stages stuck at 4 of 8 teachers); with it, every
    lane's actors fit at once, or a lane's single actor waits for another lane's stage to end."""
    fit = int(cluster.get("CPU", 1) // res.num_cpus_per_actor)
    if res.num_gpus_per_actor > 0:
        fit = min(fit, int(cluster.get("GPU", 0) / res.num_gpus_per_actor))
    fit = max(1, fit // max(1, lanes))
    return min(res.num_actors, fit) if res.num_actors else fit


def actor_starter(ctx: RunContext, res: TeacherResources):
    """(pool key, start()) for `executor.ActorPool`: actors with these resources, SPREAD over nodes."""
    options = dict(
        num_cpus=res.num_cpus_per_actor,
        num_gpus=res.num_gpus_per_actor,
        max_restarts=res.max_retries,
        max_task_retries=res.max_retries,
        scheduling_strategy="SPREAD",
    )
    key = (res.num_cpus_per_actor, res.num_gpus_per_actor, res.max_retries)
    return key, lambda: ctx.executor.actor(PackTrainer, max(1, int(res.num_cpus_per_actor)), **options)


# --- on-disk layout ------------------------------------------------------------------------


def read_finished_pack(stage: Path, meta: Path, n_rows: dict[str, int] | None = None, keep: str = "all",
                       fresh: frozenset[int] = frozenset()) -> pa.Table:
    """A finished pack's metadata row, after checking that its files match the checksums its
    worker recorded (`artifacts.check_seal`: a same-size damaged file still parses) and hold
    the right number of rows (`n_rows` examples per split, when known). A pack in `fresh`, one
    this stage's workers wrote and sealed during this call, is held to its seal's sizes only:
    the stage's manifest takes its checksums from the seal, so the manifest's next check (any
    later run that uses the stage) still hashes every byte, while the driver does not hash
    the ensemble once more as it ends, after the last pack, with the actors idle. Measured
    (`benchmarks/bench_scale.py --ks`, medians of 3): 27 ms → 4 ms for the default 64 teachers
    (28 MB); 2.9 s → 0.01 s for 256 teachers whose predictions on 300,000 rows are 3.35 GB."""
    pack = int(meta.stem.split("-")[1])
    if (why := artifacts.check_seal(stage, pack_unit(pack), verify=pack not in fresh)) is not None:
        raise ValueError(why)
    table = pq.read_table(meta)
    ids = table["teacher_id"].to_numpy()
    for split in PRED_SPLITS:
        rows = pq.read_metadata(pack_path(stage, split, pack)).num_rows
        sums = pq.read_metadata(sums_path(stage, split, pack)).num_rows
        kept = int(kept_teachers(split, ids, keep).sum())
        if n_rows is not None and (rows != kept * n_rows[split] or sums != n_rows[split]):
            raise ValueError(f"{split}: {rows} prediction rows for {kept} teachers and {sums} sum rows, for {n_rows[split]} examples")
    return table


def finished_packs(run: RunDir, stage: Path, n_rows: dict[str, int] | None = None, keep: str = "all",
                   fresh: frozenset[int] = frozenset()) -> pa.Table | None:
    """The finished packs' metadata. A pack whose files are damaged (changed since its worker
    sealed them, truncated, the wrong size, missing) is removed, here and in the store, so that
    it is trained again. `fresh`: packs sealed during this call (`read_finished_pack`)."""
    tables = []
    for meta in sorted((stage / "packs").glob("pack-*.parquet")):
        try:
            tables.append(read_finished_pack(stage, meta, n_rows, keep, fresh))
        except Exception as err:  # pyarrow raises several kinds for a damaged file
            pack = int(meta.stem.split("-")[1])
            sys.stderr.write(f"teachers: pack {pack} is damaged ({type(err).__name__}: {str(err).splitlines()[0]}); it is trained again\n")
            for f in [*pack_files(stage, pack), stage / artifacts.seal_name(pack_unit(pack))]:
                run.remove(f)
    return pa.concat_tables(tables) if tables else None


def check_teacher_ids(table: pa.Table, stage: Path) -> None:
    """A finished ensemble holds teachers 0..K-1 once each (two runs writing one stage could
    otherwise leave duplicates that the posterior would silently count twice)."""
    ids = table["teacher_id"].to_numpy()
    values, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any() or not np.array_equal(values, np.arange(len(values))):
        dup = values[counts > 1][:5].tolist()
        raise W2SError(
            f"teachers stage {stage}: teacher ids are not 0..{len(values) - 1} once each "
            f"(duplicated: {dup}; {len(ids)} rows for {len(values)} ids); was it written by two runs at once? "
            "Remove the directory to retrain it"
        )


def iter_pack_logp(teachers: TeacherStage, split: str, k: int | None = None) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """(teacher ids, `[k, N, C]` log-probs) pack after pack, teachers below `k` (default: the
    stage's K): how the studies read an ensemble's predictions. A pack whose predictions on
    `split` were not kept (`teachers.keep_predictions: none`) is an error naming the key."""
    k = teachers.k if k is None else k
    for p, all_ids in pack_ids(teachers).items():
        ids, logp = read_pack_logp(teachers.dir, split, p, k)
        if len(ids) < int((all_ids < k).sum()):
            raise W2SError(f"teachers stage {teachers.dir}: the {split} predictions of pack {p} were not kept "
                           "(teachers.keep_predictions: none); this needs keep_predictions all or float16")
        if len(ids):
            yield ids, torch.tensor(logp)  # a copy: Arrow buffers are read-only


# --- the stage -----------------------------------------------------------------------------

def log_lost(pack: int, err: Exception) -> None:
    sys.stderr.write(f"\nteachers: pack {pack} lost ({type(err).__name__}); queued again\n")


def stage_teachers(ctx: RunContext, data: DataStage) -> TeacherStage:
    """The first K teachers: cached, extended with the missing ones, or resumed pack by pack."""
    tcfg = ctx.cfg.teachers
    d = ctx.run.open_stage("teachers", ctx.keys.teachers)
    on_disk = artifacts.read_manifest(d)

    def enough() -> dict | None:
        manifest = artifacts.read_manifest(d)
        return manifest if manifest is not None and manifest["k"] >= tcfg.k else None

    try:
        with ctx.run.claim(d, "teachers stage", enough) as manifest:
            if manifest is None:
                ctx.ray()
                ctx.run.remove(d / artifacts.MANIFEST)
                table = train_teachers(ctx, data, d, f" (extending the {on_disk['k']} on disk)" if on_disk else "")
                ctx.run.write_parquet(d / "teachers.parquet", table)
                acc = table["acc_test"].to_numpy()
                packs = sorted(set(table["pack"].to_pylist()))
                manifest = ctx.run.write_manifest(d, ctx.keys.teachers, k=table.num_rows, packs=packs, acc_mean=float(acc.mean()), acc_sd=float(acc.std(ddof=1)))
            else:
                ctx.log(f"teachers: cached {d} (using {tcfg.k} of {manifest['k']})")
    finally:
        ctx.pool.release()  # actors hold CPUs/GPUs the student stage needs, also ones started ahead for a stage found cached
    return TeacherStage(d, tcfg.k, manifest["packs"])


def start_actors_ahead(ctx: RunContext) -> None:
    """Start the teacher stage's actors now, while the data stage still works in this process
    (`RunContext.ray_meanwhile`, which calls this once Ray is up): an actor is a worker process
    that takes seconds to start and import torch, and on the default run's 2 cores one core
    idles while the driver generates the rows. `train_teachers` takes them from the pool;
    `stage_teachers` releases them, also when it finds the stage cached. Only actors the
    cluster can place now: otherwise `train_teachers` says why, or waits for the cluster."""
    tcfg = ctx.cfg.teachers
    res, have = tcfg.resources, ctx.executor.resources()
    if res.num_cpus_per_actor > have.get("CPU", 0.0) or res.num_gpus_per_actor > have.get("GPU", 0.0):
        return
    key, start = actor_starter(ctx, res)
    n_actors = default_num_actors(res, have, ctx.lanes)  # as many as `train_teachers` takes: more would wait for CPUs
    ctx.pool.get(key, min(n_actors, len(plan_packs(list(range(tcfg.k)), n_actors, res.max_pack_size))), start)


def train_teachers(ctx: RunContext, data: DataStage, stage: Path, extending: str = "") -> pa.Table:
    """Train the K teachers not yet on disk in `stage`; return the per-teacher table."""
    tcfg = ctx.cfg.teachers
    res = tcfg.resources
    n_rows = {split: data.sizes[split] for split in PRED_SPLITS}
    done = finished_packs(ctx.run, stage, n_rows, tcfg.keep_predictions)
    done_ids = set(done["teacher_id"].to_pylist()) if done is not None else set()
    todo = [t for t in range(tcfg.k) if t not in done_ids]
    if todo:
        kept = f", {tcfg.k - len(todo)} of them on disk" if done_ids and not extending else ""
        ctx.log(f"teachers: training {len(todo)} of K={tcfg.k} {tcfg.model.name} teachers{extending or kept} → {stage}")
    else:
        ctx.log(f"teachers: all K={tcfg.k} teachers are on disk (an interrupted stage); writing its table → {stage}")
    next_pack = (max(done["pack"].to_pylist()) + 1) if done is not None else 0
    ctx.executor.check_placeable({"CPU": res.num_cpus_per_actor, "GPU": res.num_gpus_per_actor},
                                 {"CPU": "teachers.resources.num_cpus_per_actor", "GPU": "teachers.resources.num_gpus_per_actor"},
                                 what="one teacher actor", wait_s=ctx.cfg.ray.placement_wait_s)
    n_actors = default_num_actors(res, ctx.executor.resources(), ctx.lanes)
    packs = plan_packs(todo, n_actors, res.max_pack_size)
    fresh: set[int] = set()  # the packs this call's workers wrote and sealed
    if packs:
        cfg_json = tcfg.model_dump(mode="json")
        key, start = actor_starter(ctx, res)
        actors = ctx.pool.get(key, min(n_actors, len(packs)), start)
        queue = list(enumerate(packs, start=next_pack))
        running: dict[Any, tuple] = {}

        def submit(actor) -> None:
            p, ids = queue.pop(0)
            running[ctx.executor.call(actor, "train", data.dir, cfg_json, data.n_classes, p, ids, ctx.run, stage)] = (actor, p, ids)

        for actor in actors:
            if queue:
                submit(actor)
        n_done, t0 = len(done_ids), time.perf_counter()
        requeued: dict[int, int] = {}
        with Progress("teachers", tcfg.k, n_done, unit="teacher") as bar:
            for (actor, p, ids), ref in ctx.as_completed(running):
                try:
                    result = ctx.get(ref)
                except ctx.executor.lost as err:
                    # Ray's own restarts and retries did not save this pack: queue it again
                    requeued[p] = requeued.get(p, 0) + 1
                    if requeued[p] > res.max_retries + 1:
                        raise
                    log_lost(p, err)
                    queue.insert(0, (p, ids))
                    # an actor Ray is restarting (ActorUnavailableError, restarts left) keeps its place:
                    # the restart finishes and takes the pack; one Ray gave up on is replaced
                    restarting = isinstance(err, ray_errors.ActorUnavailableError) and res.max_retries > 0
                    gone = isinstance(err, ray_errors.RayActorError) and not restarting
                    submit(ctx.pool.replace(actor, start) if gone else actor)
                    continue
                # the worker wrote the pack; a worker on another node published it to the store
                for f in (meta_path(stage, p), *(sums_path(stage, split, p) for split in PRED_SPLITS)):
                    ctx.run.need(f, f"teachers: pack {p} (finished on {result['node']})")
                fresh.add(p)
                bar.update(len(result["teacher_ids"]), f"{time.perf_counter() - t0:.1f}s")
                if queue:
                    submit(actor)
    table = finished_packs(ctx.run, stage, n_rows, tcfg.keep_predictions, frozenset(fresh)).sort_by("teacher_id")
    check_teacher_ids(table, stage)
    return table
