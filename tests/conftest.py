"""Shared fixtures: one real local Ray (2 CPUs) for the whole session, started only if a test asks."""

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # token auth is on by default in Ray 2.60
os.environ.setdefault("RAY_DATA_USE_DATASOURCE_V2", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from w2s_ray.config import parse_config  # noqa: E402
from w2s_ray.storage import RunDir  # noqa: E402


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=400 * 1024**2, logging_level="WARNING")
    yield ray
    ray.shutdown()


def small_config(tmp_path: Path, **sections):
    """A pipeline config that runs in seconds on 2 CPUs."""
    base = {
        "data": {"source": "mnist1d", "num_samples": 1500, "chunk_size": 500, "n_weak": 300, "n_transfer": 600, "n_test": 500},
        "teachers": {"k": 8, "epochs": 20, "model": {"name": "mlp", "width": 16}},
        "posterior": {"n_boot": 20},
        "student": {"model": {"name": "mlp", "width": 64, "depth": 2}, "epochs": 4, "patience": 10},
        "output": {"root": str(tmp_path / "runs"), "name": "t"},
    }
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    return parse_config(base, "test")


def run_dir(cfg) -> RunDir:
    """The run directory a config's stages work in (the local copy, for a store)."""
    return RunDir.open(cfg.output.root, cfg.output.name, cfg.output.cache)
