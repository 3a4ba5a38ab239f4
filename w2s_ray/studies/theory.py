"""The theory study: the squared-loss example, the paper's quantities on real students, and the
weak-to-strong regimes.

Three sections, each a function that returns its Markdown lines and writes its tables:
`squared_loss_section` (plain torch, `w2s_ray.theory`), `students_section` (students over
width × target × λ, over seeds and over disjoint sub-ensembles of the cached ensemble) and
`regimes_section` (one full run per regime, run by the pipeline before the study starts).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from w2s_ray.config import ExperimentConfig, with_values
from w2s_ray.labels import read_test_posterior
from w2s_ray.metrics import accuracy, gold_ce, pgr
from w2s_ray.posterior import PosteriorAccumulator, bias_variance, kl
from w2s_ray.report import figure, md_section, write_table
from w2s_ray.run import RunContext
from w2s_ray.results import StageRequest, Stages
from w2s_ray.students import StudentInputs
from w2s_ray.teachers import iter_pack_logp
from w2s_ray.ridge_example import TheoryConfig, run_theory

RUN_WIDTHS = (4, 16, 64)
RUN_TARGETS = ("single", "arith_mean", "dual_mean")
RUN_LAMBDAS = (0.0, 0.5)
SEEDS = 4
SUB_ENSEMBLES = 4

REGIMES = {
    "default": {},
    "student shifts only": {"student.augment_shift": 20},
    "teacher window 20, no shifts": {"teachers.view": {"kind": "window", "start": 0, "length": 20}},
    "teacher window 20 + student shifts (configs/w2s_window.yaml)": {"teachers.view": {"kind": "window", "start": 0, "length": 20}, "student.augment_shift": 20},
}


def regime_config(cfg: ExperimentConfig, name: str) -> ExperimentConfig:
    values = {**REGIMES[name], "student.targets": ["dual_mean", "single"], "student.ceiling": True}
    return with_values(cfg, values, f"regime {name!r}")


def needs(cfg: ExperimentConfig) -> list[StageRequest]:
    return [StageRequest("ensemble", cfg, "labels")] + [StageRequest(name, regime_config(cfg, name), "student") for name in REGIMES]


def run(ctx: RunContext, done: dict[str, Stages], out: Path) -> Path:
    report, table = squared_loss_section(ctx, out)
    report += students_section(ctx, done["ensemble"], out)
    report += regimes_section(ctx, done, out)
    ctx.run.write_text(out / "report.md", "\n".join(report) + "\n")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"\nreport: {out / 'report.md'}")
    return out


# --- the squared-loss example --------------------------------------------------------------


def squared_loss_section(ctx: RunContext, out: Path) -> tuple[list[str], pd.DataFrame]:
    tc = TheoryConfig(seed=ctx.cfg.data.seed)
    table = pd.DataFrame(run_theory(tc))
    write_table(ctx.run, out / "theory.parquet", table)

    def draw(fig) -> None:
        ax = fig.subplots()
        ax.loglog(table["width"], table["dist_to_posterior_mean"], marker="o", base=2, label="student → posterior-mean teacher")
        ax.loglog(table["width"], table["dist_to_single_teachers"], marker="s", base=2, label="student → single teachers (mean)")
        ax.loglog(table["width"], table["one_teacher_student_dist_to_teacher0"], marker="^", ls=":", base=2, label="student fit to teacher 0 → teacher 0")
        ax.axhline(table["teacher_variance"][0], color="gray", ls="--", label="teacher variance")
        ax.set_xlabel("student width (random features)")
        ax.set_ylabel("squared distance on test inputs")
        ax.legend(fontsize=8)

    figure(ctx.run, out / "theory.png", draw, figsize=(7, 4.5))
    first, last = table.iloc[0], table.iloc[-1]
    return [
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
    ], table


# --- students on the cached ensemble -------------------------------------------------------


def student_runs(ctx: RunContext, stages: Stages) -> tuple[pd.DataFrame, dict[str, list[torch.Tensor]], dict, torch.Tensor]:
    """Students over width × target × λ ("grid"), plus SEEDS seeds of the configured student on
    the dual mean ("seeds"), plus students on disjoint sub-ensembles' dual means."""
    ctx.ray()
    inputs = StudentInputs.load(ctx, stages.data, stages.labels)
    test = read_test_posterior(stages.labels.dir)
    y = torch.from_numpy(stages.data.splits["test"].y)
    target_test = {"dual_mean": test["dual_log"], "single": test["single_log"], "arith_mean": test["arith_log"]}
    base = ctx.cfg.student
    plan = [("grid", w, t, lam, base.seed) for w in RUN_WIDTHS for t in RUN_TARGETS for lam in RUN_LAMBDAS]
    plan += [("seeds", base.model.width, "dual_mean", base.rce_weight, base.seed + 1000 + i) for i in range(SEEDS)]
    jobs = {}
    for tag in plan:
        _, w, t, lam, seed = tag
        jobs[tag] = (base.model_copy(update={"model": base.model.model_copy(update={"width": w}), "rce_weight": lam, "seed": seed}), t)
    ctx.log(f"study theory: {len(plan)} students ({len(RUN_WIDTHS)} widths × {len(RUN_TARGETS)} targets × {len(RUN_LAMBDAS)} λ, and {SEEDS} seeds)")
    rows, seed_logs = [], []
    for (kind, w, t, lam, seed), out in inputs.train_all(jobs):
        s = out.log_test
        teacher = target_test[t]
        row = {
            "kind": kind, "width": w, "target": t, "lambda": lam, "seed": seed,
            **dataclasses.asdict(out.result.eval),
            "teacher_acc": accuracy(teacher, y), "teacher_ce": gold_ce(teacher.clamp_min(-1e4), y),
            "kl_to_dual_mean": float(kl(s, test["dual_log"]).mean()),
        }
        # mean_k KL(s ‖ p_k) = KL(s ‖ dual mean) + teacher variance, per example
        row["kl_to_teachers"] = float((kl(s, test["dual_log"]) + test["variance"]).mean())
        row["gain_ce"] = row["teacher_ce"] - row["test_gold_ce"]
        row["gain_acc"] = row["test_acc"] - row["teacher_acc"]
        rows.append(row)
        if kind == "seeds":
            seed_logs.append(s)
    teacher_bv = {"bias": gold_ce(test["dual_log"], y), "variance": float(test["variance"].mean())}
    logs = {"seeds": seed_logs, "sub-ensembles": sub_ensemble_students(ctx, stages, inputs)}
    return pd.DataFrame(rows).sort_values(["kind", "target", "lambda", "width", "seed"]), logs, teacher_bv, y


def sub_ensemble_students(ctx: RunContext, stages: Stages, inputs: StudentInputs, groups: int = SUB_ENSEMBLES) -> list[torch.Tensor]:
    """Students on the dual means of `groups` disjoint sub-ensembles (teacher ids split evenly)."""
    size = stages.teachers.k // groups
    n, c = stages.data.sizes["transfer"], stages.data.n_classes
    accums = [PosteriorAccumulator(n, c) for _ in range(groups)]
    for ids, logp in iter_pack_logp(stages.teachers, "transfer", size * groups):
        for g, accum in enumerate(accums):
            rows = np.nonzero((ids >= g * size) & (ids < (g + 1) * size))[0]
            if len(rows):
                accum.add(logp[rows])
    jobs = {}
    for g, accum in enumerate(accums):
        dual_log = accum.finalize()["dual_log"]
        jobs[g] = (ctx.cfg.student, f"dual_mean[teachers {g * size}..{(g + 1) * size - 1}]", dual_log.exp(), dual_log)
    done = dict(inputs.train_all(jobs))
    return [done[g].log_test for g in range(groups)]


def students_section(ctx: RunContext, stages: Stages, out: Path) -> list[str]:
    """Gain vs misfit, capacity → posterior mean, entropy, and bias–variance, on real students."""
    cfg = ctx.cfg
    runs, logs, teacher_bv, y_test = student_runs(ctx, stages)
    write_table(ctx.run, out / "runs.parquet", runs)
    slope, intercept = np.polyfit(runs["misfit"], runs["gain_ce"], 1)
    r = float(np.corrcoef(runs["misfit"], runs["gain_ce"])[0, 1])
    r_ent = float(np.corrcoef(runs["entropy_test"], runs["gain_ce"])[0, 1])
    slope_acc = float(np.polyfit(runs["misfit"], runs["gain_acc"], 1)[0])
    r_acc = float(np.corrcoef(runs["misfit"], runs["gain_acc"])[0, 1])

    def draw(fig) -> None:
        axes = fig.subplots(1, 3)
        for t, g in runs.groupby("target"):
            axes[0].scatter(g["misfit"], g["gain_ce"], label=t)
            axes[2].scatter(g["entropy_test"], g["gain_ce"], label=t)
        xs = np.linspace(runs["misfit"].min(), runs["misfit"].max(), 10)
        axes[0].plot(xs, slope * xs + intercept, "k--", label=f"fit: slope {slope:.2f}, r = {r:.2f}")
        axes[0].plot(xs, xs, color="gray", lw=0.8, label="gain = misfit")
        axes[0].set_xlabel("misfit: mean KL(student ‖ teacher) on transfer")
        axes[0].set_ylabel("gain: teacher − student gold cross-entropy (test)")
        axes[0].legend(fontsize=8)
        dual = runs[(runs["target"] == "dual_mean") & (runs["kind"] == "grid")]
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

    figure(ctx.run, out / "runs.png", draw, figsize=(16, 4.5))
    bv_table = pd.DataFrame(
        [
            {"who": f"teachers (K={cfg.teachers.k})", **teacher_bv, "risk": teacher_bv["bias"] + teacher_bv["variance"]},
            {"who": f"students ({SEEDS} seeds, dual-mean target)", **bias_variance(logs["seeds"], y_test)},
            {"who": f"students on {len(logs['sub-ensembles'])} disjoint sub-ensembles' dual means", **bias_variance(logs["sub-ensembles"], y_test)},
        ]
    )
    write_table(ctx.run, out / "bias_variance.parquet", bv_table)
    cols = ["width", "target", "lambda", "test_acc", "teacher_acc", "gain_ce", "misfit", "entropy_test", "kl_to_dual_mean", "kl_to_teachers"]
    main = runs[runs["kind"] == "grid"][cols]
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


# --- weak-to-strong regimes ----------------------------------------------------------------


def regimes_table(done: dict[str, Stages]) -> pd.DataFrame:
    """Where does the student generalize beyond its teachers? One full run per regime."""
    rows = []
    for name in REGIMES:
        s = done[name]
        teacher = float(s.teachers.accuracies().mean())
        ensemble = s.labels.posterior.test_acc_dual
        ceiling = float(np.mean([c.test_acc for c in s.students.ceilings]))
        row = {"regime": name, "n_seeds": len(s.students.ceilings), "mean_teacher_acc": teacher, "ensemble_acc": ensemble, "ceiling_acc": ceiling}
        accs = s.teachers.accuracies()
        for tgt in ("dual_mean", "single"):
            reps = s.students.replicates[tgt]
            acc = float(np.mean([r.test_acc for r in reps]))
            row[f"student_{tgt}_acc"] = acc
            # the single-teacher students against their own teachers, the others against the mean teacher
            weak = float(np.mean([accs[r.teacher] for r in reps])) if tgt == "single" else teacher
            row[f"pgr_{tgt}_vs_teacher"] = pgr(acc, weak, ceiling)
        row["pgr_dual_mean_vs_ensemble"] = pgr(row["student_dual_mean_acc"], ensemble, ceiling)
        rows.append(row)
    return pd.DataFrame(rows)


def regimes_section(ctx: RunContext, done: dict[str, Stages], out: Path) -> list[str]:
    regimes = regimes_table(done)
    write_table(ctx.run, out / "regimes.parquet", regimes)
    return md_section(
        "Where the student generalizes beyond its teachers",
        "One full run per regime (students on the dual mean and on one teacher, the gold ceiling with the same "
        "student). PGR ≥ 0.3 against the mean single teacher needs teachers whose errors the student cannot "
        "copy: here, teachers that see a window of the signal and a student made shift-invariant.",
        regimes,
        "`regimes.parquet`",
    )
