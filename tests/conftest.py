"""Shared fixtures: one real local Ray (2 CPUs) for the whole session, started only if a test asks."""

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # token auth is on by default in Ray 2.60
os.environ.setdefault("RAY_DATA_USE_DATASOURCE_V2", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from w2s_ray import numerics  # noqa: E402

# the test process computes as a run's driver does: pinned before torch loads (`w2s_ray.numerics`),
# so what it recomputes from a run's files is the same bits as the run's workers
numerics.pin_this_process()

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from w2s_ray.config import parse_config  # noqa: E402
from w2s_ray.storage import RunDir  # noqa: E402


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        # the workers start as a run's do: pinned numerics (`w2s_ray.numerics`)
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=400 * 1024**2, logging_level="WARNING", runtime_env=numerics.runtime_env())
    yield ray
    ray.shutdown()


def popen_interruptible(cmd: list, **kwargs):
    """`subprocess.Popen(cmd, start_new_session=True, **kwargs)` for a test that sends the child
    SIGINT, as Ctrl-C in a terminal does. A shell starts a background job (`pytest … &` in a
    script) with SIGINT ignored, its children inherit that, and Python then installs no
    KeyboardInterrupt handler: the child would never see the test's Ctrl-C (a full suite launched
    that way failed `test_ctrl_c_stops_with_one_line_and_exit_130` with exit 0, reproduced with
    `(python … &)`). A handler set here is reset to the default in the child at exec, so the child
    starts as a foreground command does, however this suite was started."""
    import signal
    import subprocess

    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(cmd, start_new_session=True, **kwargs)
    finally:
        signal.signal(signal.SIGINT, old)


def small_config(tmp_path: Path, **sections):
    """A pipeline config that runs in seconds on 2 CPUs."""
    base = {
        "data": {"source": "mnist1d", "num_samples": 1500, "chunk_size": 500, "n_weak": 300, "n_transfer": 600, "n_test": 500},
        "teachers": {"k": 8, "epochs": 20, "model": {"name": "mlp", "width": 16}},
        "posterior": {"n_boot": 20},
        "student": {"model": {"name": "mlp", "width": 64, "depth": 2}, "epochs": 4, "patience": 10, "seeds": 1},
        "output": {"root": str(tmp_path / "runs"), "name": "t"},
    }
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    return parse_config(base, "test")


def run_dir(cfg) -> RunDir:
    """The run directory a config's stages work in (the local copy, for a store)."""
    return RunDir.open(cfg.output.root, cfg.output.name, cfg.output.cache)


@pytest.fixture(scope="session")
def warm(tmp_path_factory):
    """`warm(tmp_path, make=small_config, until="report")`: the config `make(tmp_path)` with its
    run directory already holding every stage up to `until`, as a cache hit. The stages are
    computed once per session and per (`make`, `until`), in this process (`executor.InProcess`:
    the bits a Ray run writes, `test_pipeline.py` checks), and copied, so each test owns its
    files. No Ray: a test that needs it asks for `ray_session`."""
    from w2s_ray.executor import InProcess
    from w2s_ray.pipeline import run_pipeline

    built: dict[tuple, Path] = {}

    def make_warm(tmp_path: Path, make=small_config, until: str = "report"):
        key = (make.__module__, make.__qualname__, until)
        if key not in built:
            root = tmp_path_factory.mktemp("warm")
            run_pipeline(make(root), until=until, executor=InProcess())
            built[key] = root
        cfg = make(tmp_path)
        src = run_dir(make(built[key])).path
        shutil.copytree(src, run_dir(cfg).path, dirs_exist_ok=True, ignore=shutil.ignore_patterns("tune", "report", "results.*", "summary.png", "tensorboard"))
        return cfg

    return make_warm


ALONGSIDE = ("tests/test_readme.py", "tests/test_benchmarks.py", "tests/test_nodes.py")
"""The suite runs in two pytest-xdist workers (`-n 2 --dist loadgroup`, pyproject's addopts),
each taking one group of tests whole. These files go to one worker: the README's commands and
the benchmark smokes run only `w2s-ray` and script processes (about 260 s together, one after
another), and the node tests start and kill Ray nodes and drivers, so they run one after
another with the processes that start the most embedded Rays (each start first ends what a
killed driver left: `raytools.end_orphans`). Everything else goes to the other worker, so the
session fixtures (`ray_session`, `warm`) are built once there. The other worker's tests wait on
Ray a third of the time (the CPU is 67% busy over them, one at a time), which the first group
fills. Measured on 2 cores, one run each: 516 s on a fresh clone and 522 s in a working tree with
this grouping, 576 s with the README and benchmark tests alone in the first group, against 627 s
one test at a time (a fresh clone of 05dfe72). `-n 0` runs everything in this process."""


def pytest_collection_modifyitems(config, items):
    for item in items:
        group = "alongside" if item.nodeid.startswith(ALONGSIDE) else "in_process"
        item.add_marker(pytest.mark.xdist_group(group))
