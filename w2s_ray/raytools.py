"""Ray plumbing shared by the stages: starting or joining Ray, waiting on tasks, an actor pool.

It imports Ray core only (not Ray Data or Tune), because Ray workers import it too.

`init_ray` joins `ray.address` / RAY_ADDRESS when given (a cluster, or `ray job submit`),
otherwise starts an embedded local Ray. `run.RunContext.ray()` calls it only when a stage has
work to do, after the config and any user data have been validated, so bad input never costs a
Ray start and a fully cached run starts no Ray at all.
"""

from __future__ import annotations

import logging
import math
import os
import re
import signal
import sys
import time
from contextlib import suppress
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

import ray
import torch
from tqdm import tqdm

from w2s_ray import numerics
from w2s_ray.config import RayConfig
from w2s_ray.errors import W2SError

T = TypeVar("T")


def init_ray(cfg: RayConfig) -> None:
    if ray.is_initialized():
        return
    plain_text_logs()
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        key = "ray.address" if cfg.address else "RAY_ADDRESS"
        try:
            ray.init(address=address, logging_level="WARNING", runtime_env=numerics.runtime_env())
        except (ConnectionError, ValueError, RuntimeError) as err:
            raise W2SError(f"{key}: cannot join Ray at {address!r}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
        return
    end_orphans()
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": "WARNING", "runtime_env": numerics.runtime_env()}
    if address == "local":  # a new local Ray even when one was started on this machine (`ray start`)
        kwargs["address"] = "local"
    if cfg.num_cpus:
        kwargs["num_cpus"] = cfg.num_cpus
    if cfg.object_store_mb:
        kwargs["object_store_memory"] = cfg.object_store_mb * 1024 * 1024
    ray.init(**kwargs)


def orphans() -> list[int]:
    """This user's Ray worker and agent processes (`ray::…`) whose raylet is gone: their parent
    is now init (pid 1). A live cluster's workers and agents are the raylet's children; its
    raylet and GCS themselves are not named `ray::`. Linux only (reads /proc); else none."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if proc.stat().st_uid != os.getuid():
                continue
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == 1 and (proc / "cmdline").read_bytes().startswith(b"ray::"):
                found.append(int(proc.name))
        except (OSError, ValueError, IndexError):  # gone meanwhile, or not ours to read
            continue
    return found


def end_orphans(grace_s: float = 2.0) -> int:
    """End what a killed driver's embedded Ray left behind (its agents and workers outlive it
    by a minute or two: measured after a SIGKILL), before a new embedded Ray starts; returns
    how many were ended."""
    pids = orphans()
    for pid in pids:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and set(orphans()) & set(pids):
        time.sleep(0.1)
    for pid in set(orphans()) & set(pids):
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + grace_s  # a killed process takes a moment to exit on a loaded machine
    while time.monotonic() < deadline and set(orphans()) & set(pids):
        time.sleep(0.05)
    if pids:
        print(f"[w2s-ray] ended {len(pids)} Ray processes left by an earlier run that was killed", file=sys.stderr, flush=True)
    return len(pids)


def check_placeable(need: dict[str, float], keys: dict[str, str], cluster: dict[str, float] | None = None,
                    what: str = "a task", wait_s: float = 0.0, poll_s: float = 5.0) -> None:
    """Refuse work the cluster cannot place, before submitting it: Ray would wait for it
    forever, repeating "No available node types can fulfill ..." every 35 s. `need` is the
    largest single request (`{"CPU": 1, "GPU": 0.5}`), `keys` names the config key of each
    resource, so the message says what to change. Against the live cluster (`cluster` None)
    it waits up to `wait_s` (`ray.placement_wait_s`: an autoscaling cluster adding nodes),
    saying so every 30 s, before it refuses."""
    t0, said = time.monotonic(), None
    while True:
        have = ray.cluster_resources() if cluster is None else cluster
        short = {k: (v, have.get(k, 0.0)) for k, v in need.items() if v > have.get(k, 0.0) + 1e-9}
        if not short:
            return
        asked = "; ".join(f"{keys[k]} asks for {v:g} {k} for {what} (the cluster has {got:g})" for k, (v, got) in short.items())
        now = time.monotonic()
        if cluster is not None or now - t0 >= wait_s:
            waited = f" after waiting {now - t0:.0f}s" if wait_s and cluster is None else ""
            raise W2SError(f"{asked}: it could never start{waited}. Lower it, or join a cluster that has it (on an autoscaling "
                           "cluster, start the nodes first, or let the run wait for them: ray.placement_wait_s)")
        if said is None or now - said >= 30:
            print(f"[w2s-ray] {asked}: waiting up to {wait_s:g}s for the cluster to grow (ray.placement_wait_s)", file=sys.stderr, flush=True)
            said = now
        time.sleep(min(poll_s, max(0.0, wait_s - (now - t0))))


ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class PlainText:
    """A text stream that drops ANSI escape sequences on their way to the one it wraps."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        return self.stream.write(ANSI.sub("", text))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def plain_text_logs() -> None:
    """The lines Ray forwards from workers to the driver carry ANSI colour codes: the task
    prefix (RAY_COLOR_PREFIX=0 turns it off) and the "[repeated 8x across cluster]" of its log
    deduplication (always green). A log file, a pipe or `ray job logs` gets plain text: the
    driver's stdout and stderr, where they are not a terminal, drop the codes."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if not stream.isatty() and not isinstance(stream, PlainText):
            os.environ.setdefault("RAY_COLOR_PREFIX", "0")
            setattr(sys, name, PlainText(stream))


def alive_nodes() -> int:
    return sum(1 for n in ray.nodes() if n.get("Alive"))


def configure_ray_data() -> None:
    """Ray 2.60's V2 Parquet reader starts many footer-reader actors: 25 s for 3,000 rows on 2 cores.

    The V1 reader does the same read in 0.2 s. w2s-ray uses V1 unless RAY_DATA_USE_DATASOURCE_V2
    says otherwise; the context flag decides even when `ray.data` was imported before this ran.
    Called before every Ray Data use (the label stream across Ray Train workers, the embed stage's encoder pool).
    """
    os.environ.setdefault("RAY_DATA_USE_DATASOURCE_V2", "0")
    import ray.data  # here: Ray Data costs every command 0.6 s of start-up, and only some stages use it

    ctx = ray.data.DataContext.get_current()
    ctx.use_datasource_v2 = os.environ["RAY_DATA_USE_DATASOURCE_V2"] not in ("0", "false", "False")
    ctx.enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # its one line says the progress bars we just turned off are off: not a warning for users
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def actor_pool_map(cls: type, args: tuple, items: list[int], num_actors: int, num_cpus: float, num_gpus: float) -> Iterator[dict]:
    """Ray Data's actor pool over `items`: `map_batches(cls, fn_constructor_args=args)` with one
    item per batch, on `num_actors` actors of `num_cpus` CPUs and `num_gpus` GPUs each. Each
    actor builds `cls(*args)` once (a model, loaded once per actor) and is called with
    `{"item": array([i])}`; it returns one small summary row per item, which this yields as
    its item finishes. The actors write what they compute themselves: no row of it passes
    through the driver. Ray Data retries an item whose actor died."""
    configure_ray_data()
    import ray.data  # here: see `configure_ray_data`

    ds = ray.data.from_items([{"item": i} for i in items], override_num_blocks=len(items))
    ds = ds.map_batches(cls, fn_constructor_args=args, batch_size=1, compute=ray.data.ActorPoolStrategy(size=num_actors),
                        num_cpus=num_cpus, num_gpus=num_gpus or None)
    for row in ds.iter_rows():
        yield {k: v.item() if hasattr(v, "item") else v for k, v in row.items()}


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


class Progress:
    """Progress of a stage: a tqdm bar on a terminal, one plain line per update otherwise (a log
    file, `ray job logs`, CI), so updates never run together on one line.

    Only the driver draws; work inside Ray tasks reports through lines it prints (Ray forwards
    them to the driver's log, prefixed with the task's name), see `epoch_printer`."""

    def __init__(self, label: str, total: int, done: int = 0, unit: str = "it") -> None:
        self.label, self.total, self.done = label, total, done
        self.bar = tqdm(total=total, initial=done, desc=label, unit=unit, file=sys.stderr, dynamic_ncols=True) if sys.stderr.isatty() else None
        if self.bar is None:
            self._line()

    def update(self, n: int = 1, extra: str = "") -> None:
        self.done += n
        if self.bar is not None:
            self.bar.set_postfix_str(extra, refresh=False)
            self.bar.update(n)
        else:
            self._line(extra)

    def _line(self, extra: str = "") -> None:
        sys.stderr.write(f"{self.label}: {self.done}/{self.total} {extra}".rstrip() + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def epoch_printer(name: str, epochs: int, every_s: float = 2.0) -> Callable[[dict], None]:
    """Per-epoch progress of a model trained inside a Ray task: a line on the task's stderr (which
    Ray forwards to the driver's stderr: stdout holds the results table alone) at most every
    `every_s` seconds, and for the first and last epoch."""
    last = [-math.inf]

    def show(rec: dict) -> None:
        now = time.monotonic()
        if now - last[0] >= every_s or rec["epoch"] in (1, epochs):
            last[0] = now
            print(f"{name}: epoch {rec['epoch']}/{epochs}, holdout loss {rec['holdout_loss']:.4f}, best epoch {rec['best_epoch']}",
                  file=sys.stderr, flush=True)

    return show
