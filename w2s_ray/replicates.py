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
from scipy import special  # the t and normal quantiles; scipy.stats would add 0.4 s to every command's start

Verdict = str  # "supported" | "not supported" | "inconclusive"


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Student-t CI of the mean; (nan, nan) below two values."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) < 2:
        return math.nan, math.nan
    half = special.stdtrit(len(v) - 1, 0.5 + level / 2) * v.std(ddof=1) / math.sqrt(len(v))
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
    # the one-sample t-test of scipy.stats.ttest_1samp (equal up to the last bit)
    t = d.mean() / (d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 and d.std() > 0 else math.nan
    out["p"] = float(2 * special.stdtr(len(d) - 1, -abs(t))) if math.isfinite(t) else math.nan
    return out


def crossed(values: np.ndarray, level: float = 0.95) -> dict[str, float | int | list[float] | None]:
    """The mean of a `[n replicates, N test rows]` array of per-row values (a paired
    difference per row, or a per-row contribution to a statistic), with a CI over both seeds and
    test rows: the test set is a sample too.

    Replicates and rows are crossed (every replicate is scored on the same rows), so the grand
    mean's variance is σ²_seed/n + σ²_row/N + σ²_both/(nN). The seed term is estimated as
    `paired` does, from the n per-replicate means (their variance holds σ²_seed + σ²_both/N),
    the row term from the N per-row means over replicates (σ²_row + σ²_both/n); their sum counts
    σ²_both/(nN) twice, so it errs wide by at most the smaller term. The interval is Student-t
    on n − 1 degrees of freedom, as for seeds alone, so with no row variance it is `paired`'s.
    The percentile two-level bootstrap (`two_level_weights`, replicates and rows resampled
    together) is not the CI: at n = 5 it takes the seed variance (n − 1)/n too small and normal
    quantiles (1.96 against 2.78). Measured on the claims study's accuracy differences (C1, C5b,
    C6 on default and digits_views): its sd is 0.94–1.26× this se (it counts σ²_both/(nN) once
    more), but its interval is 0.66–0.87× as wide at n = 5 and 0.88–1.10× at n = 10.
    `tests/test_report.py` checks the variance against the true one of a simulated crossed
    design and against the bootstrap's."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 2:
        raise ValueError(f"crossed: values of shape {v.shape}, expected [replicates, rows]")
    n, rows = v.shape
    mean = float(v.mean())
    se_seed = float(v.mean(1).std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    se_rows = float(v.mean(0).std(ddof=1) / math.sqrt(rows)) if rows > 1 else 0.0
    out = {"n": n, "mean": mean, "sd": float(v.mean(1).std(ddof=1)) if n > 1 else None, "ci": None, "p": math.nan,
           "se_seed": se_seed, "se_rows": se_rows}
    if n > 1:
        se = math.sqrt(se_seed**2 + se_rows**2)
        half = float(special.stdtrit(n - 1, 0.5 + level / 2)) * se
        out["ci"] = [mean - half, mean + half]
        out["p"] = float(2 * special.stdtr(n - 1, -abs(mean) / se)) if se > 0 else math.nan
    return out


def paired_rows(a: np.ndarray, b: np.ndarray, level: float = 0.95) -> dict[str, float | int | list[float] | None]:
    """`crossed` of a − b: two settings scored per test row, paired by replicate and by row."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired comparison of arrays {a.shape} and {b.shape}")
    return crossed(a - b, level)


def two_level_weights(n: int, rows: int, boot: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`[boot, n]` and `[boot, rows]` resample counts of a two-level bootstrap: replicates and
    test rows drawn with replacement, independently, the same rows for every replicate of a
    resample (the design is crossed). A statistic's resample b weighs value [i, j] by
    w_rep[b, i] · w_row[b, j]."""
    g = np.random.default_rng(seed)
    w_rep = np.stack([np.bincount(g.integers(0, n, n), minlength=n) for _ in range(boot)]).astype(np.float64)
    w_row = np.stack([np.bincount(g.integers(0, rows, rows), minlength=rows) for _ in range(boot)]).astype(np.float64)
    return w_rep, w_row


def two_level_means(values: np.ndarray, w_rep: np.ndarray, w_row: np.ndarray) -> np.ndarray:
    """`[boot]` weighted grand means of a `[n, rows]` array under `two_level_weights`."""
    v = np.asarray(values, dtype=np.float64)
    return ((w_rep @ v) * w_row).sum(1) / (w_rep.sum(1) * w_row.sum(1))


def fisher_ci(x: Sequence[float], y: Sequence[float], level: float = 0.95) -> dict[str, float | int | list[float] | None]:
    """Pearson r of paired points with its Fisher-z CI (n = the number of points)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    r = float(np.corrcoef(x, y)[0, 1])
    z, se = np.arctanh(r), 1 / math.sqrt(len(x) - 3)
    q = special.ndtri(0.5 + level / 2)
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
