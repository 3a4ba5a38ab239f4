"""MNIST-1D generated offline, in seeded chunks that Ray tasks can make in parallel.

A module of its own because each generation task imports it: it needs numpy and the `mnist1d`
package only (the data stage's other sources bring scikit-learn and Parquet code, 2 s more per
worker on 2 cores).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from w2s_ray.config import DataConfig

MNIST1D_FEATURES = 40
"""Positions per signal (`mnist1d`'s `final_seq_length`, checked by a test): a constant, so that
importing this module does not import `mnist1d`, which imports matplotlib and scipy (0.6 s of
every command's start, measured)."""


def mnist1d_chunk(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`n` MNIST-1D samples from the package's own `make_dataset` (never its download path)."""
    import mnist1d.data

    args = mnist1d.data.get_dataset_args()
    args.num_samples = n
    args.train_split = 1.0
    args.seed = int(seed)
    d = mnist1d.data.make_dataset(args)
    return d["x"].astype(np.float32), d["y"].astype(np.int64)


def mnist1d_plan(cfg: DataConfig) -> list[tuple[int, int]]:
    """(size, seed) per chunk; sizes are multiples of 10 because make_dataset balances classes."""
    total = -(-cfg.num_samples // 10) * 10
    chunk = max(10, cfg.chunk_size // 10 * 10)
    sizes = [min(chunk, total - s) for s in range(0, total, chunk)]
    return [(n, cfg.seed * 100_003 + i) for i, n in enumerate(sizes)]


def load_mnist1d(cfg: DataConfig, map_fn: Callable = map) -> tuple[np.ndarray, np.ndarray]:
    parts = list(map_fn(lambda a: mnist1d_chunk(*a), mnist1d_plan(cfg)))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
