"""Print the README's claims table from the claims studies' own files.

    python configs/claims_table.py [RUNS_ROOT]        # default: runs

Reads `RUNS_ROOT/<name>/study/claims/claims.parquet` (and `p5_draws.parquet`,
`c2_summary.parquet`) for the runs default, w2s_window and digits_views, whichever exist, and
prints one Markdown row per claim: the effect over all replicates, its 95% CI, the final
verdict, and each seed set's verdict; then the P5 and C2 numbers the README quotes.
"""

import sys
from pathlib import Path

import pandas as pd

RUNS = ("default", "w2s_window", "digits_views")
SHORT = {"supported": "supp.", "not supported": "not supp.", "inconclusive": "inconcl.", "not tested": "not tested"}


def cell(row: pd.Series) -> str:
    if row["verdict"] == "not tested":
        return "**not tested**"
    sets = f"A {SHORT[row['verdict_A']]}, B {SHORT[row['verdict_B']]}"
    return f"{row['effect']:+.3f} [{row['ci_lo']:+.3f}, {row['ci_hi']:+.3f}] **{row['verdict']}** ({sets})"


def main(root: str = "runs") -> None:
    found = {name: Path(root) / name / "study" / "claims" for name in RUNS if (Path(root) / name / "study" / "claims" / "claims.parquet").is_file()}
    if not found:
        sys.exit(f"no claims study under {root}/<name>/study/claims for {RUNS}")
    tables = {name: pd.read_parquet(d / "claims.parquet").set_index("claim") for name, d in found.items()}
    first = next(iter(tables.values()))
    print("| claim | " + " | ".join(found) + " |")
    print("|---|" + "---|" * len(found))
    for claim, row in first.iterrows():
        print(f"| {claim}: {row['statement']} | " + " | ".join(cell(t.loc[claim]) for t in tables.values()) + " |")
    for name, d in found.items():
        p5 = pd.read_parquet(d / "p5_draws.parquet")
        c2 = pd.read_parquet(d / "c2_summary.parquet").set_index("target")
        print(f"\n{name}: P5 per width (bv = Bregman variance across {int(p5['n_draws'].iloc[0])} teacher draws)")
        print(p5[["width", "bv_students", "bv_teachers", "bv_floor", "share_of_teacher_variance", "kl_students_mean_q", "kl_s_q", "kl_s_p"]]
              .to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        for tgt, r in c2.iterrows():
            lo, hi = r["gain_over_misfit_ci"]
            print(f"{name}: C2 {tgt}: gain {r['gain']:.4f}, misfit {r['misfit']:.4f} (V inside: {r['variance_in_misfit']:.4f}), "
                  f"KL(s‖q) {r['kl_to_dual_mean']:.4f}, remainder {r['remainder']:+.4f}, gain/misfit {r['gain_over_misfit']:.2f} [{lo:.2f}, {hi:.2f}]")


if __name__ == "__main__":
    main(*sys.argv[1:])
