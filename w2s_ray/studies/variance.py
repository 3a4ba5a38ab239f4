"""The variance study: ensemble scaling over K, and the sources of teacher randomness.

One ensemble of K_max teachers (trained, extended or reused) is streamed once through one
`PosteriorAccumulator` per K in 2, 4, ..., K_max, each fed the teachers with id < K: memory
depends on the number of K values and the split size, not on K_max, and a later, larger K_max
trains only the new teachers. Then seed-only, bootstrap and disjoint-subset ensembles of the
same size, the variance each induces and the student each yields.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from w2s_ray.config import ExperimentConfig
from w2s_ray.metrics import accuracy
from w2s_ray.posterior import PosteriorAccumulator, kl
from w2s_ray.report import figure, md_section, write_table
from w2s_ray.run import RunContext
from w2s_ray.results import StageRequest, Stages, TeacherStage
from w2s_ray.teachers import iter_pack_logp

RESAMPLES = ("seed", "bootstrap", "disjoint")
SOURCES_K = 64


def powers_of_two(k_max: int) -> list[int]:
    ks = [2**i for i in range(1, int(math.log2(k_max)) + 1)]
    return ks if ks[-1] == k_max else ks + [k_max]


def fit_rate(ks: np.ndarray, dist: np.ndarray) -> tuple[float, float]:
    """Least-squares slope and intercept of log(dist) on log(K)."""
    slope, intercept = np.polyfit(np.log(ks), np.log(dist), 1)
    return float(slope), float(intercept)


def source_config(cfg: ExperimentConfig, resample: str) -> ExperimentConfig:
    """An ensemble of `SOURCES_K` teachers differing only by `resample`, and its dual-mean student."""
    k = min(SOURCES_K, cfg.teachers.k, cfg.data.n_weak)
    return cfg.model_copy(
        update={
            "teachers": cfg.teachers.model_copy(update={"k": k, "resample": resample}),
            "student": cfg.student.model_copy(update={"targets": ["dual_mean"], "ceiling": False}),
            "posterior": cfg.posterior.model_copy(update={"single_teacher": 0}),
        }
    )


def needs(cfg: ExperimentConfig) -> list[StageRequest]:
    return [StageRequest("ensemble", cfg, "teachers")] + [StageRequest(r, source_config(cfg, r), "student") for r in RESAMPLES]


def variance_table(cfg: ExperimentConfig, teachers: TeacherStage, y_test: np.ndarray, n_classes: int, n_boot: int = 50) -> pd.DataFrame:
    """Posterior statistics of the first K teachers for every K in `powers_of_two(K_max)`."""
    ks = powers_of_two(teachers.k)
    n = len(y_test)
    accums = {k: PosteriorAccumulator(n, n_classes, n_boot=n_boot, boot_seed=cfg.teachers.seed) for k in ks}
    for ids, logp in iter_pack_logp(teachers, "test"):
        for k, accum in accums.items():
            rows = np.nonzero(ids < k)[0]
            if len(rows):
                accum.add(logp[rows], ids[rows].tolist())
    y = torch.from_numpy(y_test)
    full = accums[ks[-1]].finalize()
    out = []
    for k in ks:
        post = accums[k].finalize()
        ci = accums[k].bootstrap_accuracy(y, cfg.posterior.ci)
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


def sources_table(done: dict[str, Stages]) -> pd.DataFrame:
    rows = []
    for resample in RESAMPLES:
        s = done[resample]
        post = s.labels.posterior
        rows.append(
            {
                "resample": resample, "K": s.teachers.k, "mean_teacher_acc": float(s.teachers.accuracies().mean()),
                "teacher_variance": post.variance_test, "mutual_info": post.mutual_info_test,
                "ensemble_acc_dual": post.test_acc_dual, "student_acc": float(np.mean([r.test_acc for r in s.students.replicates["dual_mean"]])), "student_n": len(s.students.replicates["dual_mean"]),
            }
        )
    return pd.DataFrame(rows)


def run(ctx: RunContext, done: dict[str, Stages], out: Path) -> Path:
    cfg, ens = ctx.cfg, done["ensemble"]
    ctx.log(f"study variance: posterior statistics for K = {powers_of_two(cfg.teachers.k)}")
    y_test = ens.data.splits["test"].y
    table = variance_table(cfg, ens.teachers, y_test, ens.data.n_classes)
    teacher_acc = ens.teachers.accuracies()
    fit_rows = table[(table["K"] <= cfg.teachers.k // 4) & (table["kl_full_to_K"] > 0)]
    slope, intercept = fit_rate(fit_rows["K"].to_numpy(), fit_rows["kl_full_to_K"].to_numpy()) if len(fit_rows) >= 2 else (math.nan, math.nan)
    write_table(ctx.run, out / "scaling.parquet", table)

    def draw(fig) -> None:
        axes = fig.subplots(1, 3)
        ax = axes[0]
        for key, name in (("acc_dual", "dual mean"), ("acc_arith", "arithmetic mean")):
            line = ax.plot(table["K"], table[key], marker="o", label=name)[0]
            ax.fill_between(table["K"], table[f"{key}_lo"], table[f"{key}_hi"], color=line.get_color(), alpha=0.2)
        ax.axhline(teacher_acc.mean(), color="gray", ls="--", label="mean single teacher")
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

    figure(ctx.run, out / "scaling.png", draw, figsize=(15, 4.2))
    report = [
        f"# Variance study: ensemble scaling up to K = {cfg.teachers.k}",
        "",
        f"Teachers: {cfg.teachers.model.name} width {cfg.teachers.model.width}, resample `{cfg.teachers.resample}`, "
        f"{cfg.data.n_weak} weak-gold labels; test split of {len(y_test)} examples. "
        f"Mean single-teacher accuracy {teacher_acc.mean():.4f} (sd {teacher_acc.std(ddof=1):.4f}).",
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
    sources = sources_table(done)
    write_table(ctx.run, out / "sources.parquet", sources)
    report += md_section(
        f"Sources of teacher randomness (K = {int(sources['K'].iloc[0])})",
        "Each row trains its own ensemble whose teachers differ only by seed (same weak-gold rows), by a bootstrap "
        "resample, or by disjoint subsets of the weak-gold split; the student is the configured one on the dual mean.",
        sources,
        "`scaling.parquet`, `sources.parquet`",
    )
    ctx.run.write_text(out / "report.md", "\n".join(report) + "\n")
    ctx.run.write_json(out / "summary.json", {"slope": slope, "intercept": intercept, "k_max": cfg.teachers.k})
    print(sources.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"\nKL(full ‖ K) ∝ K^{slope:.2f}; report: {out / 'report.md'}")
    return out
