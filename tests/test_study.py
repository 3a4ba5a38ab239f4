"""The studies: the squared-loss math, then each study section, its work in this process
(`executor.InProcess`, the bits a Ray run gives: `test_pipeline.py`)."""

import functools
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from conftest import run_dir, small_config
from w2s_ray.executor import InProcess
from w2s_ray.pipeline import run_stages, run_study
from w2s_ray.run import RunContext
from w2s_ray.studies import STUDIES, theory, variance
from w2s_ray.ridge_example import TheoryConfig, ridge_fit, run_theory, squared_distance


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
    ks = np.array([2, 4, 8, 16, 32])
    slope, intercept = variance.fit_rate(ks, 3.0 / ks)
    assert slope == pytest.approx(-1.0) and np.exp(intercept) == pytest.approx(3.0)
    assert variance.powers_of_two(64) == [2, 4, 8, 16, 32, 64] and variance.powers_of_two(48) == [2, 4, 8, 16, 32, 48]


def test_the_cli_knows_every_study():
    from w2s_ray.cli import STUDY_KINDS

    assert set(STUDY_KINDS) == set(STUDIES)


def study_config(tmp_path):
    return small_config(tmp_path, teachers={"k": 16, "epochs": 3, "model": {"name": "mlp", "width": 8}})


def test_variance_study_report(warm, tmp_path):
    out = run_study("variance", warm(tmp_path, study_config, "labels"), InProcess())
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


@pytest.fixture(scope="module")
def ensemble(warm, tmp_path_factory):
    cfg = warm(tmp_path_factory.mktemp("theory"), study_config, "labels")
    with RunContext.open(cfg, InProcess()) as ctx:
        yield ctx, run_stages(ctx, "labels")


def test_theory_students_section(ensemble, tmp_path):
    ctx, stages = ensemble
    lines = theory.students_section(ctx, stages, tmp_path)
    assert "Gain vs misfit" in "\n".join(lines) and (tmp_path / "runs.png").stat().st_size > 0
    runs = pd.read_parquet(tmp_path / "runs.parquet")
    assert len(runs) == 3 * 3 * 2 + theory.SEEDS and set(runs["target"]) == {"single", "arith_mean", "dual_mean"}
    assert (runs["kind"] == "seeds").sum() == theory.SEEDS
    assert {"test_acc", "test_gold_ce", "misfit", "entropy_test", "agree_ensemble_test"} <= set(runs.columns)  # the student stage's columns
    assert (runs["kl_to_teachers"] > runs["kl_to_dual_mean"]).all()  # plus the teacher variance
    bv = pd.read_parquet(tmp_path / "bias_variance.parquet")
    assert len(bv) == 3 and bv["risk"].to_numpy() == pytest.approx((bv["bias"] + bv["variance"]).to_numpy(), rel=1e-5)


@pytest.mark.slow
def test_theory_study_report_with_regimes(warm, tmp_path, monkeypatch):
    # the students section has its own test; here the report is composed with two regimes
    monkeypatch.setattr(theory, "REGIMES", {k: theory.REGIMES[k] for k in ("default", "teacher window 20, no shifts")})
    monkeypatch.setattr(theory, "students_section", lambda ctx, stages, out: ["", "## students (tested on its own)"])
    # the squared-loss example at a smaller size (its numbers have their own test above; at full
    # size its width-4096 ridge fit alone takes 8 s here)
    small = functools.partial(TheoryConfig, k=8, n_transfer=2000, n_test=1000, widths=(4, 64, 256))
    monkeypatch.setattr(theory, "TheoryConfig", small)
    out = run_study("theory", warm(tmp_path, study_config, "labels"), InProcess())
    assert (out / "theory.png").stat().st_size > 0 and list(pd.read_parquet(out / "theory.parquet")["width"]) == [4, 64, 256]
    report = (out / "report.md").read_text()
    assert "squared-loss example" in report and "students (tested on its own)" in report and "Where the student generalizes" in report
    regimes = pd.read_parquet(out / "regimes.parquet")
    assert len(regimes) == 2 and regimes["pgr_dual_mean_vs_teacher"].notna().all()
    # the window regime's teachers see less than the default's
    assert regimes["mean_teacher_acc"].iloc[1] != regimes["mean_teacher_acc"].iloc[0]


@pytest.mark.slow  # 7 s in process: kept out of the fast tier's minute
def test_claims_study_computes_each_verdict_from_its_ci(warm, tmp_path):
    """C1, C2, C5, C6 over 5 seeds, C3 (P5) over 10 teacher draws per width; the effects
    recomputed here from the saved per-student test predictions and the teachers' own, the C2
    identity exact, each verdict the one its CI implies."""
    from w2s_ray.posterior import bregman_variance, kl
    from w2s_ray.studies import claims

    out = run_study("claims", warm(tmp_path, study_config, "labels"), InProcess())
    table = pd.read_parquet(out / "claims.parquet").set_index("claim")
    assert list(table.index) == ["C1", "C2", "C2b", "C3", "C3b", "S1", "C4", "C5", "C5b", "C6"]
    n = claims.REPLICATES
    assert (table["n"] == n).all() and claims.DRAWS == n == 10
    # C4 is tested only where the confidence term lowered the entropy (its own CI)
    assert (table.loc["C4", "verdict_all"] == "not tested") == ("not tested" in table.loc["C4", "measurement"])
    # two disjoint seed sets: a verdict is final only when both agree
    for c in table.index.drop("C4") if table.loc["C4", "verdict_all"] == "not tested" else table.index:
        a, b = table.loc[c, ["verdict_A", "verdict_B"]]
        assert table.loc[c, "verdict"] == (a if a == b else "not replicated"), c
    widths = pd.read_parquet(out / "widths.parquet")
    ws = claims.widths(study_config(tmp_path))
    assert sorted(set(widths["width"])) == ws
    d = widths[widths["target"] == "dual_mean"]
    lo_w, hi_w = (d[d["width"] == w].sort_values("seed")["kl_to_dual_mean"].to_numpy() for w in (ws[0], ws[-1]))
    assert table.loc["S1", "effect"] == pytest.approx(np.mean(hi_w - lo_w))
    for c, sign in (("C3", -1), ("C3b", -1), ("S1", -1), ("C2b", -1), ("C1", 1), ("C6", 1)):
        for tag in ("", "_A", "_B"):
            lo, hi = sorted(sign * table.loc[c, [f"ci_lo{tag}", f"ci_hi{tag}"]].to_numpy())
            assert table.loc[c, f"verdict{tag or '_all'}"] == ("supported" if lo > 0 else "not supported" if hi < 0 else "inconclusive"), (c, tag)
    lo, hi = table.loc["C2", ["ci_lo", "ci_hi"]]
    assert table.loc["C2", "verdict_all"] == ("inconclusive" if lo <= 0 <= hi else "not supported")  # a point claim is never "supported"
    # C3 from the files: the Bregman variance of the single-teacher students, by its definition
    students = pd.read_parquet(out / "students.parquet")

    def logps(run, target):
        dirs = students[(students["run"] == run) & (students["target"] == target)].sort_values("replicate")["dir"]
        return torch.stack([torch.tensor(np.stack(pd.read_parquet(f"{x}/test_logp.parquet")["logp"].to_numpy())).double() for x in dirs])

    bv = {w: float(bregman_variance(logps(f"width {w}", "single")).mean()) for w in (ws[0], ws[-1])}
    assert table.loc["C3", "effect"] == pytest.approx(bv[ws[-1]] - bv[ws[0]], rel=1e-6)
    p5 = pd.read_parquet(out / "p5_draws.parquet").set_index("width")
    assert p5.loc[ws[0], "bv_students"] == pytest.approx(bv[ws[0]], rel=1e-6) and (p5["n_draws"] == claims.DRAWS).all()
    q = torch.tensor(np.stack(pd.read_parquet(next(run_dir(study_config(tmp_path)).path.glob("labels/*/test_posterior.parquet")))["logt_dual"].to_numpy())).double()
    c3b = [float(kl(logps(f"width {ws[-1]}", "single")[i], q).mean() - kl(logps(f"width {ws[0]}", "single")[i], q).mean()) for i in range(claims.DRAWS)]
    assert table.loc["C3b", "effect"] == pytest.approx(np.mean(c3b), rel=1e-6)
    assert (p5["bv_students_ci_lo"] <= p5["bv_students"]).all() and (p5["bv_students"] <= p5["bv_students_ci_hi"]).all()
    c2 = pd.read_parquet(out / "c2_summary.parquet").set_index("target")
    dec0 = pd.read_parquet(out / "c2_decomposition.parquet")
    single = dec0[dec0["target"] == "single"]
    assert c2.loc["single", "gain_over_misfit"] == pytest.approx(single["gain"].mean() / single["misfit"].mean())
    assert c2.loc["single", "variance_in_misfit"] == 0 and c2.loc["dual_mean", "variance_in_misfit"] > 0
    y = pd.read_parquet(next(run_dir(study_config(tmp_path)).path.glob("data/*/test.parquet")))["y"].to_numpy()

    def acc(run, target, i):
        d = students[(students["run"] == run) & (students["target"] == target) & (students["replicate"] == i)]["dir"].item()
        logp = np.stack(pd.read_parquet(f"{d}/test_logp.parquet")["logp"].to_numpy())
        return float((logp.argmax(-1) == y).mean())

    c1 = [acc("main", "dual_mean", i) - acc("main", "single", i) for i in range(n)]
    assert table.loc["C1", "effect"] == pytest.approx(np.mean(c1), abs=1e-6)
    # its CI counts the test rows beside the seeds: per row, per replicate, correct(dual) − correct(single)
    hits = {t: np.stack([np.stack(pd.read_parquet(f"{d}/test_logp.parquet")["logp"].to_numpy()).argmax(-1) == y
                         for d in students[(students["run"] == "main") & (students["target"] == t)].sort_values("replicate")["dir"]])
            for t in ("dual_mean", "single")}
    diff = hits["dual_mean"].astype(float) - hits["single"].astype(float)
    se = np.hypot(diff.mean(1).std(ddof=1) / np.sqrt(n), diff.mean(0).std(ddof=1) / np.sqrt(diff.shape[1]))
    half = stats.t.ppf(0.975, n - 1) * se
    assert table.loc["C1", ["ci_lo", "ci_hi"]].tolist() == pytest.approx([diff.mean() - half, diff.mean() + half], abs=1e-9)
    assert table.loc["C1", "se_rows"] > 0
    assert table.loc["C1", "effect_A"] == pytest.approx(np.mean(c1[:5]), abs=1e-6) and table.loc["C1", "effect_B"] == pytest.approx(np.mean(c1[5:]), abs=1e-6)
    dec = pd.read_parquet(out / "c2_decomposition.parquet")
    assert len(dec) == 2 * n and dec["identity_error"].max() < 1e-6 and sorted(set(dec["teacher"].dropna())) == list(range(n))
    lam = pd.read_parquet(out / "c5_rce.parquet")
    assert lam["lambda"].tolist() == list(claims.LAMBDAS) and (lam["n"] == n).all()
    c4 = [acc("confidence", "dual_mean", i) - acc("rce 0.0", "dual_mean", i) for i in range(n)]
    assert table.loc["C4", "effect"] == pytest.approx(np.mean(c4), abs=1e-6)
    c5 = [acc("rce 0.5", "dual_mean", i) - acc("rce 0.0", "dual_mean", i) for i in range(n)]
    assert lam.set_index("lambda").loc[0.5, "acc_minus_lambda0"] == pytest.approx(np.mean(c5), abs=1e-6)
    assert table.loc["C5", "verdict"] in ("supported", "not supported", "inconclusive") and "P5" in (out / "report.md").read_text()


def test_weighting_study_pairs_each_rule_with_the_plain_student_over_the_same_seeds(warm, tmp_path):
    """Three dual-mean students per seed (none, variance, drop_disputed) on one ensemble; each
    paired difference recomputed here from the students' own results, the verdict the one its
    CI implies; a weighted student differs from the plain one and shares its ceiling."""
    from w2s_ray.replicates import paired
    from w2s_ray.studies import weighting

    cfg = warm(tmp_path, study_config, "labels").model_copy(deep=True)
    cfg = cfg.model_copy(update={"student": cfg.student.model_copy(update={"seeds": 3})})
    out = run_study("weighting", cfg, InProcess())
    t = pd.read_parquet(out / "weighting.parquet").set_index("rule")
    assert list(t.index) == list(weighting.RULES) and (t["n"] == 6).all()  # two sets of 3 seeds
    with RunContext.open(cfg, InProcess()) as ctx:  # all cached: the study trained them
        done = {r: run_stages(ctx.derive(weighting.rule_config(cfg, r)), "student") for r in weighting.RULES}
    accs = {r: [s.test_acc for s in done[r].students.replicates["dual_mean"]] for r in weighting.RULES}
    for r in ("variance", "drop_disputed"):
        d = paired(accs[r], accs["none"])
        assert t.loc[r, "diff_vs_none"] == pytest.approx(d["mean"]) and [t.loc[r, "diff_lo"], t.loc[r, "diff_hi"]] == pytest.approx(d["ci"])
        a, b = (weighting.verdict(paired(accs[r][i:i + 3], accs["none"][i:i + 3])) for i in (0, 3))
        assert (t.loc[r, "verdict_A"], t.loc[r, "verdict_B"]) == (a, b) and t.loc[r, "verdict"] == (a if a == b else "not replicated")
        assert done[r].students.dirs[("dual_mean", 0)] != done["none"].students.dirs[("dual_mean", 0)]
    assert "Weighting study" in (out / "report.md").read_text()
