"""The commands, composed from the stages in the order data flows:

    [embed →] data → teachers → labels (posterior + pseudo-labels) → students → report

(embed: text data only; the data stage runs it when its splits are not cached)

`run_stages` is the one chain of stage calls: each stage takes the results of the stages before
it as arguments and returns its own, and the chain stops after `until`. `run_pipeline`,
`run_tune` and `run_study` each open one `RunContext` (closed, with its actors, on the way out)
and call it. Only the CLI imports this module.

Each stage lives in `<run>/<stage>/<hash>/`, where the hash covers only the config parts the
stage depends on: changing the student never retrains teachers, and the gold-label ceiling
does not depend on the teachers at all. A stage is complete when its manifest verifies; an
interrupted stage is redone (the teacher stage resumes pack by pack).
"""

from __future__ import annotations

import queue
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from w2s_ray.config import STAGES, ExperimentConfig, to_yaml
from w2s_ray.data import stage_data
from w2s_ray.embed import stage_embed
from w2s_ray.executor import Executor
from w2s_ray.labels import stage_labels
from w2s_ray.report import stage_report
from w2s_ray.run import RunContext
from w2s_ray.results import StageRequest, Stages
from w2s_ray.space import SearchSpace
from w2s_ray.studies import STUDIES
from w2s_ray.students import stage_students
from w2s_ray.teachers import stage_teachers, start_actors_ahead

if TYPE_CHECKING:  # an annotation only: `run_tune` imports Tune when it runs
    from w2s_ray.trial import TrialFault


def run_stages(ctx: RunContext, until: str = "report", done: Stages | None = None) -> Stages:
    """Every stage up to and including `until`, each reused from the cache when complete;
    `done` continues a chain that stopped earlier."""
    if until not in STAGES:
        raise ValueError(f"unknown stage {until!r}; stages: {STAGES}")
    last = STAGES.index(until)
    s = done or Stages()
    if until == "embed":
        s.embed = s.embed or stage_embed(ctx)
        return s
    if s.data is None:
        def embed():
            s.embed = s.embed or stage_embed(ctx)
            return s.embed

        s.data = stage_data(ctx, embed if ctx.cfg.embed is not None else None)
    if last >= STAGES.index("teachers") and s.teachers is None:
        s.teachers = stage_teachers(ctx, s.data)
    if last >= STAGES.index("labels") and s.labels is None:
        s.labels = stage_labels(ctx, s.data, s.teachers)
    if last >= STAGES.index("student") and s.students is None:
        s.students = stage_students(ctx, s.data, s.teachers, s.labels)
    if last >= STAGES.index("report") and s.results is None:
        s.results = stage_report(ctx, s.data, s.teachers, s.labels, s.students)
    return s


@contextmanager
def open_run(cfg: ExperimentConfig, executor: Executor | None = None, starts_ray: bool = True) -> Iterator[RunContext]:
    """The run's context. A command that fails leaves the root as it found it, less what it
    finished: the directories it created and left empty are removed (stages it finished, and
    teacher packs of an interrupted stage, stay for a rerun). The config is saved by
    `validated`, once the data stage has checked it against the data. `starts_ray`: the
    command goes on past the data stage, to stages that need Ray unless they are cached (a
    data stage built in this process starts Ray meanwhile: `RunContext.ray_meanwhile`)."""
    with RunContext.open(cfg, executor, starts_ray) as ctx:
        try:
            yield ctx
        except BaseException:
            ctx.run.prune_empty()
            raise


def validated(ctx: RunContext) -> Stages:
    """The data stage (which checks the models against the data), then the run's config.yaml:
    a config that fails validation never overwrites the saved config of a good run."""
    stages = run_stages(ctx, until="data")
    ctx.run.write_text(ctx.run / "config.yaml", to_yaml(ctx.cfg))
    return stages


def run_pipeline(cfg: ExperimentConfig, until: str = "report", executor: Executor | None = None) -> Stages:
    """`w2s-ray run`, or one stage with its predecessors; on Ray unless `executor` says otherwise
    (`executor.InProcess`: the same stages in this process, as the fast tests run them)."""
    with open_run(cfg, executor, starts_ray=until not in ("embed", "data")) as ctx:
        ctx.ahead = start_actors_ahead  # a data stage made here starts them once Ray is up
        t0 = time.perf_counter()
        stages = run_stages(ctx, until) if until == "embed" else run_stages(ctx, until, done=validated(ctx))
        ctx.log(f"done in {time.perf_counter() - t0:.1f}s; outputs in {ctx.run.path}")
        return stages


def run_tune(cfg: ExperimentConfig, space: SearchSpace, name: str, resume: bool = False, fault: TrialFault | None = None,
             verbose: bool = False) -> dict[str, Any]:
    """`w2s-ray tune`: teachers, labels, ceiling and baseline students from the cache (computed
    once if missing, never per trial), then the search. `fault` is for tests only."""
    # imported here: Ray Tune and Optuna (Tune imports Ray Data) cost every other command about
    # 1 s of start-up (measured with -X importtime)
    from w2s_ray.tune import check_cluster, run_search

    # one seed: a trial is one student, and the baseline and ceiling it is compared with are too
    base = cfg.model_copy(update={"student": cfg.student.model_copy(update={"ceiling": True, "seeds": 1})})
    with open_run(base) as ctx:
        ctx.ahead = start_actors_ahead
        data = validated(ctx)  # checks the models against the data, before Ray
        check_cluster(ctx, space)
        stages = run_stages(ctx, until="student", done=data)
        return run_search(ctx, stages, space, name, resume=resume, fault=fault, verbose=verbose)


def run_requests(ctx: RunContext, requests: list[StageRequest], lanes: int = 1) -> dict[str, Stages]:
    """Each request's stages, from the cache where possible. Requests named `group/what` form
    groups (a suite's task); a group's `group/data` request is reused by its other requests.
    With `lanes` > 1, every `*/data` request runs first, in order (data problems stop the
    study before any other work), then up to `lanes` groups run side by side, each group's
    requests in order in a thread with actors of its own, each stage's actor pool sized to a
    `1/lanes` share of the cluster (so no lane holds part of its actors while waiting for the
    rest); Ray places their tasks as the cluster's resources free up. A stage's bits do not depend on the lanes: each is a function
    of its config and seeds, and two lanes that need the same stage share its lock (one writes,
    the other waits and reads it)."""
    done: dict[str, Stages] = {}

    def run_group(group: list[StageRequest], lane: bool) -> None:
        for req in group:
            before = done.get(req.name.split("/")[0] + "/data") if "/" in req.name else None
            sub = ctx.derive(req.cfg, lanes=lanes if lane else None)
            try:
                done[req.name] = run_stages(sub, req.until, done=Stages(data=before.data) if before else None)
            finally:
                if lane:
                    sub.pool.release()

    if lanes <= 1:
        run_group(requests, lane=False)
        return done
    first = [r for r in requests if r.name.endswith("/data")]
    run_group(first, lane=False)
    groups: dict[str, list[StageRequest]] = {}
    for r in requests:
        if not r.name.endswith("/data"):
            groups.setdefault(r.name.split("/")[0], []).append(r)
    lanes = min(lanes, len(groups))  # the share each lane's stages size their actors to
    todo, errors = queue.Queue(), []
    for g in groups.values():
        todo.put(g)

    def lane() -> None:
        while not errors:
            try:
                group = todo.get_nowait()
            except queue.Empty:
                return
            try:
                run_group(group, lane=True)
            except BaseException as err:  # noqa: BLE001 — handed to the main thread, which raises it
                errors.append(err)

    ctx.ray()  # once, here: lanes must not start Ray side by side
    threads = [threading.Thread(target=lane, name=f"w2s-ray lane {i}", daemon=True) for i in range(lanes)]
    for t in threads:
        t.start()
    for t in threads:  # joined in steps, so Ctrl-C reaches this thread (daemon lanes end with the process)
        while t.is_alive():
            t.join(0.5)
    if errors:
        raise errors[0]
    return done


def run_study(kind: str, cfg: ExperimentConfig, executor: Executor | None = None, **options: Any) -> Path:
    """`w2s-ray study KIND`: the runs the study needs (from the cache where possible), then the
    study. `options`: the study's own options (`w2s-ray study suite --quick --tasks ...`)."""
    study = STUDIES[kind]
    requests = study.needs(cfg, **options)  # every config the study derives is validated before any work
    with open_run(cfg, executor) as ctx:
        if hasattr(study, "prepare"):
            study.prepare(ctx, **options)
        else:
            validated(ctx)
        lanes = study.lanes(ctx, **options) if hasattr(study, "lanes") else 1
        done = run_requests(ctx, requests, lanes)
        out = ctx.run.reset(ctx.run / "study" / kind)
        return study.run(ctx, done, out, **options)
