"""Studies: `variance` (ensemble scaling over K) and `theory` (the squared-loss example).

Each writes `<run>/study/<kind>/`: `report.md`, its PNG figures, and the table behind every
figure as Parquet.

The variance study trains (or extends, or reuses) one ensemble of K_max teachers and streams
its pack files once through one `PosteriorAccumulator` per K in 2, 4, ..., K_max, each fed
the teachers with id < K: memory depends on the number of K values and the split size, not on
K_max, and a later, larger K_max trains only the new teachers.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from w2s_ray import artifacts
from w2s_ray.config import ExperimentConfig


def powers_of_two(k_max: int) -> list[int]:
    ks = [2**i for i in range(1, int(math.log2(k_max)) + 1)]
    return ks if ks[-1] == k_max else ks + [k_max]


def fit_rate(ks: np.ndarray, dist: np.ndarray) -> tuple[float, float]:
    """Least-squares slope and intercept of log(dist) on log(K)."""
    slope, intercept = np.polyfit(np.log(ks), np.log(dist), 1)
    return float(slope), float(intercept)


def variance_table(cfg: ExperimentConfig, teacher_dir: Path, packs: list[int], y_test: np.ndarray, n_classes: int, n_boot: int = 50) -> pd.DataFrame:
    from w2s_ray.metrics import accuracy
    from w2s_ray.posterior import PosteriorAccumulator, kl
    from w2s_ray.teachers import read_pack_logp

    ks = powers_of_two(cfg.teachers.k)
    n = len(y_test)
    accs = {k: PosteriorAccumulator(n, n_classes, n_boot=n_boot, boot_seed=cfg.teachers.seed) for k in ks}
    for p in packs:
        ids, logp = read_pack_logp(teacher_dir, "test", p, cfg.teachers.k)
        if len(ids) == 0:
            continue
        logp = torch.tensor(logp)
        for k, acc in accs.items():
            rows = np.nonzero(ids < k)[0]
            if len(rows):
                acc.add(logp[rows], ids[rows].tolist())
    y = torch.from_numpy(y_test)
    full = accs[ks[-1]].finalize()
    out = []
    for k in ks:
        post = accs[k].finalize()
        ci = accs[k].bootstrap_accuracy(y, cfg.posterior.ci)
        out.append(
            {
                "K": k,
                "acc_dual": accuracy(post["dual_log"], y),
                "acc_dual_lo": ci["dual"][0],
                "acc_dual_hi": ci["dual"][1],
                "acc_arith": accuracy(post["arith"], y),
                "acc_arith_lo": ci["arith"][0],
                "acc_arith_hi": ci["arith"][1],
                "variance": float(post["variance"].mean()),
                "mutual_info": float(post["mutual_info"].mean()),
                "kl_full_to_K": float(kl(full["dual_log"], post["dual_log"]).mean()),
            }
        )
    return pd.DataFrame(out)


def md_section(title: str, text: str, table: pd.DataFrame, tables: str) -> list[str]:
    return ["", f"## {title}", "", text, "", table.to_markdown(index=False, floatfmt=".4f"), "", f"Tables: {tables}."]


def _fig(path: Path, draw) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from w2s_ray.report import save_figure

    fig = draw(plt)
    fig.tight_layout()
    save_figure(fig, path)


def run_variance_study(cfg: ExperimentConfig) -> Path:
    from w2s_ray.pipeline import RunState, log, stage_data, stage_teachers
    from w2s_ray.teachers import read_teacher_table

    st = RunState(cfg)
    data = stage_data(st)
    tdir = stage_teachers(st)
    manifest = artifacts.read_manifest(tdir, verify=False)
    out = artifacts.reset_dir(cfg.run_dir / "study" / "variance")
    log(f"study variance: posterior statistics for K = {powers_of_two(cfg.teachers.k)}")
    table = variance_table(cfg, tdir, manifest["packs"], data.splits["test"].y, data.n_classes)
    teachers = read_teacher_table(tdir, cfg.teachers.k).to_pandas()
    fit_rows = table[(table["K"] <= cfg.teachers.k // 4) & (table["kl_full_to_K"] > 0)]
    slope, intercept = fit_rate(fit_rows["K"].to_numpy(), fit_rows["kl_full_to_K"].to_numpy()) if len(fit_rows) >= 2 else (math.nan, math.nan)
    artifacts.write_parquet(out / "scaling.parquet", pa.Table.from_pandas(table, preserve_index=False))

    def draw(plt):
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
        ax = axes[0]
        for key, label in (("acc_dual", "dual mean"), ("acc_arith", "arithmetic mean")):
            line = ax.plot(table["K"], table[key], marker="o", label=label)[0]
            ax.fill_between(table["K"], table[f"{key}_lo"], table[f"{key}_hi"], color=line.get_color(), alpha=0.2)
        ax.axhline(teachers["acc_test"].mean(), color="gray", ls="--", label="mean single teacher")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("K teachers")
        ax.set_ylabel("gold test accuracy (95% CI over teachers)")
        ax.legend(fontsize=8)
        axes[1].plot(table["K"], table["variance"], marker="o", label="teacher variance")
        axes[1].plot(table["K"], table["mutual_info"], marker="s", label="mutual information")
        axes[1].set_xscale("log", base=2)
        axes[1].set_xlabel("K teachers")
        axes[1].legend(fontsize=8)
        ax = axes[2]
        ax.loglog(table["K"][:-1], table["kl_full_to_K"][:-1], marker="o", base=2, label="KL(full ‖ K)")
        if math.isfinite(slope):
            ks = fit_rows["K"].to_numpy()
            ax.loglog(ks, np.exp(intercept) * ks**slope, "k--", base=2, label=f"fit: slope {slope:.2f}")
        ax.set_xlabel("K teachers")
        ax.set_title(f"distance to the {cfg.teachers.k}-teacher posterior mean")
        ax.legend(fontsize=8)
        return fig

    _fig(out / "scaling.png", draw)
    report = [
        f"# Variance study: ensemble scaling up to K = {cfg.teachers.k}",
        "",
        f"Teachers: {cfg.teachers.model.name} width {cfg.teachers.model.width}, resample `{cfg.teachers.resample}`, "
        f"{cfg.data.n_weak} weak-gold labels; test split of {len(data.splits['test'].y)} examples. "
        f"Mean single-teacher accuracy {teachers['acc_test'].mean():.4f} (sd {teachers['acc_test'].std():.4f}).",
        "",
        "![scaling](scaling.png)",
        "",
        table.to_markdown(index=False, floatfmt=".4f"),
        "",
        f"The distance of the K-teacher dual posterior mean from the {cfg.teachers.k}-teacher one, fitted on "
        f"K ≤ {cfg.teachers.k // 4}, falls as K^{slope:.2f} (the 1/K rate of an average of independent teachers is slope −1). "
        "Confidence intervals are Poisson-bootstrap percentiles over teachers (each teacher's weights drawn from its id).",
        "",
    ]
    sources = randomness_sources(cfg)
    artifacts.write_parquet(out / "sources.parquet", pa.Table.from_pandas(sources, preserve_index=False))
    report += md_section(
        f"Sources of teacher randomness (K = {int(sources['K'].iloc[0])})",
        "Each row trains its own ensemble whose teachers differ only by seed (same weak-gold rows), by a bootstrap "
        "resample, or by disjoint subsets of the weak-gold split; the student is the configured one on the dual mean.",
        sources,
        "`scaling.parquet`, `sources.parquet`",
    )
    artifacts.write_text(out / "report.md", "\n".join(report) + "\n")
    artifacts.write_json(out / "summary.json", {"slope": slope, "intercept": intercept, "k_max": cfg.teachers.k})
    print(sources.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"\nKL(full ‖ K) ∝ K^{slope:.2f}; report: {out / 'report.md'}")
    return out


def mean_teacher_acc(teacher_dir: Path, k: int) -> float:
    """Over the K teachers the run uses (the directory may hold an extended ensemble)."""
    from w2s_ray.teachers import read_teacher_table

    return float(read_teacher_table(teacher_dir, k)["acc_test"].to_numpy().mean())


def randomness_sources(cfg: ExperimentConfig, k: int = 64) -> pd.DataFrame:
    """Seed-only, bootstrap and disjoint-subset ensembles of the same size, and their students."""
    from w2s_ray.pipeline import run_pipeline

    k = min(k, cfg.teachers.k, cfg.data.n_weak)
    rows = []
    for resample in ("seed", "bootstrap", "disjoint"):
        c = cfg.model_copy(
            update={
                "teachers": cfg.teachers.model_copy(update={"k": k, "resample": resample}),
                "student": cfg.student.model_copy(update={"targets": ["dual_mean"], "ceiling": False}),
                "posterior": cfg.posterior.model_copy(update={"single_teacher": 0}),
            }
        )
        st = run_pipeline(c, until="student")
        post = artifacts.read_json(st.labels_dir / "posterior.json")
        rows.append(
            {
                "resample": resample, "K": k, "mean_teacher_acc": mean_teacher_acc(st.teachers_dir, k),
                "teacher_variance": post["variance_test"], "mutual_info": post["mutual_info_test"],
                "ensemble_acc_dual": post["test_acc_dual"], "student_acc": st.students["dual_mean"]["test_acc"],
            }
        )
    return pd.DataFrame(rows)


REGIMES = {
    "default": {},
    "student shifts only": {"student.augment_shift": 20},
    "teacher window 20, no shifts": {"teachers.view": {"kind": "window", "start": 0, "length": 20}},
    "teacher window 20 + student shifts (configs/w2s_window.yaml)": {"teachers.view": {"kind": "window", "start": 0, "length": 20}, "student.augment_shift": 20},
}


def weak_to_strong_regimes(cfg: ExperimentConfig) -> pd.DataFrame:
    """Where does the student generalize beyond its teachers? One full run per regime."""
    from w2s_ray.pipeline import run_pipeline
    from w2s_ray.space import apply_params

    rows = []
    for name, overrides in REGIMES.items():
        c = apply_params(cfg, overrides, f"regime {name!r}")
        c = c.model_copy(update={"student": c.student.model_copy(update={"targets": ["dual_mean", "single"], "ceiling": True})})
        st = run_pipeline(c, until="student")
        post = artifacts.read_json(st.labels_dir / "posterior.json")
        teacher = mean_teacher_acc(st.teachers_dir, c.teachers.k)
        ceiling = st.students["gold"]["test_acc"]
        row = {"regime": name, "mean_teacher_acc": teacher, "ensemble_acc": post["test_acc_dual"], "ceiling_acc": ceiling}
        for tgt in ("dual_mean", "single"):
            acc = st.students[tgt]["test_acc"]
            row[f"student_{tgt}_acc"] = acc
            row[f"pgr_{tgt}_vs_teacher"] = (acc - teacher) / (ceiling - teacher)
        row["pgr_dual_mean_vs_ensemble"] = (row["student_dual_mean_acc"] - post["test_acc_dual"]) / (ceiling - post["test_acc_dual"])
        rows.append(row)
    return pd.DataFrame(rows)


def run_theory_study(cfg: ExperimentConfig) -> Path:
    from w2s_ray.theory import TheoryConfig, run_theory

    out = artifacts.reset_dir(cfg.run_dir / "study" / "theory")
    tc = TheoryConfig(seed=cfg.data.seed)
    table = pd.DataFrame(run_theory(tc))
    artifacts.write_parquet(out / "theory.parquet", pa.Table.from_pandas(table, preserve_index=False))

    def draw(plt):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.loglog(table["width"], table["dist_to_posterior_mean"], marker="o", base=2, label="student → posterior-mean teacher")
        ax.loglog(table["width"], table["dist_to_single_teachers"], marker="s", base=2, label="student → single teachers (mean)")
        ax.loglog(table["width"], table["one_teacher_student_dist_to_teacher0"], marker="^", ls=":", base=2, label="student fit to teacher 0 → teacher 0")
        ax.axhline(table["teacher_variance"][0], color="gray", ls="--", label="teacher variance")
        ax.set_xlabel("student width (random features)")
        ax.set_ylabel("squared distance on test inputs")
        ax.legend(fontsize=8)
        return fig

    _fig(out / "theory.png", draw)
    first, last = table.iloc[0], table.iloc[-1]
    report = [
        "# The squared-loss example: a wide student converges to the posterior-mean teacher",
        "",
        f"Gaussian inputs (d = {tc.d}); {tc.k} weak teachers, each a ridge regressor on its own random-features view "
        f"({tc.teacher_features} features) fit to {tc.n_gold} labelled samples of its own; students are random-features ridge "
        f"models of growing width fit to {tc.n_transfer} transfer inputs, each labelled by a teacher drawn at random. "
        "Under squared loss the dual mean is the plain mean of the teachers' predictions.",
        "",
        "![theory](theory.png)",
        "",
        table.to_markdown(index=False, floatfmt=".4f"),
        "",
        f"From width {int(first['width'])} to {int(last['width'])} the student's squared distance to the posterior mean "
        f"falls from {first['dist_to_posterior_mean']:.4f} to {last['dist_to_posterior_mean']:.4f}, while its mean distance to "
        f"single teachers stays at {last['dist_to_single_teachers']:.4f} (teacher variance {last['teacher_variance']:.4f}). "
        f"Its risk {last['student_risk']:.4f} is below the mean teacher's {last['mean_teacher_risk']:.4f}: the gain comes from "
        "approximating the posterior mean. A student fit to one teacher instead converges to that teacher "
        f"(distance {last['one_teacher_student_dist_to_teacher0']:.4f} at the largest width).",
        "",
    ]
    report += theory_on_runs(cfg, out)
    regimes = weak_to_strong_regimes(cfg)
    artifacts.write_parquet(out / "regimes.parquet", pa.Table.from_pandas(regimes, preserve_index=False))
    report += md_section(
        "Where the student generalizes beyond its teachers",
        "One full run per regime (students on the dual mean and on one teacher, the gold ceiling with the same "
        "student). PGR ≥ 0.3 against the mean single teacher needs teachers whose errors the student cannot "
        "copy: here, teachers that see a window of the signal and a student made shift-invariant.",
        regimes,
        "`regimes.parquet`",
    )
    artifacts.write_text(out / "report.md", "\n".join(report) + "\n")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"\nreport: {out / 'report.md'}")
    return out


def theory_on_runs(cfg: ExperimentConfig, out: Path) -> list[str]:
    """Gain vs misfit, capacity → posterior mean, entropy, and bias–variance, on real students."""
    runs, seed_logs, teacher_bv, y_test = student_runs(cfg)
    artifacts.write_parquet(out / "runs.parquet", pa.Table.from_pandas(runs, preserve_index=False))
    slope, intercept = np.polyfit(runs["misfit"], runs["gain_ce"], 1)
    r = float(np.corrcoef(runs["misfit"], runs["gain_ce"])[0, 1])
    r_ent = float(np.corrcoef(runs["entropy"], runs["gain_ce"])[0, 1])
    slope_acc = float(np.polyfit(runs["misfit"], runs["gain_acc"], 1)[0])
    r_acc = float(np.corrcoef(runs["misfit"], runs["gain_acc"])[0, 1])

    def draw_gain(plt):
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
        for t, g in runs.groupby("target"):
            axes[0].scatter(g["misfit"], g["gain_ce"], label=t)
            axes[2].scatter(g["entropy"], g["gain_ce"], label=t)
        xs = np.linspace(runs["misfit"].min(), runs["misfit"].max(), 10)
        axes[0].plot(xs, slope * xs + intercept, "k--", label=f"fit: slope {slope:.2f}, r = {r:.2f}")
        axes[0].plot(xs, xs, color="gray", lw=0.8, label="gain = misfit")
        axes[0].set_xlabel("misfit: mean KL(student ‖ teacher) on transfer")
        axes[0].set_ylabel("gain: teacher − student gold cross-entropy (test)")
        axes[0].legend(fontsize=8)
        dual = runs[(runs["target"] == "dual_mean") & (runs["seed"] == cfg.student.seed)]
        for lam, g in dual.groupby("lambda"):
            g = g.sort_values("width")
            axes[1].plot(g["width"], g["kl_to_dual_mean"], marker="o", label=f"to dual posterior mean (λ={lam:g})")
            axes[1].plot(g["width"], g["kl_to_teachers"], marker="s", ls="--", label=f"to single teachers, mean (λ={lam:g})")
        axes[1].set_xscale("log", base=2)
        axes[1].set_xlabel("student width")
        axes[1].set_ylabel("mean KL(student ‖ ·) on test")
        axes[1].legend(fontsize=7)
        axes[2].set_xlabel("student predictive entropy (test)")
        axes[2].set_ylabel("gain (cross-entropy)")
        axes[2].set_title(f"r = {r_ent:.2f}")
        axes[2].legend(fontsize=8)
        return fig

    _fig(out / "runs.png", draw_gain)
    bv_table = pd.DataFrame(
        [
            {"who": f"teachers (K={cfg.teachers.k})", **teacher_bv, "risk": teacher_bv["bias"] + teacher_bv["variance"]},
            {"who": f"students ({SEEDS} seeds, dual-mean target)", **bias_variance(seed_logs["seeds"], y_test)},
            {"who": f"students on {len(seed_logs['sub-ensembles'])} disjoint sub-ensembles' dual means", **bias_variance(seed_logs["sub-ensembles"], y_test)},
        ]
    )
    artifacts.write_parquet(out / "bias_variance.parquet", pa.Table.from_pandas(bv_table, preserve_index=False))
    cols = ["width", "target", "lambda", "student_acc", "teacher_acc", "gain_ce", "misfit", "entropy", "kl_to_dual_mean", "kl_to_teachers"]
    main = runs[runs["seed"] == cfg.student.seed][cols]
    return [
        "",
        "## On real runs: " + f"{len(runs)} students on the cached {cfg.teachers.k}-teacher ensemble",
        "",
        "![runs](runs.png)",
        "",
        f"**Gain vs misfit.** Across the runs the cross-entropy gain over the teacher each student was trained on "
        f"rises with the misfit with slope {slope:.2f} (intercept {intercept:.3f}, correlation r = {r:.2f}). The paper "
        "predicts that the gain is quantified by the misfit (gain ≈ misfit, slope 1, when the student's class is "
        f"rich enough and convex); here the slope is {'close to' if abs(slope - 1) < 0.25 else 'far from'} 1. "
        f"In accuracy, the gain against misfit has slope {slope_acc:.3f} and r = {r_acc:.2f}.",
        "",
        "**Capacity → posterior mean.** For students on the dual-mean target, the KL to the dual posterior mean and "
        "the mean KL to single teachers (which equals the former plus the teacher variance, exactly) against width; "
        "the gap between the two curves is the teacher variance.",
        "",
        f"**Entropy.** Correlation between the student's predictive entropy and its gain: r = {r_ent:.2f}.",
        "",
        "**Bias–variance (expected gold KL risk = KL(y ‖ dual mean) + mean KL(dual mean ‖ each)).**",
        "",
        bv_table.to_markdown(index=False, floatfmt=".4f"),
        "",
        main.to_markdown(index=False, floatfmt=".4f"),
        "",
        "Tables: `theory.parquet`, `runs.parquet`, `bias_variance.parquet`.",
    ]



# --- theory checks on real runs ------------------------------------------------------------

RUN_WIDTHS = (4, 16, 64)
RUN_TARGETS = ("single", "arith_mean", "dual_mean")
RUN_LAMBDAS = (0.0, 0.5)
SEEDS = 4


def student_runs(cfg: ExperimentConfig) -> tuple[pd.DataFrame, dict[str, list[torch.Tensor]], dict, torch.Tensor]:
    """Students over width × target × λ, plus SEEDS seeds of the configured student on the dual mean."""
    import ray

    from w2s_ray import metrics as M
    from w2s_ray.labels import read_test_posterior
    from w2s_ray.pipeline import RunState, log, stage_data, stage_labels
    from w2s_ray.posterior import kl
    from w2s_ray.raytools import init_ray
    from w2s_ray.students import StudentInputs

    st = RunState(cfg)
    data = stage_data(st)
    ldir = stage_labels(st)
    init_ray(cfg.ray)
    inputs = StudentInputs.load(st, data, ldir)
    test = read_test_posterior(ldir)
    y = torch.from_numpy(data.splits["test"].y)
    target_test = {"dual_mean": test["dual_log"], "single": test["single_log"], "arith_mean": test["arith_log"]}
    base = cfg.student
    plan = [(w, t, lam, base.seed) for w in RUN_WIDTHS for t in RUN_TARGETS for lam in RUN_LAMBDAS]
    plan += [(base.model.width, "dual_mean", base.rce_weight, base.seed + 1000 + i) for i in range(SEEDS)]
    running = {}
    for w, t, lam, seed in plan:
        scfg = base.model_copy(update={"model": base.model.model_copy(update={"width": w}), "rce_weight": lam, "seed": seed})
        running[inputs.submit(scfg, t)] = (w, t, lam, seed)
    log(f"study theory: {len(plan)} students ({len(RUN_WIDTHS)} widths × {len(RUN_TARGETS)} targets × {len(RUN_LAMBDAS)} λ, and {SEEDS} seeds)")
    rows, seeds_log = [], []
    while running:
        [ref], _ = ray.wait(list(running), num_returns=1)
        w, t, lam, seed = running.pop(ref)
        out = ray.get(ref)
        s = out["log_test"]
        teacher = target_test[t]
        row = {
            "width": w, "target": t, "lambda": lam, "seed": seed,
            "student_acc": M.accuracy(s, y), "student_ce": M.gold_ce(s, y),
            "teacher_acc": M.accuracy(teacher, y), "teacher_ce": M.gold_ce(teacher.clamp_min(-1e4), y),
            "misfit": out["metrics"]["misfit"], "entropy": out["metrics"]["entropy_test"],
            "kl_to_dual_mean": float(kl(s, test["dual_log"]).mean()),
        }
        # mean_k KL(s ‖ p_k) = KL(s ‖ dual mean) + teacher variance, per example
        row["kl_to_teachers"] = float((kl(s, test["dual_log"]) + test["variance"]).mean())
        row["gain_ce"] = row["teacher_ce"] - row["student_ce"]
        row["gain_acc"] = row["student_acc"] - row["teacher_acc"]
        rows.append(row)
        if seed >= base.seed + 1000:
            seeds_log.append(s)
    teacher_bv = {"bias": M.gold_ce(test["dual_log"], y), "variance": float(test["variance"].mean())}
    seeds_log = {"seeds": seeds_log, "sub-ensembles": sub_ensemble_students(cfg, st, inputs)}
    return pd.DataFrame(rows).sort_values(["target", "lambda", "width", "seed"]), seeds_log, teacher_bv, y


def sub_ensemble_students(cfg: ExperimentConfig, st, inputs, groups: int = 4) -> list[torch.Tensor]:
    """Students on the dual means of `groups` disjoint sub-ensembles (teacher ids split evenly)."""
    import ray

    from w2s_ray.posterior import PosteriorAccumulator
    from w2s_ray.teachers import read_pack_logp

    k = cfg.teachers.k
    size = k // groups
    n, c = len(st.data.splits["transfer"].y), st.data.n_classes
    accs = [PosteriorAccumulator(n, c) for _ in range(groups)]
    for p in artifacts.read_manifest(st.teachers_dir, verify=False)["packs"]:
        ids, logp = read_pack_logp(st.teachers_dir, "transfer", p, size * groups)
        for g in range(groups):
            rows = np.nonzero((ids >= g * size) & (ids < (g + 1) * size))[0]
            if len(rows):
                accs[g].add(torch.tensor(logp[rows]))
    refs = []
    for g, acc in enumerate(accs):
        dual_log = acc.finalize()["dual_log"]
        refs.append(inputs.submit(cfg.student, f"dual_mean[teachers {g * size}..{(g + 1) * size - 1}]", dual_log.exp(), dual_log))
    return [out["log_test"] for out in ray.get(refs)]


def bias_variance(logs: list[torch.Tensor], y: torch.Tensor) -> dict[str, float]:
    """Expected gold KL risk of a set of predictors = KL(y ‖ dual mean) + mean KL(dual mean ‖ each)."""
    from w2s_ray.metrics import gold_ce
    from w2s_ray.posterior import bregman_variance, dual_mean_log

    stack = torch.stack(logs)
    return {
        "risk": float(np.mean([gold_ce(s, y) for s in logs])),
        "bias": gold_ce(dual_mean_log(stack), y),
        "variance": float(bregman_variance(stack).mean()),
    }
