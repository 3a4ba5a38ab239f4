"""The run report: rows by role, PGR only where it means something."""

import numpy as np
import pytest


def test_pgr_is_not_a_number_when_the_ceiling_is_not_above_the_weak_reference():
    from w2s_ray.metrics import StudentEval
    from w2s_ray.report import format_table, results_rows
    from w2s_ray.run import PosteriorSummary, StudentResult, StudentStage

    def student(target, acc):
        return StudentResult(target, StudentEval(acc, 1.0, 0.1, 1.0, 0.5, 0.5), 3, 3, 100, 1.0, "cpu")

    post = PosteriorSummary(8, 0.56, 0.56, 0.5, [0.55, 0.57], [0.55, 0.57], 0.1, 0.1, 0.1, 1.0, 0.9)
    rows = results_rows(np.array([0.50, 0.52, 0.54]), post, StudentStage({"dual_mean": student("dual_mean", 0.58)}, student(None, 0.55)), 0)
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
