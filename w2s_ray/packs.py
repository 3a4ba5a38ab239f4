"""A pack of K teachers trained at once with stacked parameters (`torch.func` + `vmap`).

Why a pack: a weak teacher is tiny, so one model per step wastes the device on launch and
Python overhead; stacking K teachers' parameters turns K small matmuls into one batched one.

Each teacher is a pure function of its seed: its initialisation (`torch.manual_seed(seed)`),
its resample of the weak-gold split (`teacher_indices`) and its batch order (`batch_order`)
all come from that seed alone. So a teacher trains to the same parameters in any pack, alone,
or on any node, which is what lets a lost pack be retrained and an ensemble be extended.
Adam is elementwise, so one Adam over stacked parameters is K independent Adams.
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Iterator

import numpy as np
import torch
from torch.func import functional_call, stack_module_state, vmap

from w2s_ray.adam import Adam
from w2s_ray.config import ModelConfig
from w2s_ray.losses import cross_entropy, log_softmax
from w2s_ray.models import build_model


def teacher_seed(base_seed: int, teacher_id: int) -> int:
    return int(base_seed) * 1_000_003 + int(teacher_id)


def _bootstrap(n: int, k_total: int, teacher_id: int, seed: int, base_seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=n)


def _same_rows(n: int, k_total: int, teacher_id: int, seed: int, base_seed: int) -> np.ndarray:
    return np.arange(n)


def _disjoint(n: int, k_total: int, teacher_id: int, seed: int, base_seed: int) -> np.ndarray:
    per = n // k_total
    perm = np.random.default_rng(base_seed).permutation(n)
    return np.sort(perm[teacher_id * per : (teacher_id + 1) * per])


# name (the config's `teachers.resample`) → rows(n, k_total, teacher_id, seed, base_seed)
RESAMPLERS: dict[str, Callable[[int, int, int, int, int], np.ndarray]] = {
    "bootstrap": _bootstrap,  # a bootstrap resample drawn from the teacher's seed
    "seed": _same_rows,  # every teacher on the same rows: only init and batch order differ
    "disjoint": _disjoint,  # K disjoint subsets of one permutation (depends on K)
}


def teacher_indices(resample: str, n: int, k_total: int, teacher_id: int, seed: int, base_seed: int) -> np.ndarray:
    """Which weak-gold rows teacher `teacher_id` trains on (always the same length across teachers)."""
    if resample not in RESAMPLERS:
        raise ValueError(f"unknown resample {resample!r}; schemes: {sorted(RESAMPLERS)}")
    return RESAMPLERS[resample](n, k_total, teacher_id, seed, base_seed)


def batch_order(seed: int, indices: np.ndarray, epochs: int, batch_size: int) -> Iterator[np.ndarray]:
    """The teacher's own shuffled batches, epoch after epoch."""
    rng = np.random.default_rng([seed, 1])
    for _ in range(epochs):
        perm = indices[rng.permutation(len(indices))]
        for s in range(0, len(perm), batch_size):
            yield perm[s : s + batch_size]


def init_model(model_cfg: ModelConfig, in_dim: int, n_classes: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(model_cfg, in_dim, n_classes)


LOG_PROB_ROWS = 4096
"""Rows per chunk of `TeacherPack.log_probs`: callers that predict in blocks use multiples of
it, so the log-probs are the bits of one call."""


class TeacherPack:
    def __init__(
        self,
        model_cfg: ModelConfig,
        in_dim: int,
        n_classes: int,
        seeds: list[int],
        device: str | torch.device = "cpu",
        compile: bool = False,
    ):
        models = [init_model(model_cfg, in_dim, n_classes, s) for s in seeds]
        params, buffers = stack_module_state(models)
        self.device = torch.device(device)
        self.params = {k: v.detach().to(self.device).requires_grad_() for k, v in params.items()}
        self.buffers = {k: v.to(self.device) for k, v in buffers.items()}
        self.seeds = list(seeds)
        base = copy.deepcopy(models[0]).to("meta")

        def one(p, b, x):
            return functional_call(base, (p, b), (x,))

        self._batched = vmap(one)  # x: [K, B, D]
        self._shared = vmap(one, in_dims=(0, 0, None))  # x: [B, D], same for all teachers

        def loss_fn(params, x, y):
            logits = self._batched(params, self.buffers, x)  # [K, B, C]
            # sum over teachers of each teacher's mean loss: each gets its own gradient
            return cross_entropy(logits.flatten(0, 1), y.flatten()).sum() / x.shape[1]

        self._loss: Callable = torch.compile(loss_fn) if compile else loss_fn

    @property
    def k(self) -> int:
        return len(self.seeds)

    def fit(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        index_sets: list[np.ndarray],
        epochs: int,
        batch_size: int,
        lr: float,
        weight_decay: float = 0.0,
    ) -> int:
        """Train every teacher on its own rows and batch order; returns teacher-steps taken."""
        x, y = x.to(self.device), y.to(self.device)
        opt = make_adam(self.params.values(), lr, weight_decay, self.device)
        orders = [batch_order(s, idx, epochs, batch_size) for s, idx in zip(self.seeds, index_sets)]
        steps = 0
        for batches in zip(*orders):
            idx = torch.as_tensor(np.stack(batches), device=self.device)
            flat = idx.reshape(-1)
            xb = x.index_select(0, flat).view(*idx.shape, -1)
            yb = y.index_select(0, flat).view(idx.shape)
            opt.zero_grad(set_to_none=True)
            self._loss(self.params, xb, yb).backward()
            opt.step()
            steps += 1
        return steps * self.k

    @torch.no_grad()
    def log_probs(self, x: torch.Tensor, chunk: int = LOG_PROB_ROWS) -> torch.Tensor:
        """`[K, N, C]` log-probabilities of every teacher on the same inputs."""
        out = []
        for s in range(0, len(x), chunk):
            xb = x[s : s + chunk].to(self.device)
            out.append(log_softmax(self._shared(self.params, self.buffers, xb)).cpu())
        return torch.cat(out, 1)

    def state_dicts(self) -> list[dict[str, torch.Tensor]]:
        return [{k: v[i].detach().cpu().clone() for k, v in self.params.items()} for i in range(self.k)]


def make_adam(params, lr: float, weight_decay: float, device: str | torch.device) -> Adam:
    """Adam as torch's multi-tensor (`foreach`) kernels, never the fused one.

    Measured (MLP and CNN teachers, 1 and 2 threads, packs of 1–64): the fused CPU Adam gave
    teacher 0 different log-probabilities (up to 4.8e-7) in packs of 1, 3, 7 and 11 MLP teachers
    (1, 2, 3 CNN teachers) than in a pack of 64. It updates a stacked parameter of K teachers
    as one flat range, vectorized with a scalar tail whose rounding differs, and which elements
    fall in the tail depends on K. The foreach kernels are bitwise the same for every pack size
    (a pack of one CNN teacher aside: `workers.MIN_PACK`), and were as fast: a pack of 64 MLP
    teachers 0.99 s against 0.95 s fused, 64 CNN teachers 1.37 s against 1.57 s. `device` is
    kept so that callers need not change when a device needs its own choice. The update is
    `adam.Adam`'s: torch's foreach Adam, the same bits, without importing `torch._dynamo`."""
    del device
    return Adam(params, lr=lr, weight_decay=weight_decay, foreach=True)


def train_one(
    model_cfg: ModelConfig,
    x: torch.Tensor,
    y: torch.Tensor,
    n_classes: int,
    seed: int,
    indices: np.ndarray,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float = 0.0,
) -> torch.nn.Module:
    """One teacher trained alone as a plain module: the reference a pack must reproduce."""
    model = init_model(model_cfg, x.shape[1], n_classes, seed).to(x.device)
    opt = make_adam(model.parameters(), lr, weight_decay, x.device)
    for b in batch_order(seed, indices, epochs, batch_size):
        b = torch.as_tensor(b, device=x.device)
        opt.zero_grad(set_to_none=True)
        cross_entropy(model(x[b]), y[b]).mean().backward()
        opt.step()
    return model


def steps_per_teacher(n_rows: int, epochs: int, batch_size: int) -> int:
    return epochs * math.ceil(n_rows / batch_size)
