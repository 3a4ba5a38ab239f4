"""The task registry (`w2s_ray.tasks`) and `w2s-ray study suite`: every task's config valid,
the tables' views as documented and their files reproducible byte for byte, and the suite's
table recomputed from the students it trained (in process, `executor.InProcess`)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from w2s_ray.config import ExperimentConfig, load_config, with_values
from w2s_ray.executor import InProcess
from w2s_ray.pipeline import run_stages, run_study
from w2s_ray.run import RunContext
from w2s_ray.studies import suite
from w2s_ray.tasks import LOAN_COLUMNS, NOISE, TASKS, task_config, write_table

REPO = Path(__file__).resolve().parents[1]


def test_the_registry_covers_signals_images_tables_and_text_and_every_config_validates(tmp_path):
    domains = [t.domain for t in TASKS.values()]
    assert len(TASKS) >= 8 and domains.count("table") >= 3 and {"signals", "images", "text"} <= set(domains)
    base = with_values(ExperimentConfig(), {"output.root": str(tmp_path), "ray.num_cpus": 1}, "test")
    for name, task in TASKS.items():
        cfg = task_config(task, base, tmp_path / "tables")
        assert cfg.output == base.output and cfg.ray == base.ray and task.weak
        assert (cfg.data.path == str(tmp_path / "tables" / f"{name}.parquet")) == (task.make is not None)


@pytest.mark.parametrize("name,yaml", [("window", "w2s_window.yaml"), ("digits_views", "digits_views.yaml"), ("tweets", "tweets.yaml")])
def test_a_task_with_a_shipped_config_is_that_config(name, yaml, tmp_path):
    """The registry and `configs/` cannot drift: the same experiment but for where it reads and writes."""
    shipped = load_config(REPO / "configs" / yaml)
    task = task_config(TASKS[name], ExperimentConfig(), tmp_path)
    drop = {"output": True, "data": {"path"}}
    assert task.model_dump(mode="json", exclude=drop) == shipped.model_dump(mode="json", exclude=drop)


def test_no_loan_column_follows_from_the_grade():
    """The grade sets the interest rate (and through it the installment); none is a feature."""
    assert not {"interest_rate", "sub_grade", "installment", "grade", "balance", "paid_total", "loan_status"} & set(LOAN_COLUMNS)


@pytest.mark.parametrize("name", ["diamonds", "cps1988", "loans", "churn"])
def test_a_table_task_writes_a_clean_view_and_a_noisy_one_the_same_bytes_each_time(name, tmp_path):
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    write_table(name, a)
    write_table(name, b)
    assert a.read_bytes() == b.read_bytes()  # what lets the suite keep an intact file (and its cache)
    t = pq.read_table(a)
    x, tx = (np.asarray(t[c].to_pylist(), np.float64) for c in ("x", "tx"))
    assert x.shape == tx.shape and x.shape[0] > 5000 and not np.isnan(x).any()
    assert np.allclose(x.mean(0), 0, atol=1e-5) and np.allclose(x.std(0)[x.std(0) > 0], 1, atol=1e-4)  # z-scored over the table
    noise = (tx - x).std(0)
    assert np.allclose(noise, 1.0 if name == "churn" else NOISE, rtol=0.05)  # the documented noise, per column
    assert t["label"].type == "string" and len(set(t["label"].to_pylist())) >= 2
    sub = np.asarray(t["sub"].to_pylist(), np.float64)  # the clean column subset: the view that gives no gain
    assert sub.shape[1] < x.shape[1] and all(any(np.array_equal(sub[:, j], x[:, i]) for i in range(x.shape[1])) for j in range(sub.shape[1]))


def small(tmp_path: Path) -> dict:
    """Shrunk through the suite's own `--set` channel: every task at this size."""
    return {"data.n_weak": 150, "data.n_transfer": 500, "data.n_test": 400, "teachers.k": 8, "teachers.epochs": 3,
            "posterior.n_boot": 20, "student.epochs": 3, "student.patience": 10, "student.model.width": 32}


def test_the_suite_table_is_what_its_students_give(tmp_path, monkeypatch, request):
    """Two tasks (an image view and a real table), in process: each row's accuracies, PGRs and C2
    statistic recomputed from the students the study trained; the K students and the
    "worth it" answer follow their own rule; the tables are kept when intact and replaced when not."""
    from w2s_ray.replicates import paired, summarize
    from w2s_ray.studies.claims import crossed, decomposition

    # one torch thread in this process throughout: `InProcess` runs one call at a time, but a call sets
    # torch's thread count for the whole process (as each Ray worker sets its own), so with two lanes
    # the other lane's driver-side sums could run at the call's count; on Ray the driver's never changes
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    request.addfinalizer(lambda: torch.set_num_threads(old))
    cfg = with_values(ExperimentConfig(), {"output.root": str(tmp_path / "runs"), "output.name": "s"}, "test")
    opts = {"tasks": ["digits_views", "churn"], "values": small(tmp_path), "scale": suite.Scale(16, (1, 4, 8))}
    out = run_study("suite", cfg, InProcess(), **opts)
    t = pd.read_parquet(out / "suite.parquet").set_index("task")
    ks = pd.read_parquet(out / "students_k.parquet")
    worth = pd.read_parquet(out / "worth.parquet").set_index("task")
    scaling = pd.read_parquet(out / "scaling.parquet")
    assert list(t.index) == ["digits_views", "churn"] and "How many teachers" in (out / "report.md").read_text()
    cfgs = suite.configs(cfg, opts["tasks"], opts["values"])
    with RunContext.open(cfg, InProcess()) as ctx:  # all cached: the study trained them
        for name, c in cfgs.items():
            main = run_stages(ctx.derive(suite.main_config(c)), "student")
            accs = {tgt: [r.test_acc for r in main.students.replicates[tgt]] for tgt in suite.TARGETS}
            ceil = [r.test_acc for r in main.students.ceilings]
            teach = float(main.teachers.accuracies().mean())
            row = t.loc[name]
            assert row["K"] == 8 and len(accs["single"]) == suite.SEEDS
            assert [r.teacher for r in main.students.replicates["single"]] == list(range(suite.SEEDS))  # one teacher draw per seed
            for tgt in suite.TARGETS:
                s = summarize(accs[tgt])
                assert row[f"student_{tgt}"] == pytest.approx(s["mean"]) and row[f"student_{tgt}_lo"] == pytest.approx(s["ci"][0])
            assert row["ceiling"] == pytest.approx(np.mean(ceil)) and row["teachers"] == pytest.approx(teach)
            assert row["ensemble"] == pytest.approx(main.labels.posterior.test_acc_dual) and row["V"] == pytest.approx(main.labels.posterior.variance_test)
            per_seed = [(a - teach) / (c_ - teach) for a, c_ in zip(accs["dual_mean"], ceil)]
            assert row["pgr_teacher"] == pytest.approx(np.mean(per_seed))
            assert row["dual_minus_single"] == pytest.approx(paired(accs["dual_mean"], accs["single"])["mean"])
            _, rows = decomposition(ctx, main)
            rem = crossed(rows["single"]["remainder"])
            assert [row["c2_remainder"], row["c2_remainder_lo"], row["c2_remainder_hi"]] == pytest.approx([rem["mean"], *rem["ci"]])
            w = {r: run_stages(ctx.derive(suite.weighting_config(c, r)), "student").students.replicates["dual_mean"] for r in ("none", "variance")}
            assert [r.test_acc for r in w["none"][:suite.SEEDS]] == accs["dual_mean"]  # the first seed set: the main run's students
            d = paired([r.test_acc for r in w["variance"]], [r.test_acc for r in w["none"]])
            assert len(w["variance"]) == 2 * suite.SEEDS and [row["w_variance"], row["w_variance_lo"]] == pytest.approx([d["mean"], d["ci"][0]])
            k = ks[ks["task"] == name].set_index("K")
            assert list(k.index) == [1, 4, 8]
            assert k.loc[1, "student"] == pytest.approx(np.mean(accs["single"])) and k.loc[8, "student"] == pytest.approx(np.mean(accs["dual_mean"]))
            four = run_stages(ctx.derive(suite.k_config(c, 4)), "student")
            assert four.teachers.dir == main.teachers.dir and four.labels.posterior.k == 4  # the first 4 of the same teachers
            assert k.loc[4, "student"] == pytest.approx(np.mean([r.test_acc for r in four.students.replicates["dual_mean"]]))
            best = k["student"].idxmax()
            assert worth.loc[name, "k_student_best"] == best
            assert worth.loc[name, "k_student_enough"] == min(kk for kk in k.index if kk == best or k.loc[kk, "minus_best_lo"] > -suite.MARGIN)
            sc = scaling[scaling["task"] == name]
            assert list(sc["K"]) == [1, 2, 4, 8, 16] and sc["variance"].iloc[0] == 0  # extended to k_max: 16 teachers
    # the two tasks side by side, from nothing: the same table, to the bit
    side = with_values(cfg, {"output.root": str(tmp_path / "side")}, "test")
    import threading

    from w2s_ray import pipeline

    threads, real = set(), pipeline.run_stages
    monkeypatch.setattr(pipeline, "run_stages", lambda *a, **k: threads.add(threading.current_thread().name) or real(*a, **k))
    side_out = run_study("suite", side, InProcess(), **(opts | {"parallel": 2}))
    assert {"w2s-ray lane 0", "w2s-ray lane 1"} <= threads  # each task in a lane of its own
    for name in ("suite", "students_k", "scaling", "worth"):
        pd.testing.assert_frame_equal(pd.read_parquet(side_out / f"{name}.parquet"), pd.read_parquet(out / f"{name}.parquet"), check_exact=True)
    quick = run_study("suite", cfg, InProcess(), **(opts | {"scale": suite.Scale(16, (1, 4, 8), weighting=False)}))  # all cached
    assert "Not run with `--quick`" in (quick / "report.md").read_text()
    assert not any(c.startswith("w_") for c in pd.read_parquet(quick / "suite.parquet").columns)
    tables = suite.tables_dir(cfg)
    churn = tables / "churn.parquet"
    mtime = churn.stat().st_mtime_ns
    with RunContext.open(cfg, InProcess()) as ctx:
        suite.prepare(ctx, tasks=["churn"])
        assert churn.stat().st_mtime_ns == mtime  # intact: kept, so the data stage's key holds
        good = churn.read_bytes()
        churn.write_bytes(good[:1000] + bytes(100) + good[1100:])  # same size, damaged
        suite.prepare(ctx, tasks=["churn"])
    assert churn.read_bytes() == good


def test_the_inverse_k_fit_recovers_a_known_curve():
    ks = np.array([2.0, 4, 8, 16, 32, 64])
    v_inf, b, r2 = suite.fit_inverse_k(ks, 0.1 - 0.08 / ks)
    assert (v_inf, b, r2) == pytest.approx((0.1, -0.08, 1.0))


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "w2s_ray.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "RAY_ADDRESS": ""})


def test_suite_options_are_checked_before_ray(tmp_path):
    bad = run_cli("study", "claims", "--quick", cwd=tmp_path)
    assert bad.returncode == 2 and "--quick, --tasks and --parallel are options of study suite" in bad.stderr
    bad = run_cli("study", "suite", "--tasks", "mnist1d,nope", cwd=tmp_path)
    assert bad.returncode == 2 and "unknown task(s) ['nope']" in bad.stderr and "diamonds" in bad.stderr
    bad = run_cli("study", "suite", "--quick", "--set", "teachers.k=128", cwd=tmp_path)
    assert bad.returncode == 2 and "the scaling's largest K (64)" in bad.stderr
    # a --set value the defaults' MNIST-1D would refuse reaches the tasks, not the suite's own config
    bad = run_cli("study", "suite", "--tasks", "diamonds", "--set", "data.teacher_features=sub", "--set", "teachers.k=2", cwd=tmp_path)
    assert bad.returncode == 2 and "study suite (diamonds): teachers.k=2" in bad.stderr, bad.stderr
    assert not (tmp_path / "runs").exists()


def test_the_cli_hands_the_suite_its_options():
    from w2s_ray.cli import build_parser, study_options

    args = build_parser().parse_args(["study", "suite", "--quick", "--tasks", "churn, tweets", "--set", "student.epochs=3"])
    assert study_options(args) == {"quick": True, "tasks": ["churn", "tweets"], "values": {"student.epochs": 3}, "parallel": None}
    assert suite.scale_of(True, None) == suite.QUICK and suite.scale_of(False, None) == suite.DEFAULT and not suite.QUICK.weighting
    assert study_options(build_parser().parse_args(["study", "claims", "--set", "student.epochs=3"])) == {}


def test_lanes_share_the_cluster_so_no_lane_waits_on_a_half_placed_pool():
    """Two suite tasks side by side on 2 CPUs each placed one of two teacher actors and waited
    forever for the other; each lane's pool is sized to its share, at least one actor."""
    from w2s_ray.config import TeacherResources
    from w2s_ray.teachers import default_num_actors

    res = TeacherResources()
    assert default_num_actors(res, {"CPU": 2.0}) == 2
    assert default_num_actors(res, {"CPU": 2.0}, lanes=2) == 1 and default_num_actors(res, {"CPU": 2.0}, lanes=3) == 1
    assert default_num_actors(res, {"CPU": 64.0}, lanes=4) == 16


def test_two_lanes_on_ray_finish_with_the_table_of_one(ray_session, tmp_path):
    """On a real Ray of 2 CPUs, two tasks side by side: each lane's teacher stage fits its
    share (before, each placed one of its two actors and both waited forever); the table is the
    one the same tasks give one after another, to the bit."""
    import threading

    cfg = with_values(ExperimentConfig(), {"output.root": str(tmp_path / "runs"), "output.name": "s"}, "test")
    opts = {"tasks": ["digits_views", "churn"], "values": small(tmp_path) | {"student.epochs": 2},
            "scale": suite.Scale(8, (1, 8), weighting=False)}
    out = {}
    for lanes in (2, 1):
        root = with_values(cfg, {"output.name": f"l{lanes}"}, "test")
        t = threading.Thread(target=lambda: out.__setitem__(lanes, run_study("suite", root, **(opts | {"parallel": lanes}))), daemon=True)
        t.start()
        t.join(300)
        assert not t.is_alive(), f"the suite in {lanes} lane(s) did not finish in 300 s"
    for name in ("suite", "students_k", "scaling"):
        pd.testing.assert_frame_equal(pd.read_parquet(out[2] / f"{name}.parquet"), pd.read_parquet(out[1] / f"{name}.parquet"), check_exact=True)
