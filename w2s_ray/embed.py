"""The embed stage: a text column of user Parquet to feature vectors, one encoder per view.

    embed → data → teachers → labels → students → report

Text data is `data.source: parquet` with `embed.column` (a string column), `embed.student` (the
encoder whose vectors are the student's features) and, optionally, `embed.teacher` (the
teachers' own view, e.g. a hashed bag of words for the teachers and a transformer for the
student). Without `embed.teacher` the teachers see the student's vectors.

Each encoder's vectors live in `embed/<key>/` (`embedfiles`), keyed by the file (path, size,
mtime), the column, the encoder (and the files of a local model), the part size and the pinned
numerics; two views with the same encoder share one directory. The driver reads and checks the
column and the encoders' widths before Ray starts and writes the texts once (`input.parquet`,
one row group per part); a pool of encoder actors (Ray Data `map_batches`, `embed.resources`:
actors, CPUs and GPUs per actor) builds its model once per actor, and each actor encodes the
parts it is given and writes and seals them itself: the driver holds no vector. An interrupted
stage keeps every part whose seal verifies. The data stage gathers the vectors of the rows it
keeps (`embedfiles.gather`), and runs this stage only when its own splits are not cached.
"""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow.parquet as pq

from w2s_ray import artifacts, encoders
from w2s_ray.config import EncoderConfig
from w2s_ray.data import text_rows
from w2s_ray.embedfiles import INPUT, check_part, input_table, part_path
from w2s_ray.errors import W2SError
from w2s_ray.raytools import Progress
from w2s_ray.results import EmbedStage
from w2s_ray.run import RunContext
from w2s_ray.workers import EncoderActor


def describe(enc: EncoderConfig) -> str:
    if enc.kind == "hashed":
        return f"hashed bag of words (dim {enc.dim}, n-grams up to {enc.ngrams})"
    return f"hf {enc.path} ({enc.pooling} pooling, batches of {enc.batch_size})"


def default_num_actors(ctx: RunContext, todo: int) -> int:
    """As many actors as the cluster holds (by GPUs when an actor has one, else by CPUs; a lane's
    share of it), at most one per part."""
    res = ctx.cfg.embed.resources
    have = ctx.executor.resources()
    fit = int(have.get("GPU", 0) // res.num_gpus_per_actor) if res.num_gpus_per_actor else int(have.get("CPU", 1) // res.num_cpus_per_actor)
    fit = max(1, fit // max(1, ctx.lanes))  # a share of the cluster when lanes run side by side (`teachers.default_num_actors`)
    return max(1, min(res.num_actors or fit, todo))


def write_input(ctx: RunContext, d: Path) -> None:
    """The texts, once, in row groups of `embed.rows_per_part` (sealed: a resume keeps it only if it verifies)."""
    e = ctx.cfg.embed
    rows, texts = text_rows(ctx.cfg.data, e.column)
    ctx.run.reset(d)
    ctx.run.write_parquet(d / INPUT, input_table(rows, texts), e.rows_per_part)
    ctx.run.seal(d, "input", [d / INPUT])


def encode(ctx: RunContext, d: Path, key: str, enc: EncoderConfig, dim: int) -> dict:
    """Every part of `d` not already there and sealed, by the encoder pool; then the manifest."""
    e = ctx.cfg.embed
    if artifacts.check_seal(d, "input") is not None:
        write_input(ctx, d)
    groups = pq.ParquetFile(d / INPUT).metadata
    sizes = [groups.row_group(i).num_rows for i in range(groups.num_row_groups)]
    todo = []
    for i, rows in enumerate(sizes):
        if not part_path(d, i).exists():
            todo.append(i)
        elif (why := check_part(d, i, rows, dim)) is not None:
            ctx.log(f"embed: part {part_path(d, i).name} is damaged ({why}); it is encoded again")
            ctx.run.remove(part_path(d, i))
            todo.append(i)
    t0 = time.perf_counter()
    if todo:
        ctx.ray()
        ctx.warn_if_unshared("the encoder actors write their parts on any node")
        res = e.resources
        ctx.executor.check_placeable({"CPU": res.num_cpus_per_actor, "GPU": res.num_gpus_per_actor},
                                     {"CPU": "embed.resources.num_cpus_per_actor", "GPU": "embed.resources.num_gpus_per_actor"},
                                     what="one encoder actor", wait_s=ctx.cfg.ray.placement_wait_s)
        n_actors = default_num_actors(ctx, len(todo))
        n_rows = sum(sizes[i] for i in todo)
        ctx.log(f"embed: encoding {n_rows:,} texts in {len(todo)} of {len(sizes)} parts with a {describe(enc)} "
                f"on {n_actors} actor(s) → {d}")
        args = (enc.model_dump(mode="json"), ctx.run, d, max(1, int(res.num_cpus_per_actor)))
        with Progress("embed", len(sizes), len(sizes) - len(todo), unit="part") as bar:
            for out in ctx.executor.actor_pool_map(EncoderActor, args, todo, n_actors, res.num_cpus_per_actor, res.num_gpus_per_actor):
                ctx.run.need(part_path(d, out["item"]), f"embed: part {out['item']} (written on another node)")
                bar.update(1, f"{out['rows'] / max(out['seconds'], 1e-9):,.0f} texts/s")
    for i, rows in enumerate(sizes):
        if (why := check_part(d, i, rows, dim)) is not None:
            raise W2SError(f"embed stage {d}: part {i} is not what its actor wrote ({why})")
    seconds = time.perf_counter() - t0
    return ctx.run.write_manifest(d, key, dim=dim, rows=sum(sizes), parts=len(sizes), encoder=enc.model_dump(mode="json"),
                                  encoded_rows=sum(sizes[i] for i in todo), seconds=round(seconds, 3))


def stage_embed(ctx: RunContext) -> EmbedStage:
    """Each view's vectors, built once per encoder key. Every encoder is checked (a model that
    cannot be found is an error naming its key) before any is run or Ray starts."""
    e = ctx.cfg.embed
    if e is None:
        raise W2SError("embed: the config has no embed section (text data: data.source: parquet, embed.column and embed.student)")
    encs = {role: e.student if role == "student" else e.teacher for role in ctx.keys.embed_roles()}
    dims = {role: encoders.output_dim(enc, f"embed.{role}") for role, enc in encs.items()}
    dirs: dict[str, Path] = {}
    rows = 0
    for role, enc in encs.items():
        key = ctx.keys.embed(role)
        d = ctx.run.open_stage("embed", key)
        if d in dirs.values():  # the same encoder for both views
            dirs[role] = d
            continue
        with ctx.run.claim(d, f"embed stage ({role})", lambda: artifacts.read_manifest(d)) as manifest:
            if manifest is None:
                manifest = encode(ctx, d, key, enc, dims[role])
            else:
                ctx.log(f"embed: cached {role} view {d}")
        dirs[role], rows = d, manifest["rows"]
    return EmbedStage(dirs, dims, rows)
