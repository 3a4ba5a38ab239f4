"""The claims study: the paper's claims, each measured over ≥ 5 seeds with a 95% CI and a
verdict computed from the CI (`replicates.verdict`), never typed by hand.

Runs (all from the pipeline's cache where they exist, each student on its own key):
- "main": the config with `student.seeds` ≥ 5, targets dual mean, arithmetic mean and single,
  the single target's replicate i on teacher i (`posterior.single_teachers`: 5 teacher draws),
  and the gold ceiling per seed.
- "width w": dual-mean and single-teacher students at `WIDTH_FACTORS` × the configured width.
- "confidence": the λ = 0 student with Burns et al.'s confidence term (`CONFIDENCE`) added.
- "rce λ=…": the dual-mean student with reverse-CE weight λ ∈ `LAMBDAS`, `selection: last`
  (every epoch trained, the last weights kept), so λ cannot change which epoch is chosen, as
  early stopping on the λ-dependent holdout loss would.

Claims measured: C1 (posterior-mean student vs single-teacher students across teacher draws),
C2 (a single-teacher student's gain = its misfit + a remainder, exactly, on the test split,
which no student trained on; the claim is remainder = 0), C2b (the remainder shrinks with
width), C3 (the paper's P5: students of one teacher stop depending on which teacher, as width
grows: their Bregman variance across `DRAWS` teacher draws), C3b (they come closer to the
posterior mean), S1 (a sanity row, not a claim: students of the posterior mean fit it better
with width), C4 (a confidence term lowers the student's entropy at fixed width and target: does it
help?), C5 (reverse CE mixed in), C6 (dual vs
arithmetic mean).
Every CI counts the test split's sampling beside the seeds' and teacher draws' (the claims are
means over test rows, `replicates.crossed`).
Every student's test predictions are saved in its directory (`test_logp.parquet`);
`students.parquet` lists them, so each number can be recomputed from the files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import special

from w2s_ray.config import ExperimentConfig, with_values
from w2s_ray.errors import ConfigError
from w2s_ray.labels import read_test_posterior
from w2s_ray.packfiles import single_teacher
from w2s_ray.posterior import kl
from w2s_ray.replicates import crossed, paired_rows, summarize, two_level_means, two_level_weights, verdict
from w2s_ray.report import md_section, write_table
from w2s_ray.run import RunContext
from w2s_ray.results import StageRequest, Stages

SEEDS = 5
"""Replicates per seed set. Every setting runs two disjoint sets (`SETS`): replicates 0–4 and
5–9 (student seeds, and for single-teacher students teachers 0–4 and 5–9). Each claim's verdict
is computed on each set; it is final only when the two sets agree, else "not replicated"."""
SETS = 2
REPLICATES = SETS * SEEDS
LAMBDAS = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)


def replicates(cfg: ExperimentConfig) -> int:
    """Replicates of every setting: both seed sets (more when the config asks for more seeds)."""
    return max(REPLICATES, cfg.student.seeds)


def main_config(cfg: ExperimentConfig) -> ExperimentConfig:
    seeds = replicates(cfg)
    return with_values(cfg, {"student.seeds": seeds, "student.targets": ["dual_mean", "arith_mean", "single"], "student.ceiling": True,
                             "posterior.single_teachers": list(range(seeds))}, "study claims")


def rce_config(cfg: ExperimentConfig, lam: float) -> ExperimentConfig:
    return with_values(cfg, {"student.seeds": replicates(cfg), "student.targets": ["dual_mean"], "student.ceiling": False,
                             "student.loss": "mixture", "student.rce_weight": lam, "student.selection": "last",
                             "posterior.single_teachers": None}, f"study claims (λ = {lam})")


WIDTH_FACTORS = (0.25, 0.5, 1, 2)
"""C2's trend and C3: the dual-mean and single-teacher students at these multiples of the
configured width (the configured width's first students are the main run's, from the cache)."""

DRAWS = REPLICATES
"""C3 (the paper's P5): at every width, single-teacher students on this many teacher draws
(draw i: teacher i, student seed i; both seed sets), and as many dual-mean students (seeds
only: the floor)."""

BOOT = 2000
"""Two-level bootstrap resamples (replicates × test rows) for the C2 ratios."""


def widths(cfg: ExperimentConfig) -> list[int]:
    return sorted({max(1, round(cfg.student.model.width * f)) for f in WIDTH_FACTORS})


def width_config(cfg: ExperimentConfig, width: int) -> ExperimentConfig:
    seeds = replicates(cfg)
    return with_values(cfg, {"student.model.width": width, "student.seeds": seeds, "student.targets": ["dual_mean", "single"],
                             "student.ceiling": False, "posterior.single_teachers": list(range(seeds))}, f"study claims (width {width})")


WARMUP = (0.5, 0.5)
"""C5b: reverse CE as a fine-tuning phase: λ = 0.5 after the first half of training in forward CE."""


def warmup_config(cfg: ExperimentConfig) -> ExperimentConfig:
    lam, warm = WARMUP
    return with_values(rce_config(cfg, lam), {"student.rce_warmup": warm}, "study claims (reverse CE after warm-up)")


CONFIDENCE = 0.25
"""C4: the weight α of Burns et al.'s confidence term, (1 − α)·CE(teacher) + α·CE(the student's
own argmax) (`losses.aux_confidence`, ramped in over `student.aux_warmup`), which lowers the
student's entropy at fixed width and target; compared with the λ = 0 student (plain forward
CE), both `selection: last` at fixed epochs, paired by seed. A small α: the term should sharpen
the student, not replace its teacher."""


def confidence_config(cfg: ExperimentConfig) -> ExperimentConfig:
    return with_values(rce_config(cfg, 0.0), {"student.loss": "aux_conf", "student.aux_alpha": CONFIDENCE},
                       "study claims (confidence term)")


def needs(cfg: ExperimentConfig) -> list[StageRequest]:
    if cfg.teachers.k < replicates(cfg):
        raise ConfigError(f"study claims: teachers.k={cfg.teachers.k}; the study draws {replicates(cfg)} single teachers "
                          f"(two seed sets of {SEEDS}), so it needs at least that many teachers")
    return ([StageRequest("main", main_config(cfg), "student")]
            + [StageRequest(f"rce {lam}", rce_config(cfg, lam), "student") for lam in LAMBDAS]
            + [StageRequest("rce after warm-up", warmup_config(cfg), "student")]
            + [StageRequest("confidence", confidence_config(cfg), "student")]
            + [StageRequest(f"width {w}", width_config(cfg, w), "student") for w in widths(cfg)])


def claim_row(claim: str, statement: str, measurement: str, stat: dict, direction: int = 1, verdict_of: str | None = None) -> dict:
    lo, hi = stat["ci"] if stat.get("ci") else (np.nan, np.nan)
    return {"claim": claim, "statement": statement, "measurement": measurement, "n": stat["n"], "effect": stat["mean"],
            "ci_lo": lo, "ci_hi": hi, "p": stat.get("p", np.nan), "se_seed": stat.get("se_seed", np.nan), "se_rows": stat.get("se_rows", np.nan),
            "verdict": verdict_of or verdict(stat.get("ci"), direction)}


def accs(reps) -> list[float]:
    return [r.test_acc for r in reps]


ROW_VALUES = ("correct", "gain", "misfit", "remainder", "kl_to_dual_mean")
"""Per test row, per student (`Rows`): what every claim averages, so each CI can count the test
rows' sampling beside the seeds' (`replicates.crossed`)."""

Rows = dict[str, dict[str, np.ndarray]]
"""target → value (`ROW_VALUES`) → `[replicates, test rows]` float64."""


def decomposition(ctx: RunContext, s: Stages) -> tuple[pd.DataFrame, Rows]:
    """C2 per replicate, on the test split: gain = CE(teacher) − CE(student), misfit = mean
    KL(student ‖ teacher), remainder = gain − misfit, which equals mean ⟨y − s, log s − log p⟩
    exactly (checked: `identity_error`). For a single-teacher student the teacher is its own;
    for a dual-mean student it is the average single teacher: CE is the mean over the K
    teachers' CE and the misfit mean_k KL(s ‖ p_k) = KL(s ‖ q) + V (q the dual mean, V the
    teacher variance), both exact per example. Returns the per-replicate table and the same
    values per test row (`Rows`), whose row means the table holds."""
    y = torch.from_numpy(s.data.splits["test"].y)
    test = read_test_posterior(s.labels.dir)
    q, v = test["dual_log"].double(), test["variance"].double()
    rows, per_row = [], {}
    for tgt in ("single", "dual_mean"):
        vals = {k: [] for k in ROW_VALUES}
        for i, r in enumerate(s.students.replicates[tgt]):
            log_s = torch.from_numpy(s.students.test_logp(tgt, i)).double()
            onehot = torch.nn.functional.one_hot(y, log_s.shape[1]).double()
            student_ce = -log_s.gather(-1, y[:, None]).squeeze(-1)
            if tgt == "single":
                log_p = single_teacher(s.teachers, "test", r.teacher, run=ctx.run).double()
                teacher_ce = -log_p.gather(-1, y[:, None]).squeeze(-1)
                misfit = kl(log_s, log_p)
                cross = ((onehot - log_s.exp()) * (log_s - log_p.clamp_min(-1e4))).sum(-1)
            else:
                # mean_k CE(p_k) = CE(q) + V per example (the Bregman identity)
                teacher_ce = -q.gather(-1, y[:, None]).squeeze(-1) + v
                misfit = kl(log_s, q) + v
                cross = ((onehot - log_s.exp()) * (log_s - q)).sum(-1)
            gain = teacher_ce - student_ce
            row = {"correct": (log_s.argmax(-1) == y).double(), "gain": gain, "misfit": misfit, "remainder": gain - misfit,
                   "kl_to_dual_mean": kl(log_s, q)}
            for k in ROW_VALUES:
                vals[k].append(row[k].numpy())
            rows.append({"target": tgt, "replicate": i, "seed": r.seed, "teacher": r.teacher, "teacher_ce": float(teacher_ce.mean()),
                         "student_ce": float(student_ce.mean()), "gain": float(gain.mean()), "misfit": float(misfit.mean()),
                         "remainder": float((gain - misfit).mean()), "identity_error": abs(float((gain - misfit).mean() - cross.mean())),
                         "kl_to_dual_mean": float(row["kl_to_dual_mean"].mean()), "entropy": r.eval.entropy_test, "test_acc": r.test_acc})
        per_row[tgt] = {k: np.stack(x) for k, x in vals.items()}
    out = pd.DataFrame(rows)
    out["teacher"] = out["teacher"].astype("Int64")  # none for dual-mean students
    return out, per_row


def entropies(s: Stages, target: str) -> np.ndarray:
    """`[replicates, test rows]` entropy of a target's students' predictions, in nats."""
    out = []
    for i in range(len(s.students.replicates[target])):
        logp = s.students.test_logp(target, i).astype(np.float64)
        out.append(-(np.exp(logp) * np.where(np.isfinite(logp), logp, 0.0)).sum(-1))
    return np.stack(out)


def correct(s: Stages, target: str) -> np.ndarray:
    """`[replicates, test rows]` 1.0 where a target's student predicts the gold label."""
    y = s.data.splits["test"].y
    return np.stack([(s.students.test_logp(target, i).argmax(-1) == y).astype(np.float64) for i in range(len(s.students.replicates[target]))])


def stacked(s: Stages, target: str) -> torch.Tensor:
    """`[n, N_test, C]` float64 test log-probs of a target's replicates, in seed order."""
    return torch.stack([torch.from_numpy(s.students.test_logp(target, i)).double() for i in range(len(s.students.replicates[target]))])


def set_stats(logs: torch.Tensor, weights: torch.Tensor, log_q: torch.Tensor, chunk: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of `weights` (`[B, n]` counts of a resample of the n members of `logs`,
    `[n, N, C]`): the set's Bregman variance mean_i KL(m ‖ s_i), m its dual mean, which is
    −logsumexp(mean_i log s_i) per example (the identity in `posterior`), and KL(m ‖ q).
    Per example; `[B, N]` each (a statistic is their mean over examples)."""
    n = logs.shape[0]
    flat = logs.reshape(n, -1)
    bv, to_q = [], []
    for b0 in range(0, len(weights), chunk):
        w = weights[b0 : b0 + chunk]
        a = (w @ flat / w.sum(1, keepdim=True)).reshape(len(w), *logs.shape[1:])  # weighted mean log-probs
        lse = torch.logsumexp(a, -1)
        bv.append(-lse)
        to_q.append(kl(a - lse.unsqueeze(-1), log_q))
    return torch.cat(bv), torch.cat(to_q)


def jackknife_weights(n: int) -> torch.Tensor:
    """`[1 + n, n]`: every draw once (row 0), then each draw left out once.

    C3's statistics are set statistics (the Bregman variance of a set of students), and a
    bootstrap resample repeats draws, which shrinks them: on the default data the percentile
    bootstrap put C3's point estimate (+0.0630) at the top of its own interval [+0.0477,
    +0.0634]. Leaving one draw out keeps every set distinct, so their CIs are jackknife ones
    (`jack_stat`)."""
    return torch.from_numpy(np.vstack([np.ones((1, n)), np.ones((n, n)) - np.eye(n)])).double()


def jack_stat(values: torch.Tensor | np.ndarray, n: int, level: float = 0.95) -> dict:
    """A set statistic per example under every weighting of the draws (`[1 + n, N]`: row 0 all
    draws, rows 1..n each left out): its value (row 0's mean over examples) and a Student-t CI
    (n − 1 df) whose variance is the jackknife's over draws plus the test rows' (row 0's
    variance over examples / N), as `replicates.crossed` adds them for replicate means."""
    v = np.asarray(values, dtype=np.float64)
    means = v.mean(-1)
    loo = means[1:]
    se_seed = float(np.sqrt((n - 1) / n * ((loo - loo.mean()) ** 2).sum()))
    se_rows = float(v[0].std(ddof=1) / np.sqrt(v.shape[-1]))
    half = float(special.stdtrit(n - 1, 0.5 + level / 2)) * float(np.hypot(se_seed, se_rows))
    return {"n": n, "mean": float(means[0]), "ci": [float(means[0]) - half, float(means[0]) + half], "p": np.nan,
            "se_seed": se_seed, "se_rows": se_rows}


def boot_stat(values: torch.Tensor | np.ndarray, n: int) -> dict:
    """A statistic's point value (row 0) and its 95% percentile CI over the resamples."""
    v = np.asarray(values, dtype=np.float64)
    return {"n": n, "mean": float(v[0]), "ci": [float(np.quantile(v[1:], 0.025)), float(np.quantile(v[1:], 0.975))], "p": np.nan}


def p5(ctx: RunContext, s: Stages, weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """The paper's P5 at one width, per weighting of the teacher draws (`jackknife_weights`): the
    Bregman variance of the single-teacher students across draws, of their teachers, and of the
    dual-mean students across seeds (the floor seeds alone give); KL(students' dual mean ‖ q);
    the draws' mean KL(s_i ‖ q) and KL(s_i ‖ p_i). Each `[weightings, test rows]` (`jack_stat`)."""
    q = read_test_posterior(s.labels.dir)["dual_log"].double()
    single, dual = stacked(s, "single"), stacked(s, "dual_mean")
    teachers = torch.stack([single_teacher(s.teachers, "test", r.teacher, run=ctx.run).double() for r in s.students.replicates["single"]])
    bv_s, s_to_q = set_stats(single, weights, q)
    bv_t, t_to_q = set_stats(teachers, weights, q)
    bv_d, _ = set_stats(dual, weights, q)
    per_draw_q = kl(single, q.unsqueeze(0))  # [n, N]
    per_draw_p = kl(single, teachers)
    frac = weights / weights.sum(1, keepdim=True)
    return {"bv_students": bv_s, "bv_teachers": bv_t, "bv_floor": bv_d, "kl_students_mean_q": s_to_q, "kl_teachers_mean_q": t_to_q,
            "kl_s_q": frac @ per_draw_q, "kl_s_p": frac @ per_draw_p}


def restricted(weights: torch.Tensor, idx: np.ndarray, n: int) -> torch.Tensor:
    """Resample weights over the members `idx` of n (zero for the others)."""
    out = torch.zeros(len(weights), n, dtype=weights.dtype)
    out[:, torch.as_tensor(idx)] = weights
    return out


FAMILY = 1 - 0.05 / (len(LAMBDAS) - 1)
"""C5's CI level: Bonferroni over the five λ > 0 compared with λ = 0 (99% each)."""


def lambda_table(lam_reps: dict[float, list], lam_correct: dict[float, np.ndarray], keep_stats: bool = False) -> pd.DataFrame:
    """Per λ: accuracy and gold CE over replicates, and the paired difference from λ = 0 with
    its Bonferroni CI over seeds and test rows (`lam_correct`: per λ, `[replicates, test rows]`
    correctness) and verdict (`_stat`, the difference's summary, with `keep_stats`)."""
    base = lam_reps[LAMBDAS[0]]
    rows = []
    for lam, r in lam_reps.items():
        d = paired_rows(lam_correct[lam], lam_correct[LAMBDAS[0]], level=FAMILY)
        a = summarize(accs(r))
        rows.append({"lambda": lam, "n": a["n"], "test_acc": a["mean"], "test_acc_sd": a["sd"],
                     "gold_ce": float(np.mean([x.eval.test_gold_ce for x in r])),
                     "acc_minus_lambda0": d["mean"], "acc_ci_lo": d["ci"][0] if d["ci"] else np.nan, "acc_ci_hi": d["ci"][1] if d["ci"] else np.nan,
                     "acc_se_seed": d["se_seed"], "acc_se_rows": d["se_rows"],
                     "ce_minus_lambda0": float(np.mean([x.eval.test_gold_ce - b.eval.test_gold_ce for x, b in zip(r, base)])), "verdict_acc": verdict(d["ci"]) if lam > 0 else "",
                     **({"_stat": d} if keep_stats else {})})
    return pd.DataFrame(rows)


def c5_row(lam_table: pd.DataFrame) -> dict:
    """C5 from the mixtures 0 < λ < 1: supported when one mixture's Bonferroni CI is above 0,
    not supported when every one is below; the best λ's difference is shown."""
    mixes = lam_table[(lam_table["lambda"] > 0) & (lam_table["lambda"] < 1)]
    verdicts = mixes["verdict_acc"].tolist()
    c5 = "supported" if "supported" in verdicts else ("not supported" if all(v == "not supported" for v in verdicts) else "inconclusive")
    best = mixes.loc[mixes["acc_minus_lambda0"].idxmax()]
    grid = ", ".join(f"{m:g}" for m in mixes["lambda"])
    return claim_row("C5", "mixing reverse CE into the student's loss improves it",
                     f"test acc at λ ∈ {{{grid}}} − at λ = 0, paired by seed, fixed epochs (selection: last), "
                     f"Bonferroni CIs ({FAMILY:.0%} each); best λ = {best['lambda']:g} shown", best["_stat"], verdict_of=c5)


def c2_summary(dec: pd.DataFrame, rows: Rows, variance: float, boot: int = BOOT) -> pd.DataFrame:
    """Per target: gain, misfit, the teacher variance V inside the misfit (dual-mean students:
    misfit = KL(s ‖ q) + V), KL(s ‖ q), the remainder, and gain/misfit and remainder/KL(s ‖ q)
    (ratios of means) with 95% percentile CIs of a two-level bootstrap: replicates and test
    rows resampled together (`replicates.two_level_weights`, over all replicates: n = 10)."""
    out = []
    for tgt, g in dec.groupby("target", sort=False):
        r = rows[tgt]
        w_rep, w_row = two_level_weights(*r["gain"].shape, boot, seed=1)

        def ratio(a: str, b: str) -> dict:
            num, den = (np.concatenate([[r[k].mean()], two_level_means(r[k], w_rep, w_row)]) for k in (a, b))
            return boot_stat(num / den, len(g))

        gm, rk = ratio("gain", "misfit"), ratio("remainder", "kl_to_dual_mean")
        out.append({"target": tgt, "n": len(g), "gain": g["gain"].mean(), "misfit": g["misfit"].mean(),
                    "variance_in_misfit": variance if tgt == "dual_mean" else 0.0, "kl_to_dual_mean": g["kl_to_dual_mean"].mean(),
                    "remainder": g["remainder"].mean(), "gain_over_misfit": gm["mean"], "gain_over_misfit_ci": gm["ci"],
                    "remainder_over_kl_to_q": rk["mean"], "remainder_over_kl_to_q_ci": rk["ci"]})
    return pd.DataFrame(out)


def run(ctx: RunContext, done: dict[str, Stages], out: Path) -> Path:
    main = done["main"]
    reps = main.students.replicates
    n = len(reps["dual_mean"])
    half = n // SETS
    subsets = {"all": np.arange(n), **{name: np.arange(i * half, (i + 1) * half) for i, name in enumerate("AB")}}
    # per replicate (index i of every setting: seed student.seed + i; single teacher i), and per test row
    dec, main_rows = decomposition(ctx, main)
    main_rows["arith_mean"] = {"correct": correct(main, "arith_mean")}
    write_table(ctx.run, out / "c2_decomposition.parquet", dec)
    ws = [w for w in widths(ctx.cfg) if f"width {w}" in done]
    per_width = {w: decomposition(ctx, done[f"width {w}"]) for w in ws}
    by_width = pd.concat([t.assign(width=w) for w, (t, _) in per_width.items()], ignore_index=True)
    width_rows = {w: r for w, (_, r) in per_width.items()}
    write_table(ctx.run, out / "widths.parquet", by_width)
    n_draws = len(done[f"width {ws[0]}"].students.replicates["single"])
    draws = {name: restricted(jackknife_weights(len(idx)), idx, n_draws) for name, idx in subsets.items()}
    # every subset's weightings in one pass per width (each width's files read once); the same
    # draws left out at every width, so width differences are paired
    sizes = [len(wts) for wts in draws.values()]
    p5_all = {w: p5(ctx, done[f"width {w}"], torch.cat(list(draws.values()))) for w in ws}
    p5s = {name: {w: {k: v.split(sizes)[i] for k, v in p5_all[w].items()} for w in ws} for i, name in enumerate(draws)}
    p5_table = pd.DataFrame([{"width": w, "n_draws": n_draws, **{f"{k}{suffix}": v for k, t in st.items()
                                                                    for j in [jack_stat(t, n_draws)]
                                                                    for suffix, v in (("", j["mean"]), ("_ci_lo", j["ci"][0]), ("_ci_hi", j["ci"][1]))}}
                             for w, st in p5s["all"].items()])
    p5_table["share_of_teacher_variance"] = p5_table["bv_students"] / p5_table["bv_teachers"]
    means = p5_table[["width", "kl_students_mean_q"]].rename(columns={"kl_students_mean_q": "kl_single_students_mean_to_dual_mean"})
    write_table(ctx.run, out / "p5_draws.parquet", p5_table)
    summary_c2 = c2_summary(dec, main_rows, main.labels.posterior.variance_test)
    write_table(ctx.run, out / "c2_summary.parquet", summary_c2)
    lam_reps = {lam: done[f"rce {lam}"].students.replicates["dual_mean"] for lam in LAMBDAS}
    lam_correct = {lam: correct(done[f"rce {lam}"], "dual_mean") for lam in LAMBDAS}
    warm = correct(done["rce after warm-up"], "dual_mean")
    conf_correct = correct(done["confidence"], "dual_mean")
    conf_entropy, base_entropy = entropies(done["confidence"], "dual_mean"), entropies(done[f"rce {LAMBDAS[0]}"], "dual_mean")
    conf_ce = np.array([r.eval.test_gold_ce for r in done["confidence"].students.replicates["dual_mean"]])
    base_ce = np.array([r.eval.test_gold_ce for r in lam_reps[LAMBDAS[0]]])
    lam_table = lambda_table(lam_reps, lam_correct)
    write_table(ctx.run, out / "c5_rce.parquet", lam_table)

    def claims_on(idx: np.ndarray, p5w: dict) -> list[dict]:  # p5w: the P5 statistics under the subset's jackknife weights
        """Every claim on the replicates `idx` of every setting (a seed set, or all). Every CI
        counts the test rows' sampling beside the seeds' (`replicates.crossed`)."""
        pick = lambda rs: [rs[i] for i in idx]  # noqa: E731
        k = len(idx)
        main_at = {tgt: {key: v[idx] for key, v in vals.items()} for tgt, vals in main_rows.items()}
        at = {w: {tgt: {key: v[idx] for key, v in vals.items()} for tgt, vals in r.items()} for w, r in width_rows.items()}
        rows = []
        c1 = paired_rows(main_at["dual_mean"]["correct"], main_at["single"]["correct"])
        rows.append(claim_row("C1", "a student of the posterior-mean (dual) teacher beats students of single teachers",
                              f"test acc, dual-mean student − single-teacher student, paired by seed, {k} teacher draws", c1))
        g = dec[dec["replicate"].isin(idx) & (dec["target"] == "single")]
        rem = crossed(main_at["single"]["remainder"])
        # a point claim (remainder = 0) can be refuted by a CI, never confirmed without a margin the paper does not give
        c2_verdict = "inconclusive" if rem["ci"] is None or rem["ci"][0] <= 0 <= rem["ci"][1] else "not supported"
        rows.append(claim_row("C2", "a student's gain over its teacher is its misfit (remainder = gain − misfit = 0), a student of one teacher",
                              f"remainder (gold CE, test split), single-teacher students on {k} teacher draws (gain/misfit "
                              f"{g['gain'].mean() / g['misfit'].mean():.2f}); a CI that excludes 0 refutes it, one that contains 0 cannot "
                              "confirm it", rem, verdict_of=c2_verdict))
        narrow, wide = at[ws[0]]["dual_mean"], at[ws[-1]]["dual_mean"]

        def abs_rows(r: np.ndarray) -> np.ndarray:  # per row, the contribution to |mean_j r_ij| (its sign held)
            return np.sign(r.mean(1, keepdims=True)) * r

        trend = paired_rows(abs_rows(wide["remainder"]), abs_rows(narrow["remainder"]))
        rows.append(claim_row("C2b", "the remainder vanishes as the student grows",
                              f"abs(remainder) of dual-mean students at width {ws[-1]} − at width {ws[0]}, paired by seed", trend, direction=-1))
        c3 = jack_stat(p5w[ws[-1]]["bv_students"] - p5w[ws[0]]["bv_students"], k)
        rows.append(claim_row("C3", "a student of one teacher approaches the posterior-mean teacher as its capacity grows: what it "
                              "predicts stops depending on which teacher labelled it (the paper's P5)",
                              f"Bregman variance across {k} teacher draws of single-teacher students, mean_i KL(s̄ ‖ s_i), at width "
                              f"{ws[-1]} − at width {ws[0]} (jackknife over draws; their teachers' own: "
                              f"{float(p5w[ws[0]]['bv_teachers'][0].mean()):.4f})", c3, direction=-1))
        c3b = paired_rows(at[ws[-1]]["single"]["kl_to_dual_mean"], at[ws[0]]["single"]["kl_to_dual_mean"])
        rows.append(claim_row("C3b", "a student of one teacher comes closer to the posterior-mean teacher as its capacity grows",
                              f"KL(s_i ‖ q) on test, single-teacher students at width {ws[-1]} − at width {ws[0]}, paired by teacher draw",
                              c3b, direction=-1))
        sanity = paired_rows(wide["kl_to_dual_mean"], narrow["kl_to_dual_mean"])
        rows.append(claim_row("S1", "sanity, not a claim of the paper: a student trained on the posterior mean fits it better with width",
                              f"KL(student ‖ dual mean) on test at width {ws[-1]} − at width {ws[0]}, dual-mean students, paired by seed",
                              sanity, direction=-1))
        # entropy moved at fixed width and target by a confidence term; the claim is tested only
        # where the term did lower the entropy (the manipulation check, a CI of its own)
        ent = paired_rows(conf_entropy[idx], base_entropy[idx])
        c4 = paired_rows(conf_correct[idx], lam_correct[LAMBDAS[0]][idx])
        lowered = verdict(ent["ci"], direction=-1) == "supported"
        rows.append(claim_row("C4", "a student with lower entropy gains more over its teachers",
                              f"test acc, dual-mean student with a confidence term (α = {CONFIDENCE:g}) − without, paired by seed, "
                              f"fixed width, target and epochs; its entropy {ent['mean']:+.3f} [{ent['ci'][0]:+.3f}, {ent['ci'][1]:+.3f}] "
                              f"nats, its gold CE {float(np.mean(conf_ce[idx] - base_ce[idx])):+.3f}"
                              + ("" if lowered else "; not tested: the term did not lower the entropy"),
                              c4, verdict_of=None if lowered else "not tested"))
        rows.append(c5_row(lambda_table({lam: pick(r) for lam, r in lam_reps.items()}, {lam: c[idx] for lam, c in lam_correct.items()},
                                        keep_stats=True)))
        c5b = paired_rows(warm[idx], lam_correct[LAMBDAS[0]][idx])
        rows.append(claim_row("C5b", "reverse CE as a fine-tuning phase after forward-CE warm-up improves the student",
                              f"test acc, λ = {WARMUP[0]:g} after {WARMUP[1]:.0%} of training in forward CE − λ = 0, paired by seed, "
                              "fixed epochs", c5b))
        c6 = paired_rows(main_at["dual_mean"]["correct"], main_at["arith_mean"]["correct"])
        rows.append(claim_row("C6", "the dual (log-space) posterior mean is the better target than the arithmetic mean",
                              "test acc, dual-mean student − arithmetic-mean student, paired by seed", c6))
        return rows

    claims = claims_on(subsets["all"], p5s["all"])
    for name in "AB":
        for row, mine in zip(claims, claims_on(subsets[name], p5s[name])):
            row.update({f"{k}_{name}": mine[k] for k in ("effect", "ci_lo", "ci_hi", "se_seed", "se_rows", "verdict")})
    for row in claims:  # final only when both seed sets agree
        row["verdict_all"] = row["verdict"]
        if row["verdict"] != "not tested":
            row["verdict"] = row["verdict_A"] if row["verdict_A"] == row["verdict_B"] else "not replicated"
    table = pd.DataFrame(claims)
    n_verdicts = int((table["claim"] != "S1").sum()) * SETS
    write_table(ctx.run, out / "claims.parquet", table)
    students = pd.DataFrame([{"run": name, "target": "ceiling" if tgt is None else tgt, "replicate": i, "dir": str(d)}
                             for name, s in done.items() for (tgt, i), d in s.students.dirs.items()])
    write_table(ctx.run, out / "students.parquet", students)
    acc_table = pd.DataFrame([{"who": tgt, **{k: v for k, v in summarize(accs(r)).items() if k != "ci"},
                               "ci": "[{:.4f}, {:.4f}]".format(*summarize(accs(r))["ci"]) if len(r) > 1 else ""} for tgt, r in [*reps.items(), ("ceiling", main.students.ceilings)]])
    report = [
        "# The paper's claims, measured",
        "",
        f"Config: teachers K = {main.teachers.k}, student {main.students.students['dual_mean'].n_params:,} parameters, {n} replicates "
        f"per setting in two disjoint seed sets (A: replicates 0–{half - 1}, B: {half}–{2 * half - 1}; a replicate is a student seed "
        "and, for a single-teacher student, its teacher). Every effect is a paired difference over the same replicates and the "
        "same test rows with a 95% Student-t CI whose variance adds the seeds' (`se_seed`: over replicates; C3: a jackknife over "
        "teacher draws) and the test rows' (`se_rows`: the test split is a sample too), and every verdict is computed from that "
        "CI: supported (CI excludes 0 in the predicted direction), not supported (excludes 0 in the other direction), "
        "inconclusive (contains 0). A verdict is computed on set A and on set B; it is final only when they agree, else **not "
        "replicated**. The effect and CI shown are over all replicates (`verdict_all` is their verdict).",
        "",
        table[["claim", "measurement", "n", "effect", "ci_lo", "ci_hi", "se_seed", "se_rows", "verdict_A", "verdict_B", "verdict", "verdict_all"]]
        .to_markdown(index=False, floatfmt=".4f"),
        "",
        f"{n_verdicts} verdicts from 95% CIs (two sets; S1 aside): with no effect anywhere, about "
        f"{0.05 * n_verdicts:.1f} of them would still exclude 0 by chance, and a false verdict that replicates needs two. S1 "
        "describes students trained on the posterior mean itself; the paper's claim that a student of one teacher approaches "
        "the posterior mean is C3 and C3b.",
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
        *md_section("C2: the student's share", "Per target, over replicates: gain/misfit and remainder/KL(s ‖ q), ratios of means "
                    "with 95% CIs of a two-level bootstrap (replicates × test rows). `variance_in_misfit` is the teacher variance V inside a dual-mean student's misfit "
                    "(misfit = KL(s ‖ q) + V); for a single-teacher student the misfit is its own, KL(s ‖ p_i).",
                    summary_c2, "`c2_summary.parquet`"),
        *md_section("C3: students of one teacher across teacher draws (the paper's P5)", f"At each width, {n_draws} single-teacher "
                    "students (draw i: teacher i, seed i). `bv_students`: their Bregman variance across draws, mean_i KL(s̄ ‖ s_i) "
                    "with s̄ their dual mean; `bv_teachers`: the same for their teachers; `bv_floor`: for as many dual-mean students "
                    "(seeds alone); `share_of_teacher_variance` = bv_students / bv_teachers. `kl_students_mean_q`: KL(s̄ ‖ q); "
                    "`kl_s_q`, `kl_s_p`: the draws' mean KL(s_i ‖ q) and KL(s_i ‖ p_i). CIs: 95%, jackknife over draws (the same "
                    "draw left out at every width) plus the test rows' variance. P5 predicts bv_students → 0 and kl_s_q → 0 as width grows.",
                    p5_table, "`p5_draws.parquet`"),
        *md_section("C2b, C3b, S1: students across widths", "Per width, the mean over seeds of each student's decomposition, "
                    "its KL to the dual posterior mean and its entropy (`widths.parquet` has every replicate). "
                    "`kl_single_students_mean_to_dual_mean`: how close the dual mean of the students each trained on one teacher "
                    "comes to the teachers' posterior mean (the paper: in expectation over teacher draws, students converge to it).",
                    by_width.groupby(["target", "width"])[["test_acc", "gain", "misfit", "remainder", "kl_to_dual_mean", "entropy"]].mean().reset_index()
                    .merge(means, on="width"), "`widths.parquet`"),
        *md_section("C5: reverse-CE weight λ, every epoch trained (selection: last)", "λ = 1 is pure reverse CE: from a random "
                    "initialization its gradient is weighted by the student's own near-uniform probabilities and it can settle on a "
                    "confident wrong class, so it is reported but left out of the verdict, which covers mixtures 0 < λ < 1; "
                    "C5b starts reverse CE after a forward-CE warm-up instead.", lam_table, "`c5_rce.parquet`"),
    ]
    ctx.run.write_text(out / "report.md", "\n".join(report) + "\n")
    shown = table[["claim", "n", "effect", "ci_lo", "ci_hi", "verdict_A", "verdict_B", "verdict"]]
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"\nreport: {out / 'report.md'}")
    return out
