"""The run report: rows by role, PGR only where it means something."""

import numpy as np
import pandas as pd
import pytest


def test_pgr_is_not_a_number_when_the_ceiling_is_not_above_the_weak_reference():
    from w2s_ray.metrics import StudentEval
    from w2s_ray.report import format_table, results_rows
    from w2s_ray.results import PosteriorSummary, StudentResult, StudentStage

    def student(target, acc):
        return StudentResult(target, StudentEval(acc, 1.0, 0.1, 1.0, 0.5, 0.5), 3, 3, 100, 1.0, "cpu")

    post = PosteriorSummary(8, 0.56, 0.56, 0.5, [0.55, 0.57], [0.55, 0.57], 0.1, 0.1, 0.1, 1.0, 0.9)
    rows = results_rows(np.array([0.50, 0.52, 0.54]), post, StudentStage({"dual_mean": [student("dual_mean", 0.58)]}, [student(None, 0.55)]), 0)
    row = next(r for r in rows if r["role"] == "student")
    assert row["pgr_vs_teacher"] == pytest.approx((0.58 - 0.52) / (0.55 - 0.52))  # the ceiling is above the mean teacher
    assert np.isnan(row["pgr_vs_ensemble"]) and row["pgr_vs_ensemble_note"] == "n/a: the ceiling (0.5500) is not above the ensemble (0.5600)"
    table = format_table(rows)
    assert "n/a" in table and "PGR n/a: the ceiling (0.5500) is not above the ensemble (0.5600)" in table


def test_wilson_interval_matches_its_closed_form():
    from w2s_ray.metrics import wilson_interval

    lo, hi = wilson_interval(0.8, 100)
    assert (lo, hi) == pytest.approx((0.7111, 0.8666), abs=1e-4)  # the textbook values for 80/100
    assert wilson_interval(0.0, 50)[0] == pytest.approx(0.0, abs=1e-12) and wilson_interval(1.0, 50)[1] == pytest.approx(1.0)


def test_replicate_summaries_and_verdicts():
    from scipy import stats

    from w2s_ray.replicates import paired, summarize, verdict

    a = np.array([0.50, 0.52, 0.49, 0.55, 0.51])
    b = a - np.array([0.01, 0.02, 0.015, 0.01, 0.02])
    s = summarize(a)
    lo, hi = stats.t.interval(0.95, 4, loc=a.mean(), scale=stats.sem(a))
    assert s["n"] == 5 and s["ci"] == pytest.approx([lo, hi]) and s["sd"] == pytest.approx(a.std(ddof=1))
    d = paired(a, b)
    assert d["mean"] == pytest.approx(0.015) and d["p"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert verdict(d["ci"]) == "supported" and verdict(d["ci"], direction=-1) == "not supported"
    assert verdict([-0.01, 0.02]) == "inconclusive" and verdict(None) == "inconclusive"
    assert summarize([0.5, float("nan")])["n"] == 1 and summarize([0.5])["ci"] is None  # one value: no CI


def test_crossed_interval_counts_seeds_and_test_rows():
    """The seed + test-row variance of a crossed design against the true variance of its grand
    mean (simulated), the two-level bootstrap's, and `paired` when rows add nothing."""
    from w2s_ray.replicates import crossed, paired, paired_rows, summarize, two_level_means, two_level_weights

    rng = np.random.default_rng(0)
    n, rows, s_seed, s_row, s_both = 5, 300, 0.02, 0.3, 0.3
    true = s_seed**2 / n + s_row**2 / rows + s_both**2 / (n * rows)
    se2, covered, seeds_only, boot = [], [], [], []
    for t in range(300):
        v = rng.normal(0, s_seed, (n, 1)) + rng.normal(0, s_row, (1, rows)) + rng.normal(0, s_both, (n, rows))
        c = crossed(v)
        se2.append(c["se_seed"] ** 2 + c["se_rows"] ** 2)
        covered.append(c["ci"][0] <= 0 <= c["ci"][1])
        lo, hi = summarize(v.mean(1))["ci"]
        seeds_only.append(lo <= 0 <= hi)
        if t < 20:
            boot.append(two_level_means(v, *two_level_weights(n, rows, 400, seed=t)).var() / se2[-1])
    # wide by at most the interaction counted twice (s_both² / (n·rows)): 1.14 here
    assert 1.0 < np.mean(se2) / true < 1 + 2 * s_both**2 / (n * rows) / true
    assert np.mean(covered) >= 0.95 and 0.8 < np.mean(boot) < 1.25
    # a CI over seeds alone, conditional on one test set, misses the rows' term
    assert np.mean(seeds_only) < 0.9  # 0.82 here
    a = rng.normal(size=(5, 1)) * np.ones((1, 40))
    b = a - rng.normal(0.01, 0.005, size=(5, 1))
    assert paired_rows(a, b)["ci"] == pytest.approx(paired(a[:, 0], b[:, 0])["ci"]) and paired_rows(a, b)["se_rows"] == pytest.approx(0, abs=1e-12)
    assert paired_rows(a, b)["p"] == pytest.approx(paired(a[:, 0], b[:, 0])["p"])


def test_fisher_interval_of_a_correlation():
    from scipy import stats

    from w2s_ray.replicates import fisher_ci

    rng = np.random.default_rng(0)
    x = rng.normal(size=20)
    y = -x + rng.normal(size=20)
    c = fisher_ci(x, y)
    r = stats.pearsonr(x, y)
    lo, hi = r.confidence_interval(0.95)  # scipy's own Fisher interval
    assert c["n"] == 20 and c["mean"] == pytest.approx(r.statistic) and c["ci"] == pytest.approx([lo, hi])


def test_search_figures_of_a_one_point_search_draw_without_warnings(tmp_path):
    """A one-point search (one value per axis, an undefined PGR) draws its figures quietly:
    matplotlib's warnings would land in the user's log."""
    import warnings

    from w2s_ray.report import plot_capacity, plot_heatmaps
    from w2s_ray.storage import RunDir

    run = RunDir.open(str(tmp_path), "r")
    one = pd.DataFrame({"student.model.width": [8], "student.rce_weight": [0.0], "test_acc": [0.5], "pgr_vs_teacher": [float("nan")]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot_heatmaps(run, one, run / "heatmap.png")
        plot_capacity(run, one.drop(columns=["student.model.width"]), run / "capacity.png")
    assert (run / "heatmap.png").stat().st_size > 0 and (run / "capacity.png").stat().st_size > 0
