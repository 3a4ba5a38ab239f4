"""Real Tune searches on the local Ray (CPU): outputs, retry of a failing trial, resume after a kill."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml

from conftest import popen_interruptible, run_dir, small_config
from w2s_ray.config import load_config, to_yaml
from w2s_ray.errors import ConfigError, W2SError
from w2s_ray.pipeline import run_tune
from w2s_ray.space import SearchSpace, load_space
from w2s_ray.trial import TrialFault
from w2s_ray.tune import check_placeable

SPACE = {
    "search": "optuna",
    "num_samples": 4,
    "seed": 0,
    "scheduler": {"type": "asha", "grace_period": 2},
    "resources": {"cpu": 1},
    "baseline": {"student.rce_weight": 0.0, "student.target": "dual_mean"},
    "confirm_seeds": 0,
    "params": {
        "student.model.width": {"type": "logint", "low": 4, "high": 64},
        "student.rce_weight": {"type": "uniform", "low": 0.0, "high": 1.0},
        "student.target": {"type": "choice", "values": ["single", "dual_mean"]},
    },
}


def write_space(path: Path, **changes) -> Path:
    space = {**SPACE, **changes}
    path.write_text(yaml.safe_dump(space))
    return path


def stage_files(run) -> dict[str, int]:
    """Every file of the teacher and labels stages, with its mtime."""
    return {str(f.relative_to(run)): f.stat().st_mtime_ns for stage in ("teachers", "labels") for f in (run / stage).rglob("*") if f.is_file()}


@pytest.fixture(scope="module")
def tuned(ray_session, warm, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tune")
    cfg = warm(tmp)  # the run the search starts from
    run = run_dir(cfg).path
    before = stage_files(run)
    space_file = write_space(tmp / "space.yaml", confirm_seeds=3)
    summary = run_tune(cfg, load_space(space_file, cfg), "s4")
    return cfg, summary, run / "tune" / "s4", before


@pytest.mark.slow
def test_search_outputs_are_consistent(tuned):
    cfg, summary, d, _ = tuned
    table = pd.read_parquet(d / "trials.parquet")
    assert len(table) == 4 == summary["n_trials"]
    assert len(pd.read_csv(d / "trials.csv")) == 4
    assert {"student.model.width", "student.rce_weight", "test_acc", "pgr_vs_teacher", "val_teacher_ce", "wall_s"} <= set(table.columns)
    assert table["test_acc"].between(0, 1).all()
    for f in ("heatmap.png", "capacity.png", "best.yaml", "summary.json"):
        assert (d / f).stat().st_size > 0, f
    assert list(d.glob("*/events.out.tfevents.*")), "no TensorBoard event files from Tune"
    study = optuna.load_study(study_name="s4", storage=f"sqlite:///{d / 'optuna.db'}")
    assert len(study.trials) == 4
    assert study.trials[0].params["student.rce_weight"] == 0.0  # the enqueued forward-CE baseline
    best = load_config(d / "best.yaml")
    assert best.student.targets == [summary["chosen"]["student.target"]]
    assert best.student.model.width == summary["chosen"]["student.model.width"]
    assert summary["gap_test_acc"] >= 0
    # the chosen point and the baseline again, on 3 fresh seeds each (paired)
    conf = pd.read_parquet(d / "confirm.parquet")
    assert sorted(conf["seed"].unique()) == [1000, 1001, 1002] and len(conf) == 6
    c = summary["confirmed"]
    diff = conf[conf["point"] == "chosen"]["test_acc"].to_numpy() - conf[conf["point"] == "baseline"]["test_acc"].to_numpy()
    assert c["chosen"]["n"] == 3 and c["chosen_minus_baseline"]["mean"] == pytest.approx(diff.mean())


@pytest.mark.slow
def test_the_search_trains_no_teacher_and_builds_no_labels(tuned):
    cfg, _, d, before = tuned
    # a retrained teacher stage rewrites its packs (or adds a directory): every file is as it was
    assert stage_files(d.parent.parent) == before


@pytest.mark.slow
def test_a_trial_that_fails_once_is_retried_from_its_checkpoint(ray_session, warm, tmp_path):
    cfg = warm(tmp_path)
    marker = tmp_path / "failed-once"
    space_file = write_space(tmp_path / "space.yaml", num_samples=2, scheduler={"type": "none"})
    summary = run_tune(cfg, load_space(space_file, cfg), "retry", fault=TrialFault(epoch=3, marker=str(marker)))
    assert marker.exists()
    assert summary["n_errors"] == 0
    table = pd.read_parquet(run_dir(cfg) / "tune" / "retry" / "trials.parquet")
    assert (table["epoch"] == cfg.student.epochs).all()
    # the retried trial resumed at epoch 3 from the epoch-2 checkpoint: no epoch was reported twice
    for result in (run_dir(cfg) / "tune" / "retry").glob("*/result.json"):
        epochs = [json.loads(line)["epoch"] for line in result.read_text().splitlines()]
        assert epochs == list(range(1, cfg.student.epochs + 1)), (result, epochs)


def test_bad_space_files_are_rejected_with_the_key(tmp_path):
    cfg = load_config(None)
    cases = [
        ({"params": {"student.model.widht": {"type": "int", "low": 1, "high": 4}}}, "student.model.widht"),
        ({"params": {"student.rce_weight": {"type": "uniform", "low": 0.5, "high": 0.5}}}, "empty range"),
        ({"params": {"student.rce_weight": {"type": "uniform", "low": 0.0, "high": 2.0}}}, "student.rce_weight"),
        ({"params": {"student.target": {"type": "choice", "values": []}}}, "non-empty"),
        ({"params": {"teachers.k": {"type": "int", "low": 2, "high": 8}}}, "only student.* keys"),
        ({"params": {}}, "params"),
        ({"serach": "grid"}, "serach: unknown key"),
        ({"inject_failure": {"epoch": 1, "marker": "m"}}, "inject_failure: unknown key"),  # a test hook, not a user key
    ]
    for change, needle in cases:
        f = write_space(tmp_path / "bad.yaml", **change)
        with pytest.raises(ConfigError) as err:
            load_space(f, cfg)
        assert needle in str(err.value) and "bad.yaml" in str(err.value), (change, str(err.value))


def test_trial_resources_default_to_the_students(tmp_path):
    cfg = load_config(None, {"student.resources": {"num_cpus": 2, "num_gpus": 0.25}})
    space = {k: v for k, v in SPACE.items() if k != "resources"}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(space))
    assert load_space(tmp_path / "s.yaml", cfg).resources.model_dump() == {"cpu": 2.0, "gpu": 0.25}
    assert load_space(write_space(tmp_path / "t.yaml"), cfg).resources.model_dump() == {"cpu": 1.0, "gpu": 0.0}


@pytest.mark.slow
def test_interrupted_search_resumes_without_rerunning_finished_trials(warm, tmp_path):
    # six points, two at a time: when the first finishes, two waves are left to interrupt
    warm(tmp_path)  # data, teachers and labels cached (the CLI below starts its own Ray)
    cfg = small_config(tmp_path, student={"epochs": 30, "patience": 100})
    conf = tmp_path / "c.yaml"
    conf.write_text(to_yaml(cfg))
    space = write_space(tmp_path / "space.yaml", search="grid", num_samples=1, scheduler={"type": "none"},
                        params={"student.model.width": {"type": "grid", "values": [4, 8, 16, 32, 48, 64]}})
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    cmd = [sys.executable, "-m", "w2s_ray.cli", "tune", str(conf), "--space", str(space), "--set", "ray.num_cpus=2"]
    search = run_dir(cfg) / "tune" / "space"
    log = tmp_path / "search.log"
    proc = popen_interruptible(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    finished: dict[str, float] = {}
    deadline = time.time() + 240
    while time.time() < deadline and not finished:
        assert proc.poll() is None, f"the search exited early: {log.read_text()[-2000:]}"
        for result in search.glob("*/result.json"):
            lines = result.read_text().splitlines()
            try:
                last = json.loads(lines[-1]) if lines else {}
            except json.JSONDecodeError:  # Tune is appending this line right now
                continue
            if last.get("epoch") == cfg.student.epochs:
                finished[result.parent.name] = result.stat().st_mtime_ns
        time.sleep(0.5)
    assert finished, "no trial finished before the deadline"
    # interrupt the driver as Ctrl-C or `ray job stop` would (Tune saves its state on SIGINT),
    # then make sure nothing it started is left
    os.killpg(proc.pid, signal.SIGINT)
    try:
        code = proc.wait(timeout=60)
        assert code != 0, f"the interrupted search exited {code}: {log.read_text()[-4000:]}"  # it says so and writes no results
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # everything had already exited
            pass
    finished = {name: (search / name / "result.json").stat().st_mtime_ns for name in finished}
    assert not (search / "trials.parquet").exists()
    out = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    table = pd.read_parquet(search / "trials.parquet")
    assert len(table) == 6 and (table["status"] == "TERMINATED").all()
    for name, mtime in finished.items():
        assert (search / name / "result.json").stat().st_mtime_ns == mtime, f"finished trial {name} was run again"
    for result in search.glob("*/result.json"):  # interrupted trials continued from a checkpoint
        epochs = [json.loads(line)["epoch"] for line in result.read_text().splitlines()]
        assert epochs.count(1) == 1 and epochs[-1] == cfg.student.epochs, (result.parent.name, epochs)
        # at most the epochs in flight at the kill (reported, checkpoint not yet recorded) are redone
        assert len(epochs) - len(set(epochs)) <= 2, (result.parent.name, epochs)


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"params": {"student.model.width": {"type": "grid", "values": [4, 8]}}}, "optuna samples its points and cannot take 'grid' parameters"),
        ({"baseline": {"student.lr": 0.001}}, "baseline 'student.lr' is not one of the searched params"),
        ({"baseline": {"teachers.k": 8}}, "baseline 'teachers.k': only student.* keys"),
    ],
)
def test_space_files_that_cannot_run_as_written(tmp_path, change, needle):
    with pytest.raises(ConfigError, match=needle):
        load_space(write_space(tmp_path / "bad.yaml", **change), load_config(None))


def test_trials_the_cluster_cannot_place_are_refused():
    for resources, needle in (({"cpu": 1, "gpu": 0.5}, "resources.gpu asks for 0.5 GPU for one trial (the cluster has 0)"), ({"cpu": 8}, "resources.cpu asks for 8 CPU for one trial (the cluster has 2)")):
        space = SearchSpace.model_validate({**SPACE, "resources": resources})
        with pytest.raises(W2SError, match=re.escape(needle)):
            check_placeable(space, {"CPU": 2.0})
    check_placeable(SearchSpace.model_validate(SPACE), {"CPU": 2.0})  # one CPU per trial fits


def test_a_search_name_cannot_leave_the_tune_directory(tmp_path):
    out = subprocess.run([sys.executable, "-m", "w2s_ray.cli", "tune", "--space", str(write_space(tmp_path / "s.yaml")), "--name", "../../x"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--name '../../x'" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
def test_a_search_where_every_trial_fails_ends_in_one_line(ray_session, warm, tmp_path):
    cfg = warm(tmp_path)
    space = load_space(write_space(tmp_path / "space.yaml", num_samples=2, scheduler={"type": "none"}, max_failures=0), cfg)
    with pytest.raises(W2SError, match=r"every trial failed; the first \(.+\): RuntimeError: injected failure \(TrialFault\) \(its log: .+\)"):
        run_tune(cfg, space, "allfail", fault=TrialFault(epoch=1))


@pytest.mark.slow
def test_a_resumed_search_that_lost_tune_state_trains_no_finished_point_again(ray_session, warm, tmp_path):
    """A driver killed before Tune saved its state: on resume Tune starts those points again as
    new trials; each finds its finished record and reports it without training (a TrialFault
    makes any trial that trains fail), and the replaced trial folders are removed."""
    cfg = warm(tmp_path)
    space = load_space(write_space(tmp_path / "space.yaml", search="grid", num_samples=1, scheduler={"type": "none"},
                                   params={"student.model.width": {"type": "grid", "values": [4, 8]}}), cfg)
    run_tune(cfg, space, "lost")
    search = run_dir(cfg).path / "tune" / "lost"
    first = pd.read_parquet(search / "trials.parquet")
    assert len(list((search / "finished").glob("*.json"))) == 2
    for f in [search / "tuner.pkl", *search.glob("experiment_state-*.json"), *search.glob("basic-variant-state-*.json")]:
        f.unlink()  # what a kill before the first state save leaves
    run_tune(cfg, space, "lost", resume=True, fault=TrialFault(epoch=1))
    again = pd.read_parquet(search / "trials.parquet")
    assert (again["status"] == "TERMINATED").all() and len(again) == 2
    cols = ["student.model.width", "test_acc", "val_teacher_ce", "best_epoch"]
    pd.testing.assert_frame_equal(first[cols].sort_values(cols[0]).reset_index(drop=True), again[cols].sort_values(cols[0]).reset_index(drop=True))
    assert len([d for d in search.iterdir() if (d / "params.json").is_file()]) == 2
