"""The bias–variance account's concrete example under squared loss, in plain torch (no Ray).

Gaussian inputs x ~ N(0, I_d) and a target y = f*(x) + noise. Each weak teacher k is a ridge
regressor on its own random-features view relu(W_k x) (p features, W_k drawn from the
teacher's seed), trained on its own few labelled samples. For squared loss the Bregman
generator is ½‖·‖², so the dual mean is the plain mean: the posterior-mean teacher is
f̄(x) = mean_k f_k(x), and the teacher variance is mean_k E_x (f_k − f̄)².

Students are random-features ridge models relu(V x) of growing width m, fit on the transfer
inputs. The student sees the teachers as a researcher with an ensemble does: each transfer
example is labelled by a teacher drawn at random from the K (a sample of the posterior over
teacher training). A student with enough capacity then converges to f̄, so its squared
distance to the posterior mean shrinks with width while its distance to any single teacher
stays at about the teacher variance. For contrast the same student is also fit to teacher 0
alone, where it converges to that one teacher instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TheoryConfig:
    d: int = 32
    teacher_features: int = 24
    n_gold: int = 48
    k: int = 32
    n_transfer: int = 20000
    n_test: int = 4000
    widths: tuple[int, ...] = (4, 16, 64, 256, 1024, 4096)
    ridge: float = 1e-2
    noise: float = 0.1
    seed: int = 0


def target_fn(x: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """A smooth non-linear target: a linear part plus a curved one."""
    z = x @ beta
    return z + 0.5 * torch.tanh(2 * z)


def features(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.relu(x @ w.T) / w.shape[0] ** 0.5


def ridge_fit(phi: torch.Tensor, y: torch.Tensor, lam: float) -> torch.Tensor:
    """argmin_a ‖phi a − y‖²/n + lam ‖a‖², solved in the smaller of the two dual forms; `y`
    may hold several targets as columns (`[n, t]`), which share the one Gram matrix."""
    n, p = phi.shape
    if p <= n:
        a = phi.T @ phi / n + lam * torch.eye(p, dtype=phi.dtype)
        return torch.linalg.solve(a, phi.T @ y / n)
    k = phi @ phi.T / n + lam * torch.eye(n, dtype=phi.dtype)
    return phi.T @ torch.linalg.solve(k, y / n)


def squared_distance(f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """E_x (f(x) − g(x))², estimated on the rows of the last dim."""
    return ((f - g) ** 2).mean(-1)


def run_theory(cfg: TheoryConfig) -> list[dict]:
    """One row per student width: distances to the posterior mean, to single teachers, and risks."""
    g = torch.Generator().manual_seed(cfg.seed)
    dt = torch.float64
    beta = torch.randn(cfg.d, generator=g, dtype=dt) / cfg.d**0.5
    x_tr = torch.randn(cfg.n_transfer, cfg.d, generator=g, dtype=dt)
    x_te = torch.randn(cfg.n_test, cfg.d, generator=g, dtype=dt)
    y_te = target_fn(x_te, beta)

    preds_tr, preds_te = [], []
    for k in range(cfg.k):
        gk = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 1 + k)
        w = torch.randn(cfg.teacher_features, cfg.d, generator=gk, dtype=dt)
        x = torch.randn(cfg.n_gold, cfg.d, generator=gk, dtype=dt)
        y = target_fn(x, beta) + cfg.noise * torch.randn(cfg.n_gold, generator=gk, dtype=dt)
        a = ridge_fit(features(x, w), y, cfg.ridge)
        preds_tr.append(features(x_tr, w) @ a)
        preds_te.append(features(x_te, w) @ a)
    f_tr, f_te = torch.stack(preds_tr), torch.stack(preds_te)  # [K, n]
    mean_te = f_te.mean(0)
    variance = float(squared_distance(f_te, mean_te).mean())
    teacher_risk = float(squared_distance(f_te, y_te).mean())

    pick = torch.randint(0, cfg.k, (cfg.n_transfer,), generator=g)
    y_sampled = f_tr[pick, torch.arange(cfg.n_transfer)]
    rows = []
    for m in cfg.widths:
        v = torch.randn(m, cfg.d, generator=torch.Generator().manual_seed(cfg.seed + 7 + m), dtype=dt)
        phi_tr, phi_te = features(x_tr, v), features(x_te, v)
        # both students in one fit: the Gram matrix (n·m² of the work) is built once, not twice
        s_post, s_one = (phi_te @ ridge_fit(phi_tr, torch.stack([y_sampled, f_tr[0]], 1), cfg.ridge)).T
        rows.append(
            {
                "width": m,
                "dist_to_posterior_mean": float(squared_distance(s_post, mean_te)),
                "dist_to_single_teachers": float(squared_distance(s_post.unsqueeze(0), f_te).mean()),
                "student_risk": float(squared_distance(s_post, y_te)),
                "one_teacher_student_dist_to_teacher0": float(squared_distance(s_one, f_te[0])),
                "one_teacher_student_dist_to_posterior_mean": float(squared_distance(s_one, mean_te)),
                "teacher_variance": variance,
                "mean_teacher_risk": teacher_risk,
                "posterior_mean_risk": float(squared_distance(mean_te, y_te)),
            }
        )
    return rows
