"""Where a stage's work runs: the executor seam between the stages and Ray.

A stage never calls `ray.remote` itself. It asks its run context (`run.RunContext`), which holds
one executor:

- `submit(fn, *args, num_cpus=, num_gpus=)` → a handle, `get(handle)` → the result (or the
  task's error), `as_completed({handle: tag})` yields `(tag, handle)` as each finishes;
- `put(obj)` shares one object with many tasks; `map_fn()` is the `map` a task that fans out
  uses (the data stage's chunk generator);
- `actor(cls, *args, **options)` and `call(actor, method, *args)` for the teacher actors
  (through `ActorPool`, below), `kill(actor)`;
- `resources()`, `nodes()` and `check_placeable(...)` describe the cluster; `lost` is the tuple
  of errors that mean "the system lost this work", not "the work failed" (the teacher stage
  queues a lost pack again).

`RayExecutor` is the real thing (tasks and actors on the embedded local Ray or a cluster).
`InProcess` runs the same stage code in this process, one call at a time, without Ray: the
pipeline's cache, resume and damage logic is the same code either way, so the tests of that
logic run in the fast tier, and a test checks that both executors give the same bits. It refuses
what only Ray can do (Ray Train across workers, Tune) with a message. Worker functions set
torch's thread count as a Ray worker's would; `InProcess` restores the caller's afterwards.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable, Hashable, Iterator, Protocol, TypeVar

import ray
import numpy as np
import torch
from ray import exceptions as ray_errors

from w2s_ray import raytools
from w2s_ray.config import RayConfig
from w2s_ray.errors import W2SError

T = TypeVar("T")


class Executor(Protocol):
    """What a stage may ask of the machine it runs on (see the module's docstring)."""

    lost: tuple[type[BaseException], ...]

    def start(self, cfg: RayConfig) -> None: ...
    def submit(self, fn: Callable, *args: Any, num_cpus: float = 1.0, num_gpus: float = 0.0) -> Any: ...
    def get(self, handle: Any) -> Any: ...
    def as_completed(self, running: dict[Any, T]) -> Iterator[tuple[T, Any]]: ...
    def put(self, obj: Any) -> Any: ...
    def map_fn(self) -> Callable: ...
    def actor(self, cls: type, *args: Any, **options: Any) -> Any: ...
    def call(self, actor: Any, method: str, *args: Any) -> Any: ...
    def kill(self, actor: Any) -> None: ...
    def actor_pool_map(self, cls: type, args: tuple, items: list[int], num_actors: int, num_cpus: float, num_gpus: float) -> Iterator[dict]: ...
    def resources(self) -> dict[str, float]: ...
    def nodes(self) -> int: ...
    def check_placeable(self, need: dict[str, float], keys: dict[str, str], what: str, wait_s: float) -> None: ...
    def needs_ray(self, what: str) -> None: ...


class RayExecutor:
    """Tasks and actors on Ray (started or joined on the first `start`)."""

    lost = (ray_errors.RayActorError, ray_errors.ObjectLostError, ray_errors.WorkerCrashedError, ray_errors.NodeDiedError)
    """Failures of the system (a dead actor, worker or node; a lost result), not of the work."""

    def __init__(self) -> None:
        self._remote: dict[Any, Any] = {}

    def start(self, cfg: RayConfig) -> None:
        raytools.init_ray(cfg)

    def _wrapped(self, thing: Any) -> Any:
        if thing not in self._remote:
            self._remote[thing] = ray.remote(thing)
        return self._remote[thing]

    def submit(self, fn: Callable, *args: Any, num_cpus: float = 1.0, num_gpus: float = 0.0) -> Any:
        return self._wrapped(fn).options(num_cpus=num_cpus, num_gpus=num_gpus).remote(*args)

    def get(self, handle: Any) -> Any:
        return ray.get(handle)

    def as_completed(self, running: dict[Any, T]) -> Iterator[tuple[T, Any]]:
        return raytools.as_completed(running)

    def put(self, obj: Any) -> Any:
        return ray.put(obj)

    def map_fn(self) -> Callable:
        return raytools.parallel_map

    def actor(self, cls: type, *args: Any, **options: Any) -> Any:
        return self._wrapped(cls).options(**options).remote(*args)

    def call(self, actor: Any, method: str, *args: Any) -> Any:
        return getattr(actor, method).remote(*args)

    def kill(self, actor: Any) -> None:
        if ray.is_initialized():
            ray.kill(actor)

    def actor_pool_map(self, cls: type, args: tuple, items: list[int], num_actors: int, num_cpus: float, num_gpus: float) -> Iterator[dict]:
        """`cls(*args)` built once per actor of a Ray Data pool, called with one item at a time
        (`raytools.actor_pool_map`); its summary rows as the items finish."""
        return raytools.actor_pool_map(cls, args, items, num_actors, num_cpus, num_gpus)

    def resources(self) -> dict[str, float]:
        return ray.cluster_resources()

    def nodes(self) -> int:
        return raytools.alive_nodes()

    def check_placeable(self, need: dict[str, float], keys: dict[str, str], what: str, wait_s: float) -> None:
        raytools.check_placeable(need, keys, what=what, wait_s=wait_s)

    def needs_ray(self, what: str) -> None:
        pass


class Done:
    """What `InProcess.submit` returns: the call's result or its error, already there."""

    __slots__ = ("value", "error")

    def __init__(self, value: Any = None, error: BaseException | None = None) -> None:
        self.value, self.error = value, error


class InProcess:
    """The stages' work in this process, one call at a time, without Ray: for tests of what a
    stage does with its files (cache, resume, damage, extension), and for debugging a stage
    with a debugger. A task's error is raised by `get`, as Ray's would be; a `KeyboardInterrupt`
    passes at once. Resources are this machine's CPUs and no GPU. One call at a time also when
    lanes (`pipeline.run_requests`) call from several threads: a call sets torch's thread count
    for the whole process, as a Ray worker sets its own."""

    lost: tuple[type[BaseException], ...] = ()

    def __init__(self, cpus: int | None = None) -> None:
        if cpus is None:
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.cpus = cpus
        self._one = threading.RLock()

    def start(self, cfg: RayConfig) -> None:
        pass

    def _run(self, fn: Callable, *args: Any) -> Done:
        with self._one:
            threads = torch.get_num_threads()
            try:
                return Done(fn(*args))
            except Exception as err:
                return Done(error=err)
            finally:
                torch.set_num_threads(threads)  # worker functions set their own, as a Ray worker would

    def submit(self, fn: Callable, *args: Any, num_cpus: float = 1.0, num_gpus: float = 0.0) -> Done:
        return self._run(fn, *args)

    def get(self, handle: Done) -> Any:
        if handle.error is not None:
            raise handle.error
        return handle.value

    def as_completed(self, running: dict[Any, T]) -> Iterator[tuple[T, Any]]:
        while running:  # in submission order; tasks added meanwhile are waited on too
            handle = next(iter(running))
            yield running.pop(handle), handle

    def put(self, obj: Any) -> Any:
        return obj

    def map_fn(self) -> Callable:
        return lambda fn, items, num_cpus=1.0: list(map(fn, items))

    def actor(self, cls: type, *args: Any, **options: Any) -> Any:
        with self._one:
            threads = torch.get_num_threads()
            try:
                return cls(*args)
            finally:
                torch.set_num_threads(threads)

    def call(self, actor: Any, method: str, *args: Any) -> Done:
        return self._run(getattr(actor, method), *args)

    def kill(self, actor: Any) -> None:
        pass

    def actor_pool_map(self, cls: type, args: tuple, items: list[int], num_actors: int, num_cpus: float, num_gpus: float) -> Iterator[dict]:
        """One "actor" (`cls(*args)`, built once here) called with each item in turn, as one
        actor of Ray Data's pool would be."""
        worker = self._run(cls, *args)
        for i in items:
            out = self.get(self._run(self.get(worker), {"item": np.asarray([i])}))
            yield {k: v[0].item() if hasattr(v[0], "item") else v[0] for k, v in out.items()}

    def resources(self) -> dict[str, float]:
        return {"CPU": float(self.cpus)}

    def nodes(self) -> int:
        return 1

    def check_placeable(self, need: dict[str, float], keys: dict[str, str], what: str, wait_s: float) -> None:
        raytools.check_placeable(need, keys, self.resources(), what=what)

    def needs_ray(self, what: str) -> None:
        raise W2SError(f"{what} needs Ray: run it with the Ray executor (the default), not in-process")


class ActorPool:
    """Long-lived actors of one kind, started on demand through an executor and reused between
    calls.

    Starting an actor costs about a second (a worker process importing torch), so a study that
    trains many ensembles reuses them. Actors hold their CPUs/GPUs while alive: the owner
    (`run.RunContext`) releases them when a stage no longer needs them, and on exit.
    """

    def __init__(self, executor: Executor) -> None:
        self.executor = executor
        self.key: Hashable | None = None
        self.actors: list = []

    def get(self, key: Hashable, n: int, start: Callable[[], Any]) -> list:
        """`n` actors started by `start()`; a different `key` (resources) starts fresh ones."""
        if key != self.key:
            self.release()
            self.key = key
        self.actors += [start() for _ in range(n - len(self.actors))]
        return self.actors[:n]

    def replace(self, dead: Any, start: Callable[[], Any]) -> Any:
        """A fresh actor in place of one Ray gave up on (restarts used up, or its node gone)."""
        self.executor.kill(dead)
        new = start()
        self.actors[self.actors.index(dead)] = new
        return new

    def release(self) -> None:
        for actor in self.actors:
            self.executor.kill(actor)
        self.actors, self.key = [], None
