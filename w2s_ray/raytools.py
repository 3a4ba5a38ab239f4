"""Ray plumbing shared by the stages: starting or joining Ray, waiting on tasks, an actor pool.

It imports Ray core only (not Ray Data or Tune), because Ray workers import it too.

`init_ray` joins `ray.address` / RAY_ADDRESS when given (a cluster, or `ray job submit`),
otherwise starts an embedded local Ray. `run.RunContext.ray()` calls it only when a stage has
work to do, after the config and any user data have been validated, so bad input never costs a
Ray start and a fully cached run starts no Ray at all.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Hashable, Iterable, Iterator, TypeVar

import ray
import torch

from w2s_ray.config import RayConfig

T = TypeVar("T")


def init_ray(cfg: RayConfig) -> None:
    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level="WARNING")
        return
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": "WARNING"}
    if cfg.num_cpus:
        kwargs["num_cpus"] = cfg.num_cpus
    if cfg.object_store_mb:
        kwargs["object_store_memory"] = cfg.object_store_mb * 1024 * 1024
    ray.init(**kwargs)


def alive_nodes() -> int:
    return sum(1 for n in ray.nodes() if n.get("Alive"))


def gpu_device() -> str:
    """The device a Ray worker should use: a GPU when Ray gave it one, else the CPU."""
    return "cuda" if ray.is_initialized() and ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"


def as_completed(running: dict[Any, T]) -> Iterator[tuple[T, Any]]:
    """Yield `(tag, ref)` for each task of `running` (ref → tag) as it finishes; the caller
    `ray.get`s the ref (and may catch its error). Tasks added to `running` while iterating are
    waited on too, so a caller can resubmit or keep a fixed number of tasks in flight."""
    while running:
        [ref], _ = ray.wait(list(running), num_returns=1)
        yield running.pop(ref), ref


def parallel_map(fn: Callable, items: Iterable, num_cpus: float = 1.0) -> list:
    """`map` as Ray tasks, results in input order."""
    task = ray.remote(num_cpus=num_cpus)(_call)
    return ray.get([task.remote(fn, item) for item in items])


def _call(fn: Callable, item: Any) -> Any:
    return fn(item)


class ActorPool:
    """Long-lived actors of one kind, started on demand and reused between calls.

    Starting an actor costs about a second (a worker process importing torch), so a study that
    trains many ensembles reuses them. Actors hold their CPUs/GPUs while alive: the owner
    (`run.RunContext`) releases them when a stage no longer needs them, and on exit.
    """

    def __init__(self) -> None:
        self.key: Hashable | None = None
        self.actors: list = []

    def get(self, key: Hashable, n: int, start: Callable[[], Any]) -> list:
        """`n` actors started by `start()`; a different `key` (resources) starts fresh ones."""
        if key != self.key:
            self.release()
            self.key = key
        self.actors += [start() for _ in range(n - len(self.actors))]
        return self.actors[:n]

    def replace(self, dead, start: Callable[[], Any]):
        """A fresh actor in place of one Ray gave up on (restarts used up, or its node gone)."""
        ray.kill(dead)
        new = start()
        self.actors[self.actors.index(dead)] = new
        return new

    def release(self) -> None:
        if ray.is_initialized():
            for actor in self.actors:
                ray.kill(actor)
        self.actors, self.key = [], None


def progress(label: str, done: int, total: int, extra: str = "") -> None:
    """A bar redrawn in place on a terminal; one plain line per update in a log file or pipe."""
    if not sys.stderr.isatty():
        sys.stderr.write(f"{label}: {done}/{total} {extra}".rstrip() + "\n")
        sys.stderr.flush()
        return
    width = 30
    filled = int(width * done / max(total, 1))
    sys.stderr.write(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {extra}")
    if done >= total:
        sys.stderr.write("\n")
    sys.stderr.flush()
