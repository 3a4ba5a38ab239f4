"""The run's results: printed table, results.json / results.parquet, summary.png, TensorBoard.

PGR = (student − weak) / (ceiling − weak) is reported twice: against the mean single teacher
(the usual weak-to-strong baseline) and against the ensemble's dual posterior mean (the
stronger teacher the paper says a student should approximate).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from w2s_ray import artifacts, storage
from w2s_ray.config import ExperimentConfig
from w2s_ray.metrics import pgr
from w2s_ray.students import CEILING


def results_rows(teachers: pd.DataFrame, posterior: dict, students: dict[str, dict], single_id: int) -> list[dict[str, Any]]:
    acc = teachers["acc_test"].to_numpy()
    weak = float(acc.mean())
    ens = posterior["test_acc_dual"]
    ceiling = students.get(CEILING, {}).get("test_acc", math.nan)
    rows: list[dict[str, Any]] = [
        {"model": f"teachers (mean of {len(acc)})", "test_acc": weak, "sd": float(acc.std(ddof=1))},
        {"model": f"teacher #{single_id} (single)", "test_acc": posterior["test_acc_single"]},
        {"model": "ensemble: arithmetic mean", "test_acc": posterior["test_acc_arith"], "ci": posterior.get("ci_arith")},
        {"model": "ensemble: dual mean", "test_acc": ens, "ci": posterior.get("ci_dual")},
    ]
    for tgt, m in students.items():
        name = "ceiling: student on gold labels" if tgt == CEILING else f"student on {tgt}"
        row = {"model": name, "target": tgt, **{k: v for k, v in m.items() if k not in ("history", "target")}}
        if tgt != CEILING:
            row["pgr_vs_teacher"] = pgr(m["test_acc"], weak, ceiling)
            row["pgr_vs_ensemble"] = pgr(m["test_acc"], ens, ceiling)
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    cols = [("test_acc", "test acc"), ("pgr_vs_teacher", "PGR/teacher"), ("pgr_vs_ensemble", "PGR/ensemble"), ("misfit", "misfit"), ("entropy_test", "entropy"), ("agree_ensemble_test", "agree ens")]
    width = max(len(r["model"]) for r in rows) + 2
    lines = [f"{'':<{width}}" + "".join(f"{h:>14}" for _, h in cols)]
    for r in rows:
        cells = []
        for key, _ in cols:
            v = r.get(key)
            if v is None or (isinstance(v, float) and math.isnan(v)):
                cells.append(f"{'':>14}")
            elif key == "test_acc" and r.get("sd") is not None:
                cells.append(f"{v:.4f}±{r['sd']:.3f}".rjust(14))
            else:
                cells.append(f"{v:>14.4f}")
        lines.append(f"{r['model']:<{width}}" + "".join(cells))
        if r.get("ci"):
            lo, hi = r["ci"]
            lines[-1] += f"   95% CI over teachers [{lo:.4f}, {hi:.4f}]"
    return "\n".join(lines)


def plot_summary(rows: list[dict[str, Any]], teachers: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    names = [r["model"] for r in rows]
    accs = [r["test_acc"] for r in rows]
    colors = ["#999999" if "teacher" in n else "#4c72b0" if "ensemble" in n else "#55a868" if "ceiling" in n else "#dd8452" for n in names]
    ax1.barh(names, accs, color=colors)
    for i, r in enumerate(rows):
        if r.get("ci"):
            lo, hi = r["ci"]
            ax1.plot([lo, hi], [i, i], color="black", lw=2)
        ax1.text(accs[i] + 0.005, i, f"{accs[i]:.3f}", va="center", fontsize=8)
    ax1.invert_yaxis()
    ax1.set_xlabel("gold test accuracy")
    ax1.set_xlim(0, min(1.0, max(accs) * 1.15))
    ax2.hist(teachers["acc_test"], bins=20, color="#999999")
    ax2.axvline(rows[3]["test_acc"], color="#4c72b0", label="ensemble (dual)")
    for r in rows[4:]:
        if r.get("target") not in (None, CEILING):
            ax2.axvline(r["test_acc"], color="#dd8452", ls="--", lw=1)
    ax2.set_title("teacher accuracies (dashed: students)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def write_tensorboard(run_dir: Path, teachers: pd.DataFrame, posterior: dict, students: dict[str, dict]) -> None:
    from tensorboardX import SummaryWriter

    w = SummaryWriter(str(run_dir / "tensorboard"))
    for _, r in teachers.iterrows():
        w.add_scalar("teachers/acc_test", r["acc_test"], int(r["teacher_id"]))
        w.add_scalar("teachers/acc_weak", r["acc_weak"], int(r["teacher_id"]))
    w.add_histogram("teachers/acc_test_hist", teachers["acc_test"].to_numpy(), 0)
    for k in ("test_acc_dual", "test_acc_arith", "variance_test", "mutual_info_test"):
        w.add_scalar(f"ensemble/{k}", posterior[k], 0)
    for tgt, m in students.items():
        for rec in m.get("history", []):
            for key, v in rec.items():
                if key != "epoch":
                    w.add_scalar(f"student_{tgt}/{key}", v, rec["epoch"])
        w.add_scalar(f"student_{tgt}/test_acc", m["test_acc"], m.get("best_epoch", 0))
    w.close()
    storage.push_tree(run_dir / "tensorboard")


def write_report(cfg: ExperimentConfig, run_dir: Path, teachers: pd.DataFrame, posterior: dict, students: dict[str, dict]) -> dict[str, Any]:
    rows = results_rows(teachers, posterior, students, cfg.posterior.single_teacher)
    results = {"rows": rows, "posterior": posterior, "config": cfg.model_dump(mode="json")}
    artifacts.write_json(run_dir / "results.json", results)
    flat = pd.DataFrame([{k: (v if k != "ci" else (str(v) if v else None)) for k, v in r.items()} for r in rows])
    artifacts.write_parquet(run_dir / "results.parquet", pa.Table.from_pandas(flat, preserve_index=False))
    plot_summary(rows, teachers, run_dir / "summary.png")
    if cfg.output.tensorboard:
        write_tensorboard(run_dir, teachers, posterior, students)
    table = format_table(rows)
    print(table)
    print(
        f"\nteacher variance (mean KL(dual mean ‖ teacher), test): {posterior['variance_test']:.4f}   "
        f"mutual information: {posterior['mutual_info_test']:.4f}\nresults: {run_dir / 'results.json'}"
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


def save_figure(fig, path: Path) -> None:
    """Written to a temporary name and renamed, like every other artifact."""
    import matplotlib.pyplot as plt

    with artifacts.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def plot_heatmaps(table: pd.DataFrame, path: Path) -> None:
    """Test accuracy and PGR over student capacity × reverse-CE weight, averaged over the rest."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = table.dropna(subset=["test_acc"]).copy()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    cap = _binned(ok[CAPACITY], log=True) if CAPACITY in ok else pd.Series(0, index=ok.index)
    lam = _binned(ok[LAMBDA], log=False) if LAMBDA in ok else pd.Series(0.0, index=ok.index)
    ok["capacity"], ok["lambda"] = cap, lam
    for ax, key, title in zip(axes, ("test_acc", "pgr_vs_teacher"), ("gold test accuracy", "PGR vs mean single teacher")):
        grid = ok.pivot_table(index="capacity", columns="lambda", values=key, aggfunc="mean").sort_index()
        im = ax.imshow(grid.to_numpy(dtype=float), aspect="auto", origin="lower", cmap="viridis")
        ax.set_xticks(range(len(grid.columns)), [f"{c:g}" for c in grid.columns])
        ax.set_yticks(range(len(grid.index)), [f"{int(c)}" for c in grid.index])
        ax.set_xlabel("reverse-CE weight λ")
        ax.set_ylabel("student width")
        ax.set_title(title)
        for (i, j), v in np.ndenumerate(grid.to_numpy(dtype=float)):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white", fontsize=8)
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    save_figure(fig, path)


def plot_capacity(table: pd.DataFrame, path: Path) -> None:
    """Gold test accuracy against student capacity, one line per target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = table.dropna(subset=["test_acc"]).copy()
    fig, ax = plt.subplots(figsize=(6, 4))
    if CAPACITY in ok:
        ok["capacity"] = _binned(ok[CAPACITY], log=True)
        groups = ok.groupby("student.target") if "student.target" in ok else [("configured target", ok)]
        for target, g in groups:
            m = g.groupby("capacity")["test_acc"].agg(["mean", "std", "count"]).sort_index()
            ax.errorbar(m.index, m["mean"], yerr=m["std"].fillna(0), marker="o", capsize=3, label=str(target))
        ax.set_xscale("log", base=2)
    ax.set_xlabel("student width")
    ax.set_ylabel("gold test accuracy")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
