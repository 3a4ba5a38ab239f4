"""`ray job submit` for real: a head node on 127.0.0.1 started here, token auth on, the default
pipeline at a small size submitted as a job, outputs checked, and only that head stopped."""

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_members(sid: int) -> list[int]:
    """Processes in session `sid`: `ray start` runs as a session leader, and every daemon, agent
    and worker of its head stays in that session (some rename themselves, so names won't do)."""
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[3]) == sid:
                pids.append(int(d))
    return pids


def stop_head(sid: int) -> None:
    """`ray stop` would stop every Ray on the machine (the test session's too): stop only ours."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in session_members(sid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(2)


@pytest.fixture
def head():
    temp_dir = tempfile.mkdtemp(prefix="w2s-ray-head-", dir="/tmp")  # short: Ray's socket paths are length-limited
    dash, gcs = free_port(), free_port()
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",  # the job's entry point, w2s-ray, lives here
        "RAY_AUTH_MODE": "token",  # on by default in Ray 2.60 for clusters it starts; set explicitly
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("RAY_ADDRESS", None)
    # every port chosen free, so this head cannot collide with another Ray on the machine
    cmd = [str(BIN / "ray"), "start", "--head", "--port", str(gcs), "--dashboard-host", "127.0.0.1",
           "--dashboard-port", str(dash), "--ray-client-server-port", str(free_port()),
           "--dashboard-agent-listen-port", str(free_port()), "--num-cpus", "2", "--disable-usage-stats",
           "--temp-dir", temp_dir]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    _, err = proc.communicate(timeout=180)
    try:
        assert proc.returncode == 0, err[-2000:]
        yield f"http://127.0.0.1:{dash}", env
    finally:
        stop_head(proc.pid)
        assert not session_members(proc.pid), "the head node did not stop"
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_the_pipeline(head, tmp_path):
    address, env = head
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    runs = tmp_path / "runs"
    (job_dir / "small.yaml").write_text(
        "data: {num_samples: 1500, chunk_size: 500, n_weak: 300, n_transfer: 600, n_test: 500}\n"
        "teachers: {k: 8, epochs: 5, model: {name: mlp, width: 16}}\n"
        "student: {model: {name: mlp, width: 32}, epochs: 3, targets: [dual_mean]}\n"
        f"output: {{root: {runs}, name: job}}\n"
    )
    submit = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(job_dir), "--", "w2s-ray", "run", "small.yaml"]
    deadline = time.time() + 120
    while True:  # the head's job agent comes up a few seconds after `ray start` returns
        out = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=600)
        if "No available agent" not in out.stdout + out.stderr or time.time() > deadline:
            break
        time.sleep(3)
    assert out.returncode == 0 and "succeeded" in out.stdout + out.stderr, (out.stdout + out.stderr)[-3000:]
    assert (runs / "job" / "results.json").is_file()
    teachers = pd.read_parquet(next((runs / "job" / "teachers").glob("*/teachers.parquet")))
    assert sorted(teachers["teacher_id"]) == list(range(8))
    # the job server refuses a client without the cluster's token
    wrong = {**env, "RAY_AUTH_TOKEN": "not-the-token"}
    denied = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=wrong, capture_output=True, text=True, timeout=120)
    assert denied.returncode != 0 or "token" in (denied.stdout + denied.stderr).lower()
