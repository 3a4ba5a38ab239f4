"""The run's results: printed table, results.json / results.parquet, summary.png, TensorBoard.

PGR = (student − weak) / (ceiling − weak) is reported twice: against the mean single teacher
(the usual weak-to-strong baseline) and against the ensemble's dual posterior mean (the
stronger teacher the paper says a student should approximate).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import pandas as pd
import pyarrow as pa
from tensorboardX import SummaryWriter

from w2s_ray.config import to_yaml
from w2s_ray.metrics import pgr, wilson_interval
from w2s_ray.replicates import paired, summarize
from w2s_ray.results import DataStage, LabelStage, PosteriorSummary, StudentResult, StudentStage, TeacherStage
from w2s_ray.run import RunContext
from w2s_ray.storage import RunDir

if TYPE_CHECKING:  # annotations only (see `figure`)
    from matplotlib.figure import Figure


# --- one figure helper, one Markdown helper --------------------------------------------------


def figure(run: RunDir, path: Path, draw: Callable[[Figure], None], **figure_kw: Any) -> None:
    """`draw(fig)` on a new headless figure (matplotlib's object API: no pyplot, no backend
    switch in the caller's process), saved under a temporary name, renamed and published."""
    # imported here: matplotlib costs every command 0.35 s of start-up (measured with -X importtime),
    # and only reports draw
    from matplotlib.figure import Figure

    fig = Figure(**figure_kw)
    draw(fig)
    fig.tight_layout()
    with run.atomic(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")


def md_section(title: str, text: str, table: pd.DataFrame, tables: str) -> list[str]:
    """A report section: heading, text, the table as Markdown, and the Parquet files behind it."""
    return ["", f"## {title}", "", text, "", table.to_markdown(index=False, floatfmt=".4f"), "", f"Tables: {tables}."]


def write_table(run: RunDir, path: Path, table: pd.DataFrame) -> None:
    run.write_parquet(path, pa.Table.from_pandas(table, preserve_index=False))


# --- the run's report ----------------------------------------------------------------------


def student_row(name: str, role: str, reps: list[StudentResult], weak: list[float] | None, ens: float, ceilings: list[StudentResult]) -> dict[str, Any]:
    """A student's row over its replicates: every metric's mean, test accuracy's n, sd and 95%
    CI over seeds, and PGR per replicate (against its own weak reference `weak[i]` and the
    same seed's ceiling), then summarized the same way."""
    evals = [r.to_json() for r in reps]
    acc = summarize([r.test_acc for r in reps])
    row: dict[str, Any] = {"model": name, "role": role, **{k: float(np.mean([e[k] for e in evals])) for k in EVAL_COLUMNS},
                           "test_acc": acc["mean"], "n": acc["n"], "sd": acc["sd"], "ci": acc["ci"],
                           "best_epoch": float(np.mean([r.best_epoch for r in reps])), "epochs_run": float(np.mean([r.epochs_run for r in reps])),
                           "n_params": reps[0].n_params, "device": reps[0].device,
                           "replicates": [{"seed": r.seed, "teacher": r.teacher, "test_acc": r.test_acc} for r in reps]}
    if weak is not None:
        cs = [c.test_acc for c in ceilings] if len(ceilings) == len(reps) else [math.nan] * len(reps)
        for key, refs in (("pgr_vs_teacher", weak), ("pgr_vs_ensemble", [ens] * len(reps))):
            per = summarize([pgr(r.test_acc, w, c) for r, w, c in zip(reps, refs, cs)])
            row[key], row[f"{key}_ci"] = per["mean"], per["ci"]
    return row


EVAL_COLUMNS = ("test_gold_ce", "misfit", "misfit_holdout", "entropy_test", "agree_ensemble_test", "agree_single_test")


def results_rows(teacher_acc: np.ndarray, posterior: PosteriorSummary, students: StudentStage, single_id: int, ceiling_note: str = "") -> list[dict[str, Any]]:
    """One row per predictor; `role` says what it is (teachers, teacher, ensemble, student, ceiling).
    Student and ceiling rows summarize their replicates (n seeds); a single-teacher student's
    PGR is against its own teacher, the other students' against the mean single teacher."""
    weak = float(teacher_acc.mean())
    ens = posterior.test_acc_dual
    ceilings = students.ceilings
    ceiling = float(np.mean([c.test_acc for c in ceilings])) if ceilings else math.nan
    rows: list[dict[str, Any]] = [
        {"model": f"teachers (mean of {len(teacher_acc)})", "role": "teachers", "test_acc": weak, "sd": float(teacher_acc.std(ddof=1))},
        {"model": f"teacher #{single_id} (single)", "role": "teacher", "test_acc": posterior.test_acc_single},
        {"model": "ensemble: arithmetic mean", "role": "ensemble", "test_acc": posterior.test_acc_arith, "ci": posterior.ci_arith},
        {"model": "ensemble: dual mean", "role": "ensemble", "test_acc": ens, "ci": posterior.ci_dual},
    ]
    replicates = students.replicates
    singles = sorted({r.teacher for r in replicates.get("single", []) if r.teacher is not None})
    if len(singles) > 1:
        accs = [float(teacher_acc[t]) for t in singles]
        rows.insert(2, {"model": f"teachers #{', '.join(map(str, singles))} (the single students' own)", "role": "teacher",
                        "test_acc": float(np.mean(accs)), "sd": float(np.std(accs, ddof=1))})
    no_gap = {name: f"n/a: the ceiling ({ceiling:.4f}) is not above the {name} ({ref:.4f})"
              for name, ref in (("teacher", weak), ("ensemble", ens)) if not ceiling - ref > 1e-12}
    if not ceilings:
        no_gap = {name: "n/a: no ceiling was trained (student.ceiling: false)" for name in ("teacher", "ensemble")}
    for tgt, reps in replicates.items():
        own = [float(teacher_acc[r.teacher if r.teacher is not None else single_id]) for r in reps] if tgt == "single" else [weak] * len(reps)
        row = student_row(f"student on {tgt}", "student", reps, own, ens, ceilings)
        row.update({f"pgr_vs_{name}_note": note for name, note in no_gap.items()})
        rows.append(row)
    if ceilings:
        rows.append(student_row(f"ceiling: student on gold labels{ceiling_note}", "ceiling", ceilings, None, ens, []))
    return rows


def comparisons(students: StudentStage) -> list[dict[str, Any]]:
    """Paired differences in test accuracy between the first (headline) target and each other
    target, over replicates with the same seeds."""
    reps = students.replicates
    targets = list(reps)
    out = []
    for other in targets[1:]:
        a, b = reps[targets[0]], reps[other]
        if len(a) > 1 and len(a) == len(b):
            d = paired([r.test_acc for r in a], [r.test_acc for r in b])
            out.append({"comparison": f"{targets[0]} − {other}", "metric": "test_acc", **d})
    return out


def format_table(rows: list[dict[str, Any]], compared: list[dict[str, Any]] | None = None) -> str:
    cols = [("test_acc", "test acc"), ("n", "n"), ("pgr_vs_teacher", "PGR/teacher"), ("pgr_vs_ensemble", "PGR/ensemble"), ("misfit_holdout", "misfit(held)"), ("entropy_test", "entropy"), ("agree_ensemble_test", "agree ens")]
    width = max(len(r["model"]) for r in rows) + 2
    w = {"n": 4}  # every other column 14 characters wide
    lines = [f"{'':<{width}}" + "".join(f"{h:>{w.get(k, 14)}}" for k, h in cols)]
    for r in rows:
        cells = []
        for key, _ in cols:
            v = r.get(key)
            if r.get(f"{key}_note"):
                cells.append(f"{'n/a':>14}")
            elif v is None or (isinstance(v, float) and math.isnan(v)):
                cells.append(" " * w.get(key, 14))
            elif key == "n":
                cells.append(f"{v:>4d}")
            elif key == "test_acc" and r.get("sd") is not None:
                cells.append(f"{v:.4f}±{r['sd']:.3f}".rjust(14))
            else:
                cells.append(f"{v:>14.4f}")
        lines.append(f"{r['model']:<{width}}" + "".join(cells))
        if r.get("ci"):
            lo, hi = r["ci"]
            over = "teachers (bootstrap)" if r["role"] == "ensemble" else f"{r['n']} seeds"
            if r["role"] == "student" and len({x["teacher"] for x in r.get("replicates", [])}) > 1:
                over += " and teacher draws"
            lines[-1] += f"   95% CI over {over} [{lo:.4f}, {hi:.4f}]"
    notes = sorted({v for r in rows for k, v in r.items() if k.endswith("_note")})
    lines += [f"PGR {note}" for note in notes]
    if any(r.get("n") == 1 for r in rows if r["role"] == "student"):
        lines.append("students: one seed each (student.seeds: 1): no CI; differences between them may be seed noise")
    for c in compared or []:
        lo, hi = c["ci"]
        pval = "p < 0.001" if c["p"] < 0.001 else f"p = {c['p']:.3f}"
        lines.append(f"paired over {c['n']} seeds: {c['comparison']} test acc {c['mean']:+.4f}, 95% CI [{lo:+.4f}, {hi:+.4f}], {pval}")
    return "\n".join(lines)


ROLE_COLORS = {"teachers": "#999999", "teacher": "#999999", "ensemble": "#4c72b0", "ceiling": "#55a868", "student": "#dd8452"}


def plot_summary(run: RunDir, rows: list[dict[str, Any]], teacher_acc: np.ndarray, posterior: PosteriorSummary, path: Path) -> None:
    def draw(fig: Figure) -> None:
        ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2, 1]})
        names = [r["model"] for r in rows]
        accs = [r["test_acc"] for r in rows]
        ax1.barh(names, accs, color=[ROLE_COLORS[r["role"]] for r in rows])
        for i, r in enumerate(rows):
            if r.get("ci"):
                lo, hi = r["ci"]
                ax1.plot([lo, hi], [i, i], color="black", lw=2)
            ax1.text(accs[i] + 0.005, i, f"{accs[i]:.3f}", va="center", fontsize=8)
        ax1.invert_yaxis()
        ax1.set_xlabel("gold test accuracy")
        ax1.set_xlim(0, min(1.0, max(accs) * 1.15))
        ax2.hist(teacher_acc, bins=20, color=ROLE_COLORS["teachers"])
        ax2.axvline(posterior.test_acc_dual, color=ROLE_COLORS["ensemble"], label="ensemble (dual)")
        for r in rows:
            if r["role"] == "student":
                ax2.axvline(r["test_acc"], color=ROLE_COLORS["student"], ls="--", lw=1)
        ax2.set_title("teacher accuracies (dashed: students)")
        ax2.legend(fontsize=8)

    figure(run, path, draw, figsize=(12, 4.5))


def write_tensorboard(run: RunDir, directory: Path, teachers: pd.DataFrame, posterior: PosteriorSummary, students: StudentStage) -> None:
    """One TensorBoard run per experiment config (`tensorboard/<report key>/`), written afresh:
    a rerun replaces its event file instead of adding a second copy of every point."""
    w = SummaryWriter(str(run.reset(directory)))
    for _, r in teachers.iterrows():
        w.add_scalar("teachers/acc_test", r["acc_test"], int(r["teacher_id"]))
        w.add_scalar("teachers/acc_weak", r["acc_weak"], int(r["teacher_id"]))
    w.add_histogram("teachers/acc_test_hist", teachers["acc_test"].to_numpy(), 0)
    for k in ("test_acc_dual", "test_acc_arith", "variance_test", "mutual_info_test"):
        w.add_scalar(f"ensemble/{k}", getattr(posterior, k), 0)
    named = {**{f"student_{t}": r for t, r in students.students.items()}, **({"ceiling": students.ceiling} if students.ceiling else {})}
    for name, result in named.items():
        for rec in result.history:
            for key, v in rec.items():
                if key != "epoch":
                    w.add_scalar(f"{name}/{key}", v, rec["epoch"])
        w.add_scalar(f"{name}/test_acc", result.test_acc, result.best_epoch)
    w.close()
    run.publish_tree(directory)


def stage_report(ctx: RunContext, data: DataStage, teachers: TeacherStage, labels: LabelStage, students: StudentStage) -> dict[str, Any]:
    """The printed table, then `report/<hash>/` (config.yaml, results.json, results.parquet,
    summary.png: one per experiment config, so configs sharing `output.name` keep theirs) with
    copies of the last one at the run's top level, and TensorBoard."""
    cfg, run = ctx.cfg, ctx.run
    table = teachers.table().to_pandas()
    acc = table["acc_test"].to_numpy()
    posterior = labels.posterior
    note = ""
    if cfg.student.augment_shift:  # say which recipe the ceiling used
        note = " (with the student's shifts)" if cfg.student.ceiling_augment else " (without the student's shifts)"
    rows = results_rows(acc, posterior, students, cfg.posterior.single_teacher, note)
    if students.ceiling is not None:
        n_test = len(data.splits["test"].y)
        lo, hi = wilson_interval(students.ceiling.test_acc, n_test)
        if lo <= acc.mean():
            ctx.log(f"warning: the mean teacher ({acc.mean():.4f}) is within the ceiling's own 95% CI [{lo:.4f}, {hi:.4f}] "
                    f"over {n_test} test examples: there is no clear gap to recover, and PGR is not meaningful")
    compared = comparisons(students)
    results = {"rows": rows, "comparisons": compared, "posterior": posterior.to_json(), "config": cfg.model_dump(mode="json"), "classes": data.classes}
    d = run.stage("report", ctx.keys.report)
    with run.lock(d, "report"):  # two runs of one config write it one after the other
        run.reset(d)
        run.write_text(d / "config.yaml", to_yaml(cfg))
        run.write_json(d / "results.json", results)
        flat = pd.DataFrame([{k: (str(v) if isinstance(v, list) else v) for k, v in r.items() if k != "replicates"} for r in rows])
        write_table(run, d / "results.parquet", flat)
        per_seed = [{"target": tgt, "seed": r.seed, "teacher": r.teacher, **{k: v for k, v in r.to_json().items() if k not in ("history", "target", "seed", "teacher")}}
                    for tgt, reps in [*students.replicates.items(), ("ceiling", students.ceilings)] for r in reps]
        if per_seed:
            write_table(run, d / "replicates.parquet", pd.DataFrame(per_seed))
        plot_summary(run, rows, acc, posterior, d / "summary.png")
        run.write_manifest(d, ctx.keys.report)
        for name in ("results.json", "results.parquet", "summary.png", "replicates.parquet"):  # the last run, where people look first
            if not (d / name).is_file():
                continue
            with run.atomic(run / name) as tmp:
                shutil.copyfile(d / name, tmp)
        if cfg.output.tensorboard:
            write_tensorboard(run, run / "tensorboard" / ctx.keys.report, table, posterior, students)
    if data.classes:
        print("classes: " + ", ".join(f"{i} = {name}" for i, name in enumerate(data.classes)))
    print(format_table(rows, compared))
    print(
        f"\nteacher variance (mean KL(dual mean ‖ teacher), test): {posterior.variance_test:.4f}   "
        f"mutual information: {posterior.mutual_info_test:.4f}\nresults: {d / 'results.json'} (and {run / 'results.json'})"
    )
    return results


# --- Tune search figures -------------------------------------------------------------------

CAPACITY = "student.model.width"
LAMBDA = "student.rce_weight"


def _binned(values: pd.Series, log: bool) -> pd.Series:
    """Few distinct values stay as they are; continuous ones (Optuna) are put in 5 bins."""
    if values.nunique() <= 8:
        return values
    v = np.log2(values.astype(float)) if log else values.astype(float)
    edges = np.linspace(v.min(), v.max() + 1e-9, 6)
    mids = (edges[:-1] + edges[1:]) / 2
    idx = np.clip(np.digitize(v, edges) - 1, 0, 4)
    out = mids[idx]
    return pd.Series(np.round(2**out) if log else np.round(out, 2), index=values.index)


def plot_heatmaps(run: RunDir, table: pd.DataFrame, path: Path) -> None:
    """Test accuracy and PGR over student capacity × reverse-CE weight, averaged over the rest."""
    ok = table.dropna(subset=["test_acc"]).copy()
    ok["capacity"] = _binned(ok[CAPACITY], log=True) if CAPACITY in ok else pd.Series(0, index=ok.index)
    ok["lambda"] = _binned(ok[LAMBDA], log=False) if LAMBDA in ok else pd.Series(0.0, index=ok.index)

    def draw(fig: Figure) -> None:
        for ax, key, title in zip(fig.subplots(1, 2), ("test_acc", "pgr_vs_teacher"), ("gold test accuracy", "PGR vs mean single teacher")):
            grid = ok.pivot_table(index="capacity", columns="lambda", values=key, aggfunc="mean").sort_index()
            ax.set_title(title)
            if grid.empty:  # no trial has this metric (an undefined PGR)
                ax.text(0.5, 0.5, "not defined for any trial", ha="center", va="center", transform=ax.transAxes)
                ax.set_axis_off()
                continue
            values = grid.to_numpy(dtype=float)
            lo, hi = (np.nanmin(values), np.nanmax(values)) if np.isfinite(values).any() else (0.0, 1.0)
            if lo == hi:  # one value (a one-point search): a colour scale needs a range
                lo, hi = lo - 0.5, hi + 0.5
            im = ax.imshow(values, aspect="auto", origin="lower", cmap="viridis", vmin=lo, vmax=hi)
            ax.set_xticks(range(len(grid.columns)), [f"{c:g}" for c in grid.columns])
            ax.set_yticks(range(len(grid.index)), [f"{int(c)}" for c in grid.index])
            ax.set_xlabel("reverse-CE weight λ")
            ax.set_ylabel("student width")
            ax.set_title(title)
            for (i, j), v in np.ndenumerate(grid.to_numpy(dtype=float)):
                if np.isfinite(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white", fontsize=8)
            fig.colorbar(im, ax=ax)

    figure(run, path, draw, figsize=(11, 4.2))


def plot_capacity(run: RunDir, table: pd.DataFrame, path: Path) -> None:
    """Gold test accuracy against student capacity, one line per target."""
    ok = table.dropna(subset=["test_acc"]).copy()

    def draw(fig: Figure) -> None:
        ax = fig.subplots()
        if CAPACITY in ok:
            ok["capacity"] = _binned(ok[CAPACITY], log=True)
            groups = ok.groupby("student.target") if "student.target" in ok else [("configured target", ok)]
            for target, g in groups:
                m = g.groupby("capacity")["test_acc"].agg(["mean", "std", "count"]).sort_index()
                ax.errorbar(m.index, m["mean"], yerr=m["std"].fillna(0), marker="o", capsize=3, label=str(target))
            ax.set_xscale("log", base=2)
        ax.set_xlabel("student width")
        ax.set_ylabel("gold test accuracy")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)

    figure(run, path, draw, figsize=(6, 4))
