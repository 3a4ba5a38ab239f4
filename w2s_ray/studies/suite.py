"""The suite study: every task of the registry (`w2s_ray.tasks`), one table across them, and
teacher-count scaling per task.

Per task, all on the task's own config (`tasks.task_config`), `SEEDS` students per setting:
- "main": the task's K (64 unless `--set teachers.k=...`); students of the dual mean, the arithmetic mean and single
  teachers (replicate i on teacher i: `SEEDS` teacher draws), and the gold ceiling per seed.
- "narrow": single-teacher students at a quarter of the student's width, on the same draws.
- "weighting RULE": the weighting study's dual-mean students (`student.weighting`: none,
  variance, drop_disputed) on two sets of `SEEDS` seeds, paired with the plain one by seed.
- "K=k": the dual-mean students of the first k teachers, for k in `Scale.student_ks` (k = 1: the
  main run's single-teacher students; k = 64: the main run's dual-mean students, from the cache).
- "scaling": the ensemble extended to `Scale.k_max` teachers (teachers are keyed without K,
  so the larger ensemble trains only the new teachers), streamed once for every K = 1, 2, 4, …

Per task it reports, with 95% CIs: the teachers (over teachers), the ensemble (bootstrap over
teachers), each student (over seeds), the ceiling, PGR against the mean teacher and against the
ensemble (per seed, against that seed's ceiling), the teacher variance V, and the claims study's
single-teacher statistics at the configured width: C2's remainder (gain − misfit of a
single-teacher student; the paper's claim is 0) and P5's Bregman variance of single-teacher
students across teacher draws, at the width − at a quarter of it (jackknife over draws; the
claim is that it falls with capacity). Then per K: the ensemble's accuracy, V(K) and its fit
V(K) ≈ V∞ + b/K, and the dual-mean student's accuracy and PGR; "how many teachers are worth it"
is the smallest K whose student is not worse than the best K's (paired by seed, 95%).

Tasks run side by side on a cluster (`lanes`: one per `CPUS_PER_LANE` CPUs, or `--parallel N`),
each task's runs in order with actors of its own, every stage's work spread over the cluster
(teacher packs on every actor, students as parallel tasks); on 2 cores, one task at a time.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from w2s_ray.config import ExperimentConfig, with_values
from w2s_ray.errors import ConfigError
from w2s_ray.labels import read_test_posterior
from w2s_ray.replicates import paired, summarize, t_interval
from w2s_ray.report import figure, write_table
from w2s_ray.results import StageRequest, Stages
from w2s_ray.run import RunContext
from w2s_ray.studies.claims import crossed, decomposition, jack_stat, jackknife_weights, p5, set_stats, stacked, verdict
from w2s_ray.studies.weighting import RULES, rule_config
from w2s_ray.studies.weighting import table as weighting_table
from w2s_ray.studies.variance import variance_table
from w2s_ray.tasks import TASKS, task_config

SEEDS = 5
TARGETS = ("dual_mean", "arith_mean", "single")
MARGIN = 0.01
""""How many teachers are worth it": the smallest K whose dual-mean student is within this much
test accuracy of the best K's, at 95% (the paired CI of the difference lies above −MARGIN).
Not "not significantly worse": that rule passed K = 1 on two tasks only because a student of
one teacher varies so much from draw to draw (CI −0.104 to +0.034 on window)."""


@dataclass(frozen=True)
class Scale:
    """How far the teacher-count scaling goes (the largest ensemble, the K of its students), and
    whether the weighting study's students run."""

    k_max: int
    student_ks: tuple[int, ...]
    weighting: bool = True


DEFAULT = Scale(1024, (1, 4, 16, 64, 256))
QUICK = Scale(64, (1, 4, 16, 64), weighting=False)
"""`--quick`: the scaling up to K = 64 and its students at 1, 4, 16, 64, and no weighting
students (25 of a task's 60 students otherwise: with them, the quick suite took 9:55 on 2
cores); every task and every other number as in the default."""


def tables_dir(cfg: ExperimentConfig) -> Path:
    """Where the suite writes the tasks' tables (read by the driver only): `<output.root>/tables`
    for a local root, the local cache's `tables` for a URI root. Absolute: the path is in the
    data stage's key."""
    root = cfg.output.root
    if "://" in root and not root.startswith("file://"):
        return Path(cfg.output.cache or os.path.expanduser("~/.cache/w2s-ray")).resolve() / "tables"
    return Path(root.removeprefix("file://")).resolve() / "tables"


def selected(tasks: list[str] | None) -> list[str]:
    names = list(TASKS) if not tasks else tasks
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise ConfigError(f"study suite --tasks: unknown task(s) {unknown}; tasks: {', '.join(TASKS)}")
    return names


def main_config(cfg: ExperimentConfig) -> ExperimentConfig:
    return with_values(cfg, {"student.seeds": SEEDS, "student.targets": list(TARGETS), "student.ceiling": True,
                             "posterior.single_teachers": list(range(SEEDS))}, "study suite")


def narrow_config(cfg: ExperimentConfig) -> ExperimentConfig:
    width = max(1, round(cfg.student.model.width / 4))
    return with_values(main_config(cfg), {"student.model.width": width, "student.targets": ["single"], "student.ceiling": False},
                       "study suite (narrow)")


def k_config(cfg: ExperimentConfig, k: int) -> ExperimentConfig:
    return with_values(cfg, {"teachers.k": k, "student.seeds": SEEDS, "student.targets": ["dual_mean"], "student.ceiling": False,
                             "posterior.single_teachers": None}, f"study suite (K = {k})")


def weighting_config(cfg: ExperimentConfig, rule: str) -> ExperimentConfig:
    """The weighting study's students on the task: dual-mean students with `rule`, two sets of
    `SEEDS` seeds (the first set's plain students are the main run's, from the cache)."""
    return rule_config(with_values(cfg, {"student.seeds": SEEDS, "posterior.single_teachers": None}, "study suite (weighting)"), rule)


def weighting_rows(name: str, done: dict[str, Stages]) -> dict[str, Any]:
    """Each rule's paired difference from the plain dual-mean student over both seed sets, and
    the weighting study's verdict (final only when the two sets agree)."""
    t = weighting_table({r: done[f"{name}/weighting {r}"] for r in RULES}).set_index("rule")
    out: dict[str, Any] = {}
    for rule in RULES[1:]:
        r = t.loc[rule]
        out |= {f"w_{rule}": r["diff_vs_none"], f"w_{rule}_lo": r["diff_lo"], f"w_{rule}_hi": r["diff_hi"], f"w_{rule}_verdict": r["verdict"]}
    return out


def configs(cfg: ExperimentConfig, tasks: list[str] | None, values: dict[str, Any] | None) -> dict[str, ExperimentConfig]:
    """Each selected task's config, then the command's `--set` values (`values`, for every
    task); validated here, before any work."""
    out = {}
    for name in selected(tasks):
        out[name] = task_config(TASKS[name], cfg, tables_dir(cfg), values)
        if out[name].teachers.k < SEEDS:
            raise ConfigError(f"study suite ({name}): teachers.k={out[name].teachers.k}; the single-teacher students learn from teachers 0–{SEEDS - 1}")
    return out


CPUS_PER_LANE = 16
"""Tasks side by side (`lanes`) by default: one per this many CPUs of the cluster (a task's main
run alone trains 20 students), at least one; 2 cores run one task at a time."""


def lanes(ctx: RunContext, tasks: list[str] | None = None, parallel: int | None = None, **_: Any) -> int:
    """How many tasks run side by side (`pipeline.run_requests`): `--parallel`, else one per
    `CPUS_PER_LANE` CPUs: of the cluster joined (Ray started here to ask), or of the local Ray
    this run would start (`ray.num_cpus`, else this machine's)."""
    if parallel:
        return parallel
    r = ctx.cfg.ray
    if r.address not in (None, "local") or (r.address is None and os.environ.get("RAY_ADDRESS")):
        ctx.ray()
        cpus = ctx.executor.resources().get("CPU", 1)
    else:
        cpus = r.num_cpus or os.cpu_count() or 1
    return max(1, min(len(selected(tasks)), int(cpus // CPUS_PER_LANE)))


def scale_of(quick: bool, scale: Scale | None) -> Scale:
    return scale or (QUICK if quick else DEFAULT)


def needs(cfg: ExperimentConfig, quick: bool = False, tasks: list[str] | None = None, values: dict[str, Any] | None = None,
          scale: Scale | None = None, **_: Any) -> list[StageRequest]:
    """Every task's data first (tables are read and checked in the driver, before Ray has work),
    then per task: the main run, the narrow students, the scaling ensemble and the K students."""
    sc = scale_of(quick, scale)
    cfgs = configs(cfg, tasks, values)
    k_main = max(c.teachers.k for c in cfgs.values())
    if sc.k_max < k_main or any(k > sc.k_max or k < 1 for k in sc.student_ks):
        raise ConfigError(f"study suite: the scaling's largest K ({sc.k_max}) must be at least teachers.k ({k_main}) and every student's K {sc.student_ks}")
    reqs = [StageRequest(f"{n}/data", c, "data") for n, c in sorted(cfgs.items(), key=lambda nc: TASKS[nc[0]].make is None or "embed" in TASKS[nc[0]].values)]
    for n, c in cfgs.items():
        reqs += [StageRequest(f"{n}/main", main_config(c), "student"), StageRequest(f"{n}/narrow", narrow_config(c), "student"),
                 StageRequest(f"{n}/scaling", with_values(c, {"teachers.k": sc.k_max}, "study suite (scaling)"), "teachers")]
        reqs += [StageRequest(f"{n}/K={k}", k_config(c, k), "student") for k in sc.student_ks if k > 1]
        reqs += [StageRequest(f"{n}/weighting {r}", weighting_config(c, r), "student") for r in RULES if sc.weighting]
    return reqs


def prepare(ctx: RunContext, tasks: list[str] | None = None, **_: Any) -> None:
    """Write the selected tasks' tables: each is made again and kept only when its bytes differ
    from the file there (a damaged file is replaced; an intact one keeps its mtime, so the data
    stage's cache stays valid)."""
    tables = tables_dir(ctx.cfg)
    for name in selected(tasks):
        task = TASKS[name]
        if task.make is None:
            continue
        path = tables / task.table
        fresh = path.with_name(path.name + ".new")
        summary = task.make(fresh)
        if path.exists() and path.read_bytes() == fresh.read_bytes():
            fresh.unlink()
        else:
            fresh.replace(path)
            ctx.log(f"study suite: wrote {summary.replace(str(fresh), str(path))}")


def ci_cols(prefix: str, s: dict) -> dict[str, float]:
    lo, hi = s["ci"] if s.get("ci") else (math.nan, math.nan)
    return {prefix: s["mean"], f"{prefix}_lo": lo, f"{prefix}_hi": hi}


def pgr(accs: list[float], weak: float, ceilings: list[float]) -> dict:
    """PGR per seed against `weak` and that seed's ceiling, summarized over seeds."""
    return summarize([(a - weak) / (c - weak) if c > weak else math.nan for a, c in zip(accs, ceilings)])


def task_row(ctx: RunContext, name: str, main: Stages, narrow: Stages) -> dict[str, Any]:
    """One task's row of the suite table (see the module's docstring)."""
    post = main.labels.posterior
    teachers = main.teachers.accuracies()
    t_lo, t_hi = t_interval(teachers)
    ceil = [c.test_acc for c in main.students.ceilings]
    accs = {t: [r.test_acc for r in main.students.replicates[t]] for t in TARGETS}
    row: dict[str, Any] = {"task": name, "domain": TASKS[name].domain, "K": main.teachers.k, "classes": main.data.n_classes, "n_test": main.data.sizes.get("test"),
                           "teachers": float(teachers.mean()), "teachers_lo": t_lo, "teachers_hi": t_hi,
                           "ensemble": post.test_acc_dual, "ensemble_lo": (post.ci_dual or [math.nan])[0],
                           "ensemble_hi": (post.ci_dual or [math.nan, math.nan])[1]}
    for t in TARGETS:
        row |= ci_cols(f"student_{t}", summarize(accs[t]))
    row |= ci_cols("ceiling", summarize(ceil))
    row |= ci_cols("pgr_teacher", pgr(accs["dual_mean"], float(teachers.mean()), ceil))
    row |= ci_cols("pgr_ensemble", pgr(accs["dual_mean"], post.test_acc_dual, ceil))
    row |= ci_cols("dual_minus_single", paired(accs["dual_mean"], accs["single"]))
    row["V"] = post.variance_test
    dec, rows = decomposition(ctx, main)
    row |= ci_cols("c2_remainder", crossed(rows["single"]["remainder"]))
    g = dec[dec["target"] == "single"]
    row["c2_gain_over_misfit"] = float(g["gain"].mean() / g["misfit"].mean())
    n = len(main.students.replicates["single"])
    w = jackknife_weights(n)
    q = read_test_posterior(main.labels.dir)["dual_log"].double()
    bv_wide = p5(ctx, main, w)
    bv_narrow, _ = set_stats(stacked(narrow, "single"), w, q)
    row |= ci_cols("p5_bv_wide_minus_narrow", jack_stat(bv_wide["bv_students"] - bv_narrow, n))
    row["p5_bv_students"] = float(bv_wide["bv_students"][0].mean())
    row["p5_bv_teachers"] = float(bv_wide["bv_teachers"][0].mean())
    c2_ci = (row["c2_remainder_lo"], row["c2_remainder_hi"])
    row["c2_verdict"] = "inconclusive" if not all(map(math.isfinite, c2_ci)) or c2_ci[0] <= 0 <= c2_ci[1] else "not supported"
    row["p5_verdict"] = verdict([row["p5_bv_wide_minus_narrow_lo"], row["p5_bv_wide_minus_narrow_hi"]], -1)
    return row


def fit_inverse_k(ks: np.ndarray, v: np.ndarray) -> tuple[float, float, float]:
    """Least squares V(K) = V∞ + b/K: (V∞, b, R²)."""
    a = np.stack([np.ones_like(ks, dtype=np.float64), 1.0 / ks], 1)
    coef, *_ = np.linalg.lstsq(a, v, rcond=None)
    resid = v - a @ coef
    ss = float(((v - v.mean()) ** 2).sum())
    return float(coef[0]), float(coef[1]), 1.0 - float((resid**2).sum()) / ss if ss > 0 else math.nan


def scaling_rows(name: str, cfg: ExperimentConfig, main: Stages, big: Stages) -> tuple[pd.DataFrame, dict[str, float]]:
    """The ensemble at every K = 1, 2, 4, …, k_max (K = 1: the mean single teacher, V = 0) with
    bootstrap CIs over teachers, and the fit V(K) ≈ V∞ + b/K over K ≥ 2."""
    table = variance_table(cfg, big.teachers, main.data.splits["test"].y, main.data.n_classes)
    acc = big.teachers.accuracies()
    lo, hi = t_interval(acc)
    one = {"K": 1, "acc_dual": float(acc.mean()), "acc_dual_lo": lo, "acc_dual_hi": hi, "acc_arith": float(acc.mean()),
           "acc_arith_lo": lo, "acc_arith_hi": hi, "variance": 0.0, "mutual_info": 0.0, "kl_full_to_K": math.nan}
    table = pd.concat([pd.DataFrame([one]), table], ignore_index=True)
    table.insert(0, "task", name)
    fit = table[table["K"] >= 2]
    v_inf, b, r2 = fit_inverse_k(fit["K"].to_numpy(np.float64), fit["variance"].to_numpy(np.float64))
    last = table.iloc[-1]
    bad = np.nonzero((table["acc_dual"] < last["acc_dual_lo"]).to_numpy())[0]  # K whose ensemble is below the largest's CI
    enough = int(table["K"].iloc[bad[-1] + 1 if len(bad) else 0])  # from here on, every K is within it
    return table, {"v_inf": v_inf, "v_b": b, "v_r2": r2, "k_ensemble_enough": enough, "k_max": int(last["K"])}


def k_students(name: str, done: dict[str, Stages], scale: Scale) -> pd.DataFrame:
    """The dual-mean student at each K (K = 1: the single-teacher students of the main run),
    with PGR per seed against the mean teacher and against the K-teacher ensemble, and its
    paired difference from the best K."""
    main = done[f"{name}/main"]
    ceil = [c.test_acc for c in main.students.ceilings]
    teacher_mean = float(main.teachers.accuracies().mean())
    accs, ens = {}, {}
    for k in scale.student_ks:
        if k == 1:
            reps = main.students.replicates["single"]
            ens[k] = teacher_mean
        else:
            s = done[f"{name}/K={k}"]
            reps = s.students.replicates["dual_mean"]
            ens[k] = s.labels.posterior.test_acc_dual
        accs[k] = [r.test_acc for r in reps]
    best = max(accs, key=lambda k: np.mean(accs[k]))
    rows = []
    for k in scale.student_ks:
        d = paired(accs[k], accs[best]) if k != best else {"mean": 0.0, "ci": None}
        rows.append({"task": name, "K": k, **ci_cols("student", summarize(accs[k])), "ensemble": ens[k],
                     **ci_cols("pgr_teacher", pgr(accs[k], teacher_mean, ceil)), **ci_cols("pgr_ensemble", pgr(accs[k], ens[k], ceil)),
                     **ci_cols("minus_best", d), "within_margin": k == best or bool(d.get("ci") and d["ci"][0] > -MARGIN)})
    return pd.DataFrame(rows)


def fmt_ci(t: pd.DataFrame, col: str, digits: int = 3) -> pd.Series:
    return t.apply(lambda r: f"{r[col]:.{digits}f} [{r[col + '_lo']:.{digits}f}, {r[col + '_hi']:.{digits}f}]"
                   if math.isfinite(r[col + "_lo"]) else f"{r[col]:.{digits}f}", axis=1)


def draw_tasks(t: pd.DataFrame):
    def draw(fig) -> None:
        ax, bx = fig.subplots(1, 2)
        x = np.arange(len(t))
        for i, (col, label) in enumerate((("teachers", "teachers (mean)"), ("ensemble", "ensemble (dual mean)"),
                                          ("student_dual_mean", "student of the dual mean"), ("student_single", "student of one teacher"),
                                          ("ceiling", "ceiling (gold labels)"))):
            err = np.abs(np.stack([t[col] - t[f"{col}_lo"], t[f"{col}_hi"] - t[col]]))
            ax.errorbar(x + (i - 2) * 0.12, t[col], yerr=np.nan_to_num(err), fmt="o", ms=4, capsize=2, label=label)
        ax.set_xticks(x, t["task"], rotation=30, ha="right")
        ax.set_ylabel("gold test accuracy (95% CI)")
        ax.legend(fontsize=7)
        for i, (col, label) in enumerate((("pgr_teacher", "PGR vs mean teacher"), ("pgr_ensemble", "PGR vs ensemble"))):
            err = np.abs(np.stack([t[col] - t[f"{col}_lo"], t[f"{col}_hi"] - t[col]]))
            bx.errorbar(x + (i - 0.5) * 0.2, t[col], yerr=np.nan_to_num(err), fmt="s", ms=4, capsize=2, label=label)
        bx.axhline(0, color="gray", lw=0.8)
        bx.set_xticks(x, t["task"], rotation=30, ha="right")
        bx.set_ylabel("PGR of the dual-mean student (95% CI over seeds)")
        bx.legend(fontsize=7)
    return draw


def draw_scaling(scaling: pd.DataFrame, ks: pd.DataFrame, tasks: pd.DataFrame):
    def draw(fig) -> None:
        ax, bx, cx = fig.subplots(1, 3)
        for name, g in scaling.groupby("task", sort=False):
            r = tasks.set_index("task").loc[name]
            gap = r["ceiling"] - r["teachers"]
            ax.plot(g["K"], (g["acc_dual"] - r["teachers"]) / gap, marker=".", label=name)
            g2 = g[g["K"] >= 2]
            bx.plot(g2["K"], g2["variance"] / g2["variance"].iloc[-1], marker=".", label=name)
        for name, g in ks.groupby("task", sort=False):
            err = np.abs(np.stack([g["pgr_teacher"] - g["pgr_teacher_lo"], g["pgr_teacher_hi"] - g["pgr_teacher"]]))
            cx.errorbar(g["K"], g["pgr_teacher"], yerr=np.nan_to_num(err), marker="o", ms=3, capsize=2, label=name)
        for a, title in ((ax, "ensemble: (acc(K) − teachers) / (ceiling − teachers)"), (bx, "V(K) / V(K_max)"),
                         (cx, "dual-mean student: PGR vs mean teacher (95% CI)")):
            a.set_xscale("log", base=2)
            a.set_xlabel("K teachers")
            a.set_title(title, fontsize=9)
        cx.axhline(0, color="gray", lw=0.8)
        ax.legend(fontsize=7)
    return draw


def weighting_section(wview: pd.DataFrame | None) -> list[str]:
    head = ["## Variance-aware students, per task", ""]
    if wview is None:
        return head + ["Not run with `--quick`: the default suite runs the weighting study's students on every task.", ""]
    return head + [
        "Dual-mean students whose loss weighs each transfer row by its teacher variance V_i (`variance`: exp(−V_i / mean V); "
        f"`drop_disputed`: the {ExperimentConfig().student.drop_frac:.0%} most disputed rows left out), against the plain dual-mean "
        f"student on the same seeds: the difference in test accuracy over 2 × {SEEDS} seeds, paired (95%), and the weighting "
        "study's verdict, final only when both seed sets agree.",
        "",
        wview.to_markdown(index=False),
        "",
    ]


def run(ctx: RunContext, done: dict[str, Stages], out: Path, quick: bool = False, tasks: list[str] | None = None,
        values: dict[str, Any] | None = None, scale: Scale | None = None, **_: Any) -> Path:
    sc = scale_of(quick, scale)
    cfgs = configs(ctx.cfg, tasks, values)
    rows, scal, kst, fits = [], [], [], []
    for name, cfg in cfgs.items():
        ctx.log(f"study suite: {name}")
        main = done[f"{name}/main"]
        rows.append(task_row(ctx, name, main, done[f"{name}/narrow"]) | (weighting_rows(name, done) if sc.weighting else {}))
        table, fit = scaling_rows(name, cfg, main, done[f"{name}/scaling"])
        scal.append(table)
        k = k_students(name, done, sc)
        kst.append(k)
        fits.append({"task": name, **fit, "k_student_enough": int(k.loc[k["within_margin"], "K"].min()),
                     "k_student_best": int(k.loc[k["student"].idxmax(), "K"])})
    t, scaling, ks, fit = pd.DataFrame(rows), pd.concat(scal, ignore_index=True), pd.concat(kst, ignore_index=True), pd.DataFrame(fits)
    for name, frame in (("suite", t), ("scaling", scaling), ("students_k", ks), ("worth", fit)):
        write_table(ctx.run, out / f"{name}.parquet", frame)
    figure(ctx.run, out / "suite.png", draw_tasks(t), figsize=(13, 4.5))
    figure(ctx.run, out / "scaling.png", draw_scaling(scaling, ks, t), figsize=(15, 4.2))
    view = pd.DataFrame({"task": t["task"], "domain": t["domain"], "K": t["K"], "teachers": fmt_ci(t, "teachers"), "ensemble": fmt_ci(t, "ensemble"),
                         "student (dual)": fmt_ci(t, "student_dual_mean"), "student (arith)": fmt_ci(t, "student_arith_mean"),
                         "student (single)": fmt_ci(t, "student_single"), "ceiling": fmt_ci(t, "ceiling"),
                         "PGR vs teachers": fmt_ci(t, "pgr_teacher", 2), "PGR vs ensemble": fmt_ci(t, "pgr_ensemble", 2),
                         "V": t["V"].map(lambda v: f"{v:.4f}")})
    claims_view = pd.DataFrame({"task": t["task"], "C2 remainder (single)": fmt_ci(t, "c2_remainder", 4),
                                "gain/misfit": t["c2_gain_over_misfit"].map(lambda v: f"{v:.2f}"), "C2": t["c2_verdict"],
                                "P5: BV(w) − BV(w/4)": fmt_ci(t, "p5_bv_wide_minus_narrow", 4),
                                "BV students / teachers": (t["p5_bv_students"] / t["p5_bv_teachers"]).map(lambda v: f"{v:.2f}"), "P5": t["p5_verdict"]})
    wview = pd.DataFrame({"task": t["task"], **{f"{r} − none": fmt_ci(t, f"w_{r}", 4) + ": " + t[f"w_{r}_verdict"] for r in RULES[1:]}}) \
        if sc.weighting else None
    worth = fit.assign(**{"V∞ + b/K": fit.apply(lambda r: f"{r['v_inf']:.4f} {r['v_b']:+.4f}/K (R² {r['v_r2']:.3f})", axis=1)})[
        ["task", "k_max", "k_ensemble_enough", "k_student_enough", "k_student_best", "V∞ + b/K"]]
    kview = ks.assign(student=fmt_ci(ks, "student"), pgr_teacher=fmt_ci(ks, "pgr_teacher", 2), pgr_ensemble=fmt_ci(ks, "pgr_ensemble", 2),
                      minus_best=fmt_ci(ks, "minus_best"))[["task", "K", "student", "ensemble", "pgr_teacher", "pgr_ensemble", "minus_best"]]
    report = [
        f"# Suite study: {len(t)} tasks{' (--quick)' if quick else ''}",
        "",
        f"Every task on its own config (`w2s_ray/tasks.py`: data, the teachers' weak view, the student's strong view); "
        f"K teachers (column K), {SEEDS} students per setting (single-teacher students on teachers 0–{SEEDS - 1}), the ceiling per seed. "
        "95% CIs: over teachers (teachers: t; ensemble: bootstrap), over seeds (students, ceiling, PGR: per seed, against that "
        "seed's ceiling), over seeds and test rows (C2), jackknife over teacher draws and test rows (P5).",
        "",
        "![tasks](suite.png)",
        "",
        view.to_markdown(index=False),
        "",
        "## The claims study's single-teacher statistics, per task",
        "",
        "C2: a single-teacher student's gain over its teacher (gold CE, test) minus its misfit KL(student ‖ teacher); the paper's "
        "claim is 0 (a CI that excludes 0 refutes it; one that contains 0 cannot confirm it). P5: the Bregman variance across "
        f"the {SEEDS} teacher draws of single-teacher students at the task's student width minus at a quarter of it; the paper "
        "claims it falls with capacity (supported: CI below 0).",
        "",
        claims_view.to_markdown(index=False),
        "",
        *weighting_section(wview),
        f"## How many teachers are worth it? (K up to {sc.k_max})",
        "",
        "![scaling](scaling.png)",
        "",
        "`k_ensemble_enough`: the smallest K from which every larger K's ensemble (dual mean) is within the "
        f"K = {sc.k_max} ensemble's 95% CI. `k_student_enough`: the smallest K whose dual-mean student is within {MARGIN} of the best "
        f"K's test accuracy with 95% confidence (the paired CI of the difference lies above −{MARGIN}; K = 1 is a student of one teacher). V(K) is the first K teachers' variance around their own "
        "dual mean, fitted over K ≥ 2.",
        "",
        worth.to_markdown(index=False),
        "",
        kview.to_markdown(index=False, floatfmt=".4f"),
        "",
        "Tables: `suite.parquet` (every column with its CI), `scaling.parquet` (the ensemble at every K), `students_k.parquet`, "
        "`worth.parquet`. Every student's test predictions are in its directory (`test_logp.parquet`).",
    ]
    ctx.run.write_text(out / "report.md", "\n".join(report) + "\n")
    ctx.run.write_json(out / "summary.json", {"quick": quick, "k_max": sc.k_max, "tasks": t.to_dict(orient="records"),
                                               "worth": fit.to_dict(orient="records")})
    print(view.to_string(index=False))
    print()
    print(worth.to_string(index=False))
    print(f"\nreport: {out / 'report.md'}")
    return out
