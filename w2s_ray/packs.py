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
from w2s_ray.models import MLP, Logistic, build_model


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


def pack_batches(seeds: list[int], index_sets: list[np.ndarray], epochs: int, batch_size: int) -> Iterator[torch.Tensor]:
    """`[K, batch]` row indices, step after step: row k is teacher k's `batch_order`, drawn a
    whole epoch at a time for the pack (one `np.stack` an epoch, not one a step: 7% of a pack
    of 32 MLP teachers' training, profiled)."""
    rngs = [np.random.default_rng([s, 1]) for s in seeds]
    for _ in range(epochs):
        perms = torch.as_tensor(np.stack([idx[rng.permutation(len(idx))] for rng, idx in zip(rngs, index_sets)]))
        for s in range(0, perms.shape[1], batch_size):
            yield perms[:, s : s + batch_size]


def init_model(model_cfg: ModelConfig, in_dim: int, n_classes: int, seed: int) -> torch.nn.Module:
    """The model with its initial parameters drawn from `seed`, on the CPU. Seeds the CPU
    generator alone: `torch.manual_seed` also seeds every accelerator's lazily, capturing a stack
    trace per backend, 2% of a pack of 32 MLP teachers' work (profiled); the draws are the same."""
    torch.default_generator.manual_seed(seed)
    return build_model(model_cfg, in_dim, n_classes)


LOG_PROB_ROWS = 4096
"""Rows per chunk of `TeacherPack.log_probs`: callers that predict in blocks use multiples of
it, so the log-probs are the bits of one call."""

CHAIN_BYTES = 4 * 2**20
"""Bytes of hidden units per step of a linear chain's prediction (`TeacherPack.log_probs`): a
pack of 64 MLP-32 teachers on 4,096 rows holds 32 MB of them, which the bias, ReLU and
log-softmax passes each stream from memory; a group of teachers at a time keeps them in cache.
Groups of teachers, not of rows: under the pinned numerics (`w2s_ray.numerics`, `MKL_CBWR`) a
row's bits depend on how many rows its GEMM has (rows 510-511 of 512 differed from the same rows
of a 1,024-row GEMM), while each teacher's GEMM is its own in any pack of two or more (with 2
threads a teacher alone differed: its GEMM was split across the threads, `workers.MIN_PACK`)."""


def linear_chain(model: torch.nn.Module) -> list[str] | None:
    """The parameter-name prefixes of `model`'s linear layers in order, when it is a chain of
    `nn.Linear` layers with a ReLU between each two (the built-in `mlp` and `logistic`), else
    None. Only those exact classes: a subclass may compute something else."""
    if type(model) is MLP:
        return [f"net.{i}" for i, layer in enumerate(model.net) if isinstance(layer, torch.nn.Linear)]
    if type(model) is Logistic:
        return ["linear"]
    return None


def chain_forward(layers: list[tuple[torch.Tensor, torch.Tensor]], h: torch.Tensor, keep: list | None = None) -> torch.Tensor:
    """Logits `[K, B, C]` of K stacked linear-ReLU chains on `h` `[K, B, D]` (a stride-0 expand
    when the teachers share their rows); `keep`, if given, receives each layer's input. The ops
    are those autograd runs for one teacher's `nn.Linear` layers, batched, with the bias added
    and the ReLU applied in place: with `chain_backward`, each teacher ends with the bits it
    gets trained alone (`tests/test_packs.py`)."""
    last = len(layers) - 1
    for i, (w, b) in enumerate(layers):
        if keep is not None:
            keep.append(h)
        h = torch.bmm(h, w.transpose(1, 2)).add_(b.unsqueeze(1))
        if i < last:
            h.relu_()
    return h


def chain_backward(layers: list[tuple[torch.Tensor, torch.Tensor]], inputs: list[torch.Tensor], d: torch.Tensor) -> None:
    """Set `.grad` of every layer's stacked weight and bias from `d`, the gradient of the loss
    with respect to the logits `[K, B, C]`, and the layers' inputs kept by `chain_forward`.
    The ops autograd runs for one teacher's `nn.Linear` (the weight gradient `dᵀ·input` as one
    GEMM into the weight's `[out, in]` layout, the bias gradient a sum over the batch,
    `threshold_backward` for the ReLU), batched: each teacher's parameters are the bits of the
    same teacher trained alone as a plain module (`train_one`, one thread). `vmap`'s autograd
    computes the weight gradient as `(inputᵀ·d)ᵀ`, a GEMM of the transposed shape and a copy:
    other rounding (up to 7e-8 after 4 epochs), and measured side by side on one thread, 64
    MLP-32 teachers, 7 alternated rounds in fresh processes: the pack step 1.15× faster this way
    (`benchmarks/README.md`, "The weight gradient in the weight's layout")."""
    for i in range(len(layers) - 1, -1, -1):
        w, b = layers[i]
        b.grad = d.sum(1)
        w.grad = torch.bmm(d.transpose(1, 2), inputs[i])
        if i > 0:
            d = torch.ops.aten.threshold_backward(torch.bmm(d, w), inputs[i], 0)


def mean_ce_grad(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The gradient of `cross_entropy(logits, y).mean()` (`losses.log_softmax`'s formula) with
    respect to `logits` `[..., B, C]`, per row `softmax / B - onehot / B`, computed as autograd
    computes it: `((1/B) / Σ exp) · exp(z - max)` and `-1/B` added at the label. Overwrites
    `logits`."""
    flat = logits.view(-1, logits.shape[-1])
    e = flat.sub_(flat.amax(-1, keepdim=True)).exp_()
    inv_b = torch.ones((), device=logits.device).div(logits.shape[-2])
    e.mul_(inv_b.div(e.sum(-1, keepdim=True)))
    return e.scatter_add_(-1, y.reshape(-1, 1), inv_b.neg().expand(len(e), 1)).view(logits.shape)


class TeacherPack:
    def __init__(
        self,
        model_cfg: ModelConfig,
        in_dim: int,
        n_classes: int,
        seeds: list[int],
        device: str | torch.device = "cpu",
        compile: bool = False,
        autograd: bool = False,
    ):
        """`autograd` forces the `vmap` path with autograd even for a linear chain (which the
        written-out chain matches to float rounding, not to the bit: `chain_backward`);
        `compile` implies it."""
        models = [init_model(model_cfg, in_dim, n_classes, s) for s in seeds]
        params, buffers = stack_module_state(models)
        self.device = torch.device(device)
        self.params = {k: v.detach().to(self.device).requires_grad_() for k, v in params.items()}
        self.buffers = {k: v.to(self.device) for k, v in buffers.items()}
        self.seeds = list(seeds)
        chain = None if compile or autograd else linear_chain(models[0])
        # a chain's step and predictions written out (`chain_forward`): measured on 1 thread,
        # 64 MLP-32 teachers, 1.5x the autograd step through `vmap` (the elementwise ops run
        # in place, no autograd graph); each teacher the bits of it trained alone
        self._layers = None if chain is None else [(self.params[f"{n}.weight"], self.params[f"{n}.bias"]) for n in chain]
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
        steps = 0
        for idx in pack_batches(self.seeds, index_sets, epochs, batch_size):
            idx = idx.to(self.device)
            flat = idx.reshape(-1)
            xb = x.index_select(0, flat).view(*idx.shape, -1)
            yb = y.index_select(0, flat).view(idx.shape)
            opt.zero_grad(set_to_none=True)
            if self._layers is None:
                self._loss(self.params, xb, yb).backward()
            else:
                with torch.no_grad():
                    inputs: list[torch.Tensor] = []
                    logits = chain_forward(self._layers, xb, inputs)
                    chain_backward(self._layers, inputs, mean_ce_grad(logits, yb))
            opt.step()
            steps += 1
        return steps * self.k

    @torch.no_grad()
    def log_probs(self, x: torch.Tensor, chunk: int = LOG_PROB_ROWS) -> torch.Tensor:
        """`[K, N, C]` log-probabilities of every teacher on the same inputs."""
        if self._layers is not None:
            return self._chain_log_probs(x, chunk)
        out = []
        for s in range(0, len(x), chunk):
            xb = x[s : s + chunk].to(self.device)
            out.append(log_softmax(self._shared(self.params, self.buffers, xb)).cpu())
        return torch.cat(out, 1)

    def _chain_log_probs(self, x: torch.Tensor, chunk: int) -> torch.Tensor:
        """`log_probs` of a linear chain, a group of teachers at a time (`CHAIN_BYTES`)."""
        out = torch.empty(self.k, len(x), self._layers[-1][0].shape[1])
        widest = max(w.shape[1] for w, _ in self._layers)
        starts = list(range(0, self.k, max(2, CHAIN_BYTES // (4 * chunk * widest))))
        if len(starts) > 1 and self.k - starts[-1] < 2:
            starts.pop()  # a group of one teacher: its GEMM alone may take other threads' blocking
        for s in range(0, len(x), chunk):
            xb = x[s : s + chunk].to(self.device)
            for k0, k1 in zip(starts, starts[1:] + [self.k]):
                layers = [(w[k0:k1], b[k0:k1]) for w, b in self._layers]
                z = chain_forward(layers, xb.expand(k1 - k0, -1, -1))
                z.sub_(z.amax(-1, keepdim=True))  # `losses.log_softmax`, in place
                out[k0:k1, s : s + len(xb)] = z.sub_(z.exp().sum(-1, keepdim=True).log_())
        return out

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
