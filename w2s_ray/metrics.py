"""Evaluation metrics: plain torch, no Ray. Inputs are log-probabilities `[N, C]`."""

from __future__ import annotations

import math

import torch

from w2s_ray.posterior import entropy_from_probs, kl


def accuracy(log_probs: torch.Tensor, labels: torch.Tensor) -> float:
    return float((log_probs.argmax(-1) == labels).float().mean())


def agreement(log_p: torch.Tensor, log_q: torch.Tensor) -> float:
    """Fraction of examples where two predictors pick the same class."""
    return float((log_p.argmax(-1) == log_q.argmax(-1)).float().mean())


def misfit(student_log: torch.Tensor, target_log: torch.Tensor, log_floor: float = -1e4) -> float:
    """Mean KL(student ‖ target): the paper's measure of how far the student left its teacher."""
    return float(kl(student_log, target_log.clamp_min(log_floor)).mean())


def mean_entropy(log_probs: torch.Tensor) -> float:
    return float(entropy_from_probs(log_probs.exp()).mean())


def gold_ce(log_probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Cross-entropy risk on gold labels (= KL to the one-hot label)."""
    return float(-log_probs.gather(-1, labels.view(-1, 1)).mean())


def pgr(student: float, weak: float, ceiling: float) -> float:
    """Performance gap recovered: (student − weak) / (ceiling − weak); NaN when the gap is 0."""
    gap = ceiling - weak
    return (student - weak) / gap if abs(gap) > 1e-12 else math.nan
