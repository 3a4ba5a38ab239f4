import pandas as pd
import pytest
import torch

from conftest import small_config
from w2s_ray.study import fit_rate, powers_of_two, run_theory_study, run_variance_study
from w2s_ray.theory import TheoryConfig, ridge_fit, run_theory, squared_distance


def test_squared_distance_matches_the_closed_form_for_linear_teachers():
    # f_a(x) = <w_a, x>, x ~ N(0, I): E (f_a − f_b)² = ‖w_a − w_b‖²
    g = torch.Generator().manual_seed(0)
    w_a, w_b = torch.randn(8, generator=g, dtype=torch.float64), torch.randn(8, generator=g, dtype=torch.float64)
    x = torch.randn(400_000, 8, generator=g, dtype=torch.float64)
    est = float(squared_distance(x @ w_a, x @ w_b))
    assert est == pytest.approx(float(((w_a - w_b) ** 2).sum()), rel=0.01)


def test_ridge_fit_primal_and_dual_forms_agree_with_the_normal_equations():
    g = torch.Generator().manual_seed(1)
    for n, p in ((50, 10), (10, 50)):
        phi, y = torch.randn(n, p, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
        a = ridge_fit(phi, y, 0.1)
        direct = torch.linalg.solve(phi.T @ phi / n + 0.1 * torch.eye(p, dtype=torch.float64), phi.T @ y / n)
        assert torch.allclose(a, direct, atol=1e-8)


def test_wide_students_approach_the_posterior_mean_not_single_teachers():
    rows = run_theory(TheoryConfig(k=16, n_transfer=4000, n_test=2000, widths=(4, 64, 1024)))
    d = [r["dist_to_posterior_mean"] for r in rows]
    assert d[0] > d[1] > d[2]
    last = rows[-1]
    assert last["dist_to_single_teachers"] > 10 * last["dist_to_posterior_mean"]
    # mean_k ‖s − f_k‖² = ‖s − f̄‖² + teacher variance (squared-loss bias–variance identity)
    assert last["dist_to_single_teachers"] == pytest.approx(last["dist_to_posterior_mean"] + last["teacher_variance"], rel=1e-6)
    assert last["one_teacher_student_dist_to_teacher0"] < rows[0]["one_teacher_student_dist_to_teacher0"]


def test_rate_fit_recovers_a_known_power_law():
    import numpy as np

    ks = np.array([2, 4, 8, 16, 32])
    slope, intercept = fit_rate(ks, 3.0 / ks)
    assert slope == pytest.approx(-1.0) and np.exp(intercept) == pytest.approx(3.0)
    assert powers_of_two(64) == [2, 4, 8, 16, 32, 64] and powers_of_two(48) == [2, 4, 8, 16, 32, 48]


def test_study_reports_are_written(ray_session, tmp_path):
    cfg = small_config(tmp_path, teachers={"k": 16, "epochs": 3, "model": {"name": "mlp", "width": 8}})
    out = run_variance_study(cfg)
    table = pd.read_parquet(out / "scaling.parquet")
    assert table["K"].tolist() == [2, 4, 8, 16]
    assert table["kl_full_to_K"].iloc[-1] == pytest.approx(0.0, abs=1e-9)
    assert (table["kl_full_to_K"].iloc[:-1] > 0).all()
    assert (table["acc_dual_lo"] <= table["acc_dual_hi"]).all()
    for f in ("report.md", "scaling.png", "summary.json"):
        assert (out / f).stat().st_size > 0
    assert "scaling.png" in (out / "report.md").read_text()
    sources = pd.read_parquet(out / "sources.parquet")
    assert sources["resample"].tolist() == ["seed", "bootstrap", "disjoint"]
    assert (sources["teacher_variance"] > 0).all()
    theory = run_theory_study(cfg)
    assert (theory / "theory.png").stat().st_size > 0 and len(pd.read_parquet(theory / "theory.parquet")) == len(TheoryConfig().widths)
    runs = pd.read_parquet(theory / "runs.parquet")
    assert len(runs) == 3 * 3 * 2 + 4 and set(runs["target"]) == {"single", "arith_mean", "dual_mean"}
    assert (runs["kl_to_teachers"] > runs["kl_to_dual_mean"]).all()  # plus the teacher variance
    bv = pd.read_parquet(theory / "bias_variance.parquet")
    assert len(bv) == 3 and bv["risk"].to_numpy() == pytest.approx((bv["bias"] + bv["variance"]).to_numpy(), rel=1e-5)
    assert (theory / "runs.png").stat().st_size > 0 and "Gain vs misfit" in (theory / "report.md").read_text()
    regimes = pd.read_parquet(theory / "regimes.parquet")
    assert len(regimes) == 4 and regimes["pgr_dual_mean_vs_teacher"].notna().all()
    # the window regime's teachers see less than the default's
    assert regimes["mean_teacher_acc"].iloc[2] != regimes["mean_teacher_acc"].iloc[0]
