"""The weighting study: variance-aware students (`student.weighting`) against the plain
dual-mean student, paired over seeds.

The run knows each transfer row's teacher variance V_i (mean KL(dual mean ‖ teacher) on that
row) without any gold label. Three students learn from the same dual posterior mean, with the
same teachers, seeds, holdout and selection rule (the unweighted held-out loss), and differ only
in how their training loss weighs the rows:

- `none`: every row alike (the plain dual-mean student);
- `variance`: exp(−V_i / mean V), scaled to mean 1; no tuned constant;
- `drop_disputed`: the `student.drop_frac` of rows with the highest V_i left out.

Every rule runs two disjoint seed sets of `student.seeds` seeds each (A: seeds `seed` … ,
B: the next `student.seeds`), as the claims study does. The report gives each student's gold
test accuracy over all seeds (mean and Student-t 95% CI), its paired difference from `none`
(same seed) with the paired t CI and p over all seeds, the verdict each set's CI implies on its
own, and a final verdict only when both sets agree ("not replicated" otherwise): the effects
here are well under 0.02, where one set's CI is not enough. Plus each rule's PGR against the
ensemble it learned from.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from w2s_ray.config import ExperimentConfig
from w2s_ray.replicates import paired, summarize
from w2s_ray.report import write_table
from w2s_ray.results import StageRequest, Stages
from w2s_ray.run import RunContext

RULES = ("none", "variance", "drop_disputed")


SETS = 2


def rule_config(cfg: ExperimentConfig, rule: str) -> ExperimentConfig:
    """The dual-mean students with `rule` on both seed sets; the gold ceiling (its key ignores
    the weighting) once, with `none`."""
    student = cfg.student.model_copy(update={"targets": ["dual_mean"], "weighting": rule, "ceiling": rule == "none",
                                             "seeds": SETS * cfg.student.seeds})
    return cfg.model_copy(update={"student": student})


def needs(cfg: ExperimentConfig) -> list[StageRequest]:
    return [StageRequest(rule, rule_config(cfg, rule), "student") for rule in RULES]


def verdict(diff: dict) -> str:
    ci = diff.get("ci")
    if not ci:
        return "one seed: no CI"
    if ci[0] > 0:
        return "helps"
    if ci[1] < 0:
        return "hurts"
    return "not resolved (CI covers 0)"


def table(done: dict[str, Stages]) -> pd.DataFrame:
    """One row per rule: accuracy over all seeds, the paired difference from `none` over all
    seeds, and the verdicts of set A (the first half of the seeds), set B and both."""
    base = done["none"]
    ensemble = base.labels.posterior.test_acc_dual
    ceiling = float(np.mean([c.test_acc for c in base.students.ceilings])) if base.students.ceilings else float("nan")
    accs = {rule: [r.test_acc for r in done[rule].students.replicates["dual_mean"]] for rule in RULES}
    rows = []
    for rule in RULES:
        s = summarize(accs[rule])
        d = paired(accs[rule], accs["none"]) if rule != "none" else {}
        half = len(accs[rule]) // SETS
        sets = [verdict(paired(accs[rule][i * half:(i + 1) * half], accs["none"][i * half:(i + 1) * half])) for i in range(SETS)] if d else ["reference"] * 2
        rows.append({
            "rule": rule, "n": s["n"], "test_acc": s["mean"], "ci_lo": (s["ci"] or [np.nan])[0], "ci_hi": (s["ci"] or [np.nan, np.nan])[1],
            "diff_vs_none": d.get("mean", np.nan), "diff_lo": (d.get("ci") or [np.nan])[0], "diff_hi": (d.get("ci") or [np.nan, np.nan])[1],
            "p": d.get("p", np.nan), "pgr_vs_ensemble": (s["mean"] - ensemble) / (ceiling - ensemble) if ceiling > ensemble else np.nan,
            "verdict_A": sets[0], "verdict_B": sets[1], "verdict": sets[0] if sets[0] == sets[1] else "not replicated",
        })
    return pd.DataFrame(rows)


def run(ctx: RunContext, done: dict[str, Stages], out: Path) -> Path:
    cfg = ctx.cfg
    t = table(done)
    write_table(ctx.run, out / "weighting.parquet", t)
    base = done["none"]
    post = base.labels.posterior
    report = [
        "# Weighting study: variance-aware students against the plain dual-mean student",
        "",
        f"K = {post.k} teachers ({cfg.teachers.model.name} width {cfg.teachers.model.width}); ensemble (dual mean) test accuracy "
        f"{post.test_acc_dual:.4f}; mean teacher variance on the transfer split {post.variance_transfer:.4f}. "
        f"Students: {cfg.student.model.name} width {cfg.student.model.width}, {len(base.students.replicates['dual_mean'])} seeds "
        f"from {cfg.student.seed} (sets A and B of {cfg.student.seeds} each), each rule on the same seeds; `drop_disputed` leaves out {cfg.student.drop_frac:.0%} of the rows. "
        "Differences are paired by seed (Student t, 95%).",
        "",
        t.to_markdown(index=False, floatfmt=".4f"),
        "",
        "Table: `weighting.parquet`. Every student's predictions are in its directory (`test_logp.parquet`).",
    ]
    ctx.run.write_text(out / "report.md", "\n".join(report) + "\n")
    ctx.run.write_json(out / "summary.json", {"rules": t.to_dict(orient="records")})
    print(t.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"\nreport: {out / 'report.md'}")
    return out
