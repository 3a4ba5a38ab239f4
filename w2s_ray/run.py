"""The run context: created once per command (`run`, a stage, `tune`, a study) by `pipeline` and
passed explicitly to every stage function: the config, its per-stage cache keys, the run
directory with its store, the teacher actor pool (released when the context closes) and the
log. Nothing about a run lives in a module global. The typed results the stages hand each
other are in `results` (no Ray).

Imports, for the whole package: every module imports what it depends on at its top, so its
header says what it needs. The math modules (`losses`, `posterior`, `metrics`, `models`,
`packs`, `student.core`, `ridge_example`) and the file formats (`artifacts`, `results`, `packfiles`,
`labelfiles`, `student.recipe`) never import Ray (a test enforces it); the Ray layer
(`raytools`, `executor`, `run` and everything above) imports Ray at the top. Nothing touches CUDA at
import: a worker asks for a device only when Ray gave it a GPU. The one function-level import
is in `cli`, which imports the pipeline only once the config (and search space) validated, so
a bad input answers in seconds instead of waiting for Ray, Tune and the dataset packages; figures
use matplotlib's object API, so no pyplot backend is switched in the caller. Modules form a
stack with no cycles: `config` → math → file formats → `storage` → `raytools` → `executor` → `run` → what Ray
workers run (`workers`, `trial`, `student.ray_train`: kept light, since every worker process
imports them) → stages (`data`, `teachers`, `labels`, `students`) → `report`, `tune`, `studies`
→ `pipeline` → `cli`; only `cli` imports `pipeline`.
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, TypeVar

from w2s_ray import worker_setup
from w2s_ray.config import ExperimentConfig, StageKeys
from w2s_ray.executor import ActorPool, Executor, RayExecutor
from w2s_ray.storage import RunDir

T = TypeVar("T")


def log(msg: str) -> None:
    print(f"[w2s-ray] {msg}", file=sys.stderr, flush=True)


@dataclass
class RunContext:
    """Everything a stage needs besides its inputs; a context manager that releases the actors.

    Stages run their work through `executor` (`executor.RayExecutor` by default; `InProcess` runs
    it in this process) and its shortcuts here, never through `ray.remote` themselves."""

    cfg: ExperimentConfig
    run: RunDir
    executor: Executor = field(default_factory=RayExecutor)
    pool: ActorPool | None = None
    log: Callable[[str], None] = log
    lanes: int = 1  # how many lanes of work share the cluster (`pipeline.run_requests`): stages size their actor pools to a share
    starts_ray: bool = False  # the command goes on to stages that start Ray: in-process work before them may start it meanwhile (`ray_meanwhile`)
    ahead: Callable[["RunContext"], None] | None = None  # what `ray_meanwhile` starts on Ray once it is up (the pipeline's: the teacher actors)
    keys: StageKeys = field(init=False)

    def __post_init__(self) -> None:
        self.keys = StageKeys(self.cfg)
        if self.pool is None:
            self.pool = ActorPool(self.executor)

    @classmethod
    def open(cls, cfg: ExperimentConfig, executor: Executor | None = None, starts_ray: bool = False) -> "RunContext":
        """The run directory is opened (a store's filesystem once, here); Ray is not started.
        `starts_ray`: the command goes on to stages that need Ray (see `ray_meanwhile`)."""
        return cls(cfg, RunDir.open(cfg.output.root, cfg.output.name, cfg.output.cache, cfg.output.wait), executor or RayExecutor(),
                   starts_ray=starts_ray)

    def __enter__(self) -> "RunContext":
        worker_setup.setup_process()  # the driver computes too (the test split's posterior, the studies)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.pool.release()

    def derive(self, cfg: ExperimentConfig, lanes: int | None = None) -> "RunContext":
        """The same run (directory, store, executor, actors, log) for a variant of the config, as
        studies use; with `lanes`, one of that many lanes of work side by side: actors of its own
        (the caller releases them) and a share of the cluster for each stage's actor pool."""
        if cfg.output != self.cfg.output:
            raise ValueError("a derived context must write to the same run directory")
        if lanes is None:
            return RunContext(cfg, self.run, self.executor, self.pool, self.log, self.lanes, self.starts_ray)
        return RunContext(cfg, self.run, self.executor, None, self.log, lanes, self.starts_ray)

    def ray(self) -> None:
        """Start or join Ray (the Ray executor): called by a stage that has work for it, never for a cached one."""
        self.executor.start(self.cfg.ray)

    def ray_meanwhile(self, work: Callable[[], T]) -> T:
        """`work()`, in-process work that needs no cluster and whose inputs are already validated,
        done in a thread while this thread starts or joins Ray, when the command goes on to
        stages that need it (`starts_ray`); otherwise just `work()`, and Ray stays down. Starting
        Ray mostly waits on its daemons, which start on the other cores: measured on 2 cores
        (2026-12-07), generating the default 12,000 MNIST-1D rows took 5.9–7.0 s and `ray.init`
        3.2–4.6 s one after the other, 7.3–8.3 s for both together. `ray.init` stays in this
        thread, the main one: Ray sets its SIGTERM handler only there. An error of either is
        raised once `work` has ended (a thread cannot be stopped). Once Ray is up, `ahead` starts
        what the next stage will need (`teachers.start_actors_ahead`) while `work` goes on."""
        if not self.starts_ray or not isinstance(self.executor, RayExecutor):  # in-process stages start nothing
            return work()
        with ThreadPoolExecutor(1, thread_name_prefix="w2s-ray in-process work") as pool:
            done = pool.submit(work)
            self.ray()
            if self.ahead is not None:
                self.ahead(self)
            return done.result()

    def warn_if_unshared(self, why: str) -> None:
        """Work that writes on any node (`why`) needs a run directory every node sees: a local
        one must be a filesystem every node mounts at the same path. We cannot see whether it
        is; say what is needed."""
        nodes = self.executor.nodes()
        if nodes > 1 and self.run.store is None:
            self.log(f"warning: {why}: the cluster has {nodes} nodes, and output.root={self.cfg.output.root!r} is a local path; "
                     "it must be a filesystem every node mounts at the same path (NFS), or use a URI such as s3://bucket/prefix")

    def submit(self, fn: Callable, *args: Any, num_cpus: float = 1.0, num_gpus: float = 0.0) -> Any:
        """Run `fn(*args)` as a task with these resources; `get` its handle for the result."""
        return self.executor.submit(fn, *args, num_cpus=num_cpus, num_gpus=num_gpus)

    def get(self, handle: Any) -> Any:
        return self.executor.get(handle)

    def as_completed(self, running: dict[Any, Any]) -> Iterator[tuple[Any, Any]]:
        """`(tag, handle)` for each task of `running` (handle → tag) as it finishes."""
        return self.executor.as_completed(running)
