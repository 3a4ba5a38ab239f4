"""The claims study: the paper's claims, each measured over ≥ 5 seeds with a 95% CI and a
verdict computed from the CI (`replicates.verdict`), never typed by hand.

Runs (all from the pipeline's cache where they exist, each student on its own key):
- "main": the config with `student.seeds` ≥ 5, targets dual mean, arithmetic mean and single,
  the single target's replicate i on teacher i (`posterior.single_teachers`: 5 teacher draws),
  and the gold ceiling per seed.
- "width w": dual-mean and single-teacher students at `WIDTH_FACTORS` × the configured width.
- "rce λ=…": the dual-mean student with reverse-CE weight λ ∈ `LAMBDAS`, `selection: last`
  (every epoch trained, the last weights kept), so λ cannot change which epoch is chosen, as
  early stopping on the λ-dependent holdout loss would.

Claims measured: C1 (posterior-mean student vs single-teacher students across teacher draws),
C2 (risk gap = misfit + remainder, exactly, on the test split, which no student trained on),
C2b (the remainder shrinks with width), C3 (capacity: distance to the posterior mean against
width), C4 (entropy against gain), C5 (reverse CE mixed in), C6 (dual vs arithmetic mean).
Every student's test predictions are saved in its directory (`test_logp.parquet`);
`students.parquet` lists them, so each number can be recomputed from the files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from w2s_ray.config import ExperimentConfig, with_values
from w2s_ray.errors import ConfigError
from w2s_ray.labels import read_test_posterior
from w2s_ray.packfiles import single_teacher
from w2s_ray.posterior import gold_ce, kl
from w2s_ray.replicates import fisher_ci, paired, summarize, verdict
from w2s_ray.report import md_section, write_table
from w2s_ray.run import RunContext, StageRequest, Stages

SEEDS = 5
LAMBDAS = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)
EQUIVALENCE = 0.1
"""C2: "the gain is the misfit" counts as supported when the remainder's CI lies within ±10% of
the mean misfit, not supported when it lies outside that band."""


def main_config(cfg: ExperimentConfig) -> ExperimentConfig:
    seeds = max(SEEDS, cfg.student.seeds)
    return with_values(cfg, {"student.seeds": seeds, "student.targets": ["dual_mean", "arith_mean", "single"], "student.ceiling": True,
                             "posterior.single_teachers": list(range(seeds))}, "study claims")


def rce_config(cfg: ExperimentConfig, lam: float) -> ExperimentConfig:
    return with_values(cfg, {"student.seeds": max(SEEDS, cfg.student.seeds), "student.targets": ["dual_mean"], "student.ceiling": False,
                             "student.loss": "mixture", "student.rce_weight": lam, "student.selection": "last",
                             "posterior.single_teachers": None}, f"study claims (λ = {lam})")


WIDTH_FACTORS = (0.25, 0.5, 1, 2)
"""C2's trend, C3 and C4: the dual-mean and single-teacher students at these multiples of the
configured width (the configured width's students are the main run's, from the cache)."""


def widths(cfg: ExperimentConfig) -> list[int]:
    return sorted({max(1, round(cfg.student.model.width * f)) for f in WIDTH_FACTORS})


def width_config(cfg: ExperimentConfig, width: int) -> ExperimentConfig:
    seeds = max(SEEDS, cfg.student.seeds)
    return with_values(cfg, {"student.model.width": width, "student.seeds": seeds, "student.targets": ["dual_mean", "single"],
                             "student.ceiling": False, "posterior.single_teachers": list(range(seeds))}, f"study claims (width {width})")


WARMUP = (0.5, 0.5)
"""C5b: reverse CE as a fine-tuning phase: λ = 0.5 after the first half of training in forward CE."""


def warmup_config(cfg: ExperimentConfig) -> ExperimentConfig:
    lam, warm = WARMUP
    return with_values(rce_config(cfg, lam), {"student.rce_warmup": warm}, "study claims (reverse CE after warm-up)")


def needs(cfg: ExperimentConfig) -> list[StageRequest]:
    if cfg.teachers.k < SEEDS:
        raise ConfigError(f"study claims: teachers.k={cfg.teachers.k}; C1 needs at least {SEEDS} teachers to draw single teachers from")
    return ([StageRequest("main", main_config(cfg), "student")]
            + [StageRequest(f"rce {lam}", rce_config(cfg, lam), "student") for lam in LAMBDAS]
            + [StageRequest("rce after warm-up", warmup_config(cfg), "student")]
            + [StageRequest(f"width {w}", width_config(cfg, w), "student") for w in widths(cfg)])


def claim_row(claim: str, statement: str, measurement: str, stat: dict, direction: int = 1, verdict_of: str | None = None) -> dict:
    lo, hi = stat["ci"] if stat.get("ci") else (np.nan, np.nan)
    return {"claim": claim, "statement": statement, "measurement": measurement, "n": stat["n"], "effect": stat["mean"],
            "ci_lo": lo, "ci_hi": hi, "p": stat.get("p", np.nan), "verdict": verdict_of or verdict(stat.get("ci"), direction)}


def accs(reps) -> list[float]:
    return [r.test_acc for r in reps]


def decomposition(ctx: RunContext, s: Stages) -> pd.DataFrame:
    """C2 per replicate, on the test split: gain = CE(teacher) − CE(student), misfit = mean
    KL(student ‖ teacher), remainder = gain − misfit, which equals mean ⟨y − s, log s − log p⟩
    exactly (checked: `identity_error`). For a single-teacher student the teacher is its own;
    for a dual-mean student it is the average single teacher: CE is the mean over the K
    teachers' CE and the misfit mean_k KL(s ‖ p_k) = KL(s ‖ q) + V (q the dual mean, V the
    teacher variance), both exact."""
    y = torch.from_numpy(s.data.splits["test"].y)
    test = read_test_posterior(s.labels.dir)
    rows = []
    for tgt in ("single", "dual_mean"):
        for i, r in enumerate(s.students.replicates[tgt]):
            log_s = torch.from_numpy(s.students.test_logp(tgt, i)).double()
            if tgt == "single":
                log_p = single_teacher(s.teachers, "test", r.teacher, run=ctx.run).double()
                ce_teacher = gold_ce(log_p, y)
                misfit = float(kl(log_s, log_p).mean())
                onehot = torch.nn.functional.one_hot(y, log_s.shape[1]).double()
                cross = float(((onehot - log_s.exp()) * (log_s - log_p.clamp_min(-1e4))).sum(-1).mean())
            else:
                q = test["dual_log"].double()
                v = test["variance"].double()
                # mean_k CE(p_k) = CE(q) + V on average over examples (the Bregman identity)
                ce_teacher = float(-q.gather(-1, y[:, None]).squeeze(-1).mean() + v.mean())
                misfit = float((kl(log_s, q) + v).mean())
                onehot = torch.nn.functional.one_hot(y, log_s.shape[1]).double()
                cross = float(((onehot - log_s.exp()) * (log_s - q)).sum(-1).mean())
            gain = ce_teacher - gold_ce(log_s, y)
            rows.append({"target": tgt, "seed": r.seed, "teacher": r.teacher, "teacher_ce": ce_teacher, "student_ce": gold_ce(log_s, y),
                         "gain": gain, "misfit": misfit, "remainder": gain - misfit, "identity_error": abs(gain - misfit - cross),
                         "kl_to_dual_mean": float(kl(log_s, test["dual_log"].double()).mean()), "entropy": r.eval.entropy_test,
                         "test_acc": r.test_acc})
    out = pd.DataFrame(rows)
    out["teacher"] = out["teacher"].astype("Int64")  # none for dual-mean students
    return out


def single_students_mean(s: Stages) -> float:
    """KL(s̄ ‖ q) on test: s̄ the dual mean (softmax of mean log-probs) of the students each
    trained on one teacher, q the teachers' dual posterior mean."""
    logs = torch.stack([torch.from_numpy(s.students.test_logp("single", i)).double() for i in range(len(s.students.replicates["single"]))])
    mean = torch.log_softmax(logs.mean(0), -1)
    return float(kl(mean, read_test_posterior(s.labels.dir)["dual_log"].double()).mean())


def run(ctx: RunContext, done: dict[str, Stages], out: Path) -> Path:
    main = done["main"]
    reps = main.students.replicates
    n = len(reps["dual_mean"])
    claims = []
    # C1: the posterior-mean student against students each trained on one teacher (teacher i, seed i)
    c1 = paired(accs(reps["dual_mean"]), accs(reps["single"]))
    claims.append(claim_row("C1", "a student of the posterior-mean (dual) teacher beats students of single teachers",
                            f"test acc, dual-mean student − single-teacher student, paired by seed, {n} teacher draws", c1))
    # C2: the exact decomposition; for dual-mean students the remainder should vanish
    dec = decomposition(ctx, main)
    write_table(ctx.run, out / "c2_decomposition.parquet", dec)
    dual = dec[dec["target"] == "dual_mean"]
    rem = summarize(dual["remainder"])
    band = EQUIVALENCE * float(dual["misfit"].mean())
    lo, hi = rem["ci"]
    c2_verdict = "supported" if -band < lo and hi < band else ("not supported" if hi < -band or lo > band else "inconclusive")
    claims.append(claim_row("C2", "the student's gain over its teachers is the misfit (remainder ≈ 0 for the posterior-mean student)",
                            f"remainder = gain − misfit (gold CE, test split), dual-mean students; supported within ±{EQUIVALENCE:.0%} of the misfit ({band:.4f})",
                            rem, verdict_of=c2_verdict))
    # C2's trend, C3, C4: across widths
    ws = [w for w in widths(ctx.cfg) if f"width {w}" in done]
    by_width = pd.concat([decomposition(ctx, done[f"width {w}"]).assign(width=w) for w in ws], ignore_index=True)
    write_table(ctx.run, out / "widths.parquet", by_width)
    means = pd.DataFrame([{"width": w, "kl_single_students_mean_to_dual_mean": single_students_mean(done[f"width {w}"])} for w in ws])
    dual_w = by_width[by_width["target"] == "dual_mean"].sort_values(["width", "seed"])
    narrow, wide = (dual_w[dual_w["width"] == w] for w in (ws[0], ws[-1]))
    trend = paired(wide["remainder"].abs().to_numpy(), narrow["remainder"].abs().to_numpy())
    claims.append(claim_row("C2b", "the remainder vanishes as the student grows",
                            f"|remainder| of dual-mean students at width {ws[-1]} − at width {ws[0]}, paired by seed", trend, direction=-1))
    c3 = paired(wide["kl_to_dual_mean"].to_numpy(), narrow["kl_to_dual_mean"].to_numpy())
    claims.append(claim_row("C3", "a student with more capacity comes closer to the posterior-mean teacher",
                            f"KL(student ‖ dual mean) on test at width {ws[-1]} − at width {ws[0]}, dual-mean students, paired by seed", c3, direction=-1))
    c4 = fisher_ci(dual_w["entropy"].to_numpy(), dual_w["gain"].to_numpy())
    claims.append(claim_row("C4", "a student with lower entropy gains more over its teachers",
                            f"Pearson r of entropy and gain (gold CE) over dual-mean students, {len(ws)} widths × seeds, λ fixed "
                            f"at {ctx.cfg.student.rce_weight:g} (Fisher CI; width moves both)", c4, direction=-1))
    # C5: reverse CE mixed in, selection held fixed
    lam_rows, base = [], done[f"rce {LAMBDAS[0]}"].students.replicates["dual_mean"]
    family = 1 - 0.05 / (len(LAMBDAS) - 1)  # Bonferroni over the λ > 0 compared with λ = 0
    for lam in LAMBDAS:
        r = done[f"rce {lam}"].students.replicates["dual_mean"]
        d = paired(accs(r), accs(base), level=family)
        d_ce = paired([x.eval.test_gold_ce for x in r], [x.eval.test_gold_ce for x in base], level=family)
        a = summarize(accs(r))
        lam_rows.append({"lambda": lam, "n": a["n"], "test_acc": a["mean"], "test_acc_sd": a["sd"],
                         "gold_ce": float(np.mean([x.eval.test_gold_ce for x in r])),
                         "acc_minus_lambda0": d["mean"], "acc_ci_lo": d["ci"][0] if d["ci"] else np.nan, "acc_ci_hi": d["ci"][1] if d["ci"] else np.nan,
                         "ce_minus_lambda0": d_ce["mean"], "verdict_acc": verdict(d["ci"]) if lam > 0 else "",
                         "_stat": d})
    lam_table = pd.DataFrame(lam_rows)
    mixes = [row for row in lam_rows if 0 < row["lambda"] < 1]
    verdicts = [row["verdict_acc"] for row in mixes]
    c5 = "supported" if "supported" in verdicts else ("not supported" if all(v == "not supported" for v in verdicts) else "inconclusive")
    best = max(mixes, key=lambda row: row["acc_minus_lambda0"])
    grid = ", ".join(f"{m['lambda']:g}" for m in mixes)
    claims.append(claim_row("C5", "mixing reverse CE into the student's loss improves it",
                            f"test acc at λ ∈ {{{grid}}} − at λ = 0, paired by seed, fixed epochs "
                            f"(selection: last), Bonferroni CIs; best λ = {best['lambda']:g} shown", best["_stat"], verdict_of=c5))
    warm = done["rce after warm-up"].students.replicates["dual_mean"]
    c5b = paired(accs(warm), accs(base))
    claims.append(claim_row("C5b", "reverse CE as a fine-tuning phase after forward-CE warm-up improves the student",
                            f"test acc, λ = {WARMUP[0]:g} after {WARMUP[1]:.0%} of training in forward CE − λ = 0, paired by seed, fixed epochs", c5b))
    # C6: dual vs arithmetic mean as the teacher target
    c6 = paired(accs(reps["dual_mean"]), accs(reps["arith_mean"]))
    claims.append(claim_row("C6", "the dual (log-space) posterior mean is the better target than the arithmetic mean",
                            "test acc, dual-mean student − arithmetic-mean student, paired by seed", c6))
    table = pd.DataFrame(claims)
    write_table(ctx.run, out / "claims.parquet", table)
    write_table(ctx.run, out / "c5_rce.parquet", lam_table.drop(columns="_stat"))
    students = pd.DataFrame([{"run": name, "target": "ceiling" if tgt is None else tgt, "replicate": i, "dir": str(d)}
                             for name, s in done.items() for (tgt, i), d in s.students.dirs.items()])
    write_table(ctx.run, out / "students.parquet", students)
    acc_table = pd.DataFrame([{"who": tgt, **{k: v for k, v in summarize(accs(r)).items() if k != "ci"},
                               "ci": "[{:.4f}, {:.4f}]".format(*summarize(accs(r))["ci"]) if len(r) > 1 else ""} for tgt, r in [*reps.items(), ("ceiling", main.students.ceilings)]])
    report = [
        "# The paper's claims, measured",
        "",
        f"Config: teachers K = {main.teachers.k}, student {main.students.students['dual_mean'].n_params:,} parameters, {n} seeds per setting; "
        "every effect is a paired difference over the same seeds with a 95% Student-t CI, and every verdict is computed from "
        "that CI: supported (CI excludes 0 in the predicted direction), not supported (excludes 0 in the other direction), "
        "inconclusive (contains 0).",
        "",
        table.drop(columns=["statement"]).to_markdown(index=False, floatfmt=".4f"),
        "",
        f"{len(table)} verdicts at the 5% level each: with no effect anywhere, about {0.05 * len(table):.1f} of them would "
        "still exclude 0 by chance. C3 and C4 describe students trained on the posterior mean itself; they are not the "
        "paper's claim that a student of one teacher approaches the posterior mean.",
        "",
        *[f"- **{r.claim}**: {r.statement}." for r in table.itertuples()],
        *md_section("Students (test accuracy over seeds)", "The single-teacher students learn from teachers "
                    f"{[r.teacher for r in reps['single']]}, one per seed.", acc_table, "`students.parquet` (each student's directory, with `test_logp.parquet`)"),
        *md_section("C2: gain = misfit + remainder, per replicate", "On the test split (held out from every student): gain = gold CE of "
                    "the teacher − gold CE of the student; misfit = mean KL(student ‖ teacher); remainder = mean ⟨y − s, log s − log p⟩ "
                    "(`identity_error` is |gain − misfit − remainder| computed independently). For dual-mean students the teacher is "
                    "the average single teacher (mean_k CE(p_k) = CE(q) + V, mean_k KL(s ‖ p_k) = KL(s ‖ q) + V, both exact). "
                    "The paper expects the remainder to vanish as the student approaches the posterior mean; its trend over width "
                    "is C2b (`widths.parquet`). For a dual-mean student the misfit includes the teacher variance V, which cancels "
                    "from the remainder: read the remainder against KL(s ‖ q), not against the misfit.", dec, "`c2_decomposition.parquet`"),
        *md_section("C2b, C3, C4: students across widths", "Per width, the mean over seeds of each student's decomposition, "
                    "its KL to the dual posterior mean and its entropy (`widths.parquet` has every replicate). "
                    "`kl_single_students_mean_to_dual_mean`: how close the dual mean of the students each trained on one teacher "
                    "comes to the teachers' posterior mean (the paper: in expectation over teacher draws, students converge to it).",
                    by_width.groupby(["target", "width"])[["test_acc", "gain", "misfit", "remainder", "kl_to_dual_mean", "entropy"]].mean().reset_index()
                    .merge(means, on="width"), "`widths.parquet`"),
        *md_section("C5: reverse-CE weight λ, every epoch trained (selection: last)", "λ = 1 is pure reverse CE: from a random "
                    "initialization its gradient is weighted by the student's own near-uniform probabilities and it can settle on a "
                    "confident wrong class, so it is reported but left out of the verdict, which covers mixtures 0 < λ < 1; "
                    "C5b starts reverse CE after a forward-CE warm-up instead.", lam_table.drop(columns="_stat"), "`c5_rce.parquet`"),
    ]
    ctx.run.write_text(out / "report.md", "\n".join(report) + "\n")
    print(table.drop(columns=["statement"]).to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"\nreport: {out / 'report.md'}")
    return out
