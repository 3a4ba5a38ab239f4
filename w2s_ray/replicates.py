"""Replicates: summaries over student seeds (and teacher draws) with 95% CIs, paired
differences, and verdicts computed from the CI. Plain numpy/scipy, no Ray.

Every student number the report prints comes from `summarize` over its replicates: n, mean, sd
and a Student-t interval (n − 1 degrees of freedom; over 5 seeds the half-width is 2.78 sd/√5,
against 1.96 for a normal interval, which at n = 5 would cover about 88%, not 95%). Two
settings are compared on the same seeds (and the same teacher draws) by `paired`: the CI of the
mean per-replicate difference, which removes what the seed does to both, the main source of
spread here (student seed sd 0.016–0.054 in `configs/w2s_window.yaml`).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import stats

Verdict = str  # "supported" | "not supported" | "inconclusive"


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Student-t CI of the mean; (nan, nan) below two values."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) < 2:
        return math.nan, math.nan
    half = stats.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))
    return float(v.mean() - half), float(v.mean() + half)


def summarize(values: Sequence[float], level: float = 0.95) -> dict[str, float | int | list[float] | None]:
    """n, mean, sd, CI of finite values (NaN values, e.g. an undefined PGR, are left out and
    counted out of n)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return {"n": 0, "mean": math.nan, "sd": None, "ci": None}
    lo, hi = t_interval(v, level)
    return {"n": int(len(v)), "mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else None,
            "ci": [lo, hi] if len(v) > 1 else None}


def paired(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> dict[str, float | int | list[float] | None]:
    """The mean of a_i − b_i over replicates paired by index (same seed, same teacher draw), its
    sd and CI, and a two-sided paired t-test p-value."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired comparison of {len(a)} and {len(b)} replicates")
    out = summarize(a - b, level)
    d = (a - b)[np.isfinite(a - b)]
    out["p"] = float(stats.ttest_1samp(d, 0.0).pvalue) if len(d) > 1 and d.std() > 0 else math.nan
    return out


def fisher_ci(x: Sequence[float], y: Sequence[float], level: float = 0.95) -> dict[str, float | int | list[float] | None]:
    """Pearson r of paired points with its Fisher-z CI (n = the number of points)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    r = float(np.corrcoef(x, y)[0, 1])
    z, se = np.arctanh(r), 1 / math.sqrt(len(x) - 3)
    q = stats.norm.ppf(0.5 + level / 2)
    return {"n": len(x), "mean": r, "sd": None, "ci": [float(np.tanh(z - q * se)), float(np.tanh(z + q * se))]}


def verdict(ci: Sequence[float] | None, direction: int = 1) -> Verdict:
    """From a CI of an effect whose predicted sign is `direction`: supported when the CI excludes
    0 on that side, not supported when it excludes 0 on the other side, else inconclusive."""
    if ci is None or not all(np.isfinite(ci)):
        return "inconclusive"
    lo, hi = sorted(float(c) * direction for c in ci)
    if lo > 0:
        return "supported"
    if hi < 0:
        return "not supported"
    return "inconclusive"


def fmt(s: dict, digits: int = 4) -> str:
    """`mean [lo, hi] (n)` for tables."""
    if s["n"] == 0:
        return "n/a"
    if s["ci"] is None:
        return f"{s['mean']:.{digits}f} (n={s['n']})"
    lo, hi = s["ci"]
    return f"{s['mean']:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}] (n={s['n']})" if s.get("p") is not None else f"{s['mean']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}] (n={s['n']})"
