"""Evaluation metrics: plain torch, no Ray. Inputs are log-probabilities `[N, C]`.

`gold_ce` lives in `posterior` (the bias–variance split needs it) and is re-exported here."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from w2s_ray.posterior import entropy_from_probs, gold_ce, kl


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


def wilson_interval(acc: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of an accuracy measured on `n` independent examples."""
    centre = (acc + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(acc * (1 - acc) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def pgr(student: float, weak: float, ceiling: float) -> float:
    """Performance gap recovered: (student − weak) / (ceiling − weak); NaN when there is no gap to
    recover (the ceiling is not above the weak reference), where the ratio means nothing."""
    gap = ceiling - weak
    return (student - weak) / gap if gap > 1e-12 else math.nan


@dataclass(frozen=True)
class StudentEval:
    """How a student does: the one set of columns the student stage, Tune trials and studies share."""

    test_acc: float
    test_gold_ce: float
    misfit: float  # mean KL(student ‖ its target) on the transfer split
    entropy_test: float
    agree_ensemble_test: float
    agree_single_test: float
    misfit_holdout: float = math.nan  # mean KL(student ‖ its target) on the held-out transfer slice (rows it never trained on)


def evaluate_student(
    log_test: torch.Tensor,
    y_test: torch.Tensor,
    log_transfer: torch.Tensor,
    target_log_transfer: torch.Tensor,
    ensemble_log_test: torch.Tensor,
    single_log_test: torch.Tensor,
    holdout: torch.Tensor | None = None,
) -> StudentEval:
    """A student's log-probs on test (gold `y_test`) and on transfer (against the target it
    learned from; `holdout`: the transfer rows it was not trained on, where the misfit is also
    measured), and its agreement with the dual posterior mean and the single teacher."""
    return StudentEval(
        test_acc=accuracy(log_test, y_test),
        test_gold_ce=gold_ce(log_test, y_test),
        misfit=misfit(log_transfer, target_log_transfer),
        entropy_test=mean_entropy(log_test),
        agree_ensemble_test=agreement(log_test, ensemble_log_test),
        agree_single_test=agreement(log_test, single_log_test),
        misfit_holdout=misfit(log_transfer[holdout], target_log_transfer[holdout]) if holdout is not None else math.nan,
    )
