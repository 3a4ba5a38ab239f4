"""A seeded synthetic source of MNIST-1D's shape (40 positions, 10 classes) for scale runs.

MNIST-1D's own generator makes about 1,400 samples a second per core here (a million rows: 6
minutes on 2 cores), so `benchmarks/bench_scale.py` uses this one: per class a smooth random
template, per sample a random circular shift, amplitude and Gaussian noise, 10^6 rows a second
per core. It is a classification task of MNIST-1D's flavour (position-invariant templates under
noise), not a replacement for it in results. Chunks are seeded like MNIST-1D's, so the data
stage builds it the same way.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from w2s_ray.config import DataConfig

FEATURES, CLASSES = 40, 10


def templates(seed: int) -> np.ndarray:
    """`[C, 40]` smooth templates: white noise smoothed by a circular moving average, unit sd."""
    raw = np.random.default_rng([seed, 7]).normal(size=(CLASSES, FEATURES))
    kernel = np.ones(5) / 5
    smooth = np.stack([np.convolve(np.tile(r, 3), kernel, "same")[FEATURES : 2 * FEATURES] for r in raw])
    return (smooth - smooth.mean(1, keepdims=True)) / smooth.std(1, keepdims=True)


def synthetic_chunk(n: int, seed: int, data_seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    shift = rng.integers(-6, 7, n)
    pos = (np.arange(FEATURES)[None, :] - shift[:, None]) % FEATURES
    x = np.take_along_axis(templates(data_seed)[y], pos, 1) * rng.uniform(0.6, 1.4, (n, 1)) + rng.normal(0, 1.0, (n, FEATURES))
    return x.astype(np.float32), y.astype(np.int64)


def load_synthetic(cfg: DataConfig, map_fn: Callable = map) -> tuple[np.ndarray, np.ndarray]:
    sizes = [min(cfg.chunk_size, cfg.num_samples - s) for s in range(0, cfg.num_samples, cfg.chunk_size)]
    parts = list(map_fn(lambda a: synthetic_chunk(*a), [(n, cfg.seed * 100_003 + i, cfg.seed) for i, n in enumerate(sizes)]))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
