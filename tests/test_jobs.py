"""`ray job submit` for real: a head node on 127.0.0.1 started here, token auth on, the default
pipeline at a small size and then a Tune search submitted as jobs, outputs checked, and only
that head stopped."""

import secrets
import shutil
import subprocess
import tempfile
import time

import pandas as pd
import pytest

from local_cluster import BIN, kill_session, node_env, session_members, start_head


@pytest.fixture
def head():
    temp_dir = tempfile.mkdtemp(prefix="w2s-ray-head-", dir="/tmp")  # short: Ray's socket paths are length-limited
    # token auth is on by default in Ray 2.60 for clusters it starts; set explicitly
    env = node_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    sid, _, dash = start_head(temp_dir, env, num_cpus=2, dashboard=True)
    try:
        yield f"http://127.0.0.1:{dash}", env
    finally:
        kill_session(sid)
        assert not session_members(sid), "the head node did not stop"
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.cluster
def test_ray_job_submit_runs_the_pipeline(head, tmp_path):
    address, env = head
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    runs = tmp_path / "runs"
    (job_dir / "small.yaml").write_text(
        "data: {num_samples: 1500, chunk_size: 500, n_weak: 300, n_transfer: 600, n_test: 500}\n"
        "teachers: {k: 8, epochs: 5, model: {name: mlp, width: 16}}\n"
        "student: {model: {name: mlp, width: 32}, epochs: 3, seeds: 1, targets: [dual_mean]}\n"
        f"output: {{root: {runs}, name: job}}\n"
    )
    (job_dir / "grid.yaml").write_text(
        "search: grid\nscheduler: {type: none}\nresources: {cpu: 1}\n"
        "params: {student.model.width: {type: grid, values: [8, 32]}}\nconfirm_seeds: 0\n"
    )

    def submit(*command: str) -> str:
        cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(job_dir), "--", *command]
        deadline = time.time() + 120
        while True:  # the head's job agent comes up a few seconds after `ray start` returns
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
            if "No available agent" not in out.stdout + out.stderr or time.time() > deadline:
                break
            time.sleep(3)
        log = out.stdout + out.stderr
        assert out.returncode == 0 and "succeeded" in log, log[-3000:]
        return log

    submit("w2s-ray", "run", "small.yaml")
    assert (runs / "job" / "results.json").is_file()
    teachers = pd.read_parquet(next((runs / "job" / "teachers").glob("*/teachers.parquet")))
    assert sorted(teachers["teacher_id"]) == list(range(8))
    # a Tune search as a job: it reuses the run's cached stages and trains only the trials
    log = submit("w2s-ray", "tune", "small.yaml", "--space", "grid.yaml")
    assert "teachers: cached" in log
    trials = pd.read_parquet(runs / "job" / "tune" / "grid" / "trials.parquet")
    assert sorted(trials["student.model.width"]) == [8, 32] and (trials["status"] == "TERMINATED").all()
    # the job server refuses a client without the cluster's token
    wrong = {**env, "RAY_AUTH_TOKEN": "not-the-token"}
    denied = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=wrong, capture_output=True, text=True, timeout=120)
    assert denied.returncode != 0, denied.stdout + denied.stderr
    right = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=env, capture_output=True, text=True, timeout=120)
    assert right.returncode == 0, right.stdout + right.stderr  # the same call with the token is served
