"""Ray nodes that a test starts on 127.0.0.1 and stops again.

Each `ray start` runs as the leader of a new process session, and every daemon, agent and worker
of its node stays in that session, so a test stops exactly the node it started: `ray stop` would
also stop the test session's own Ray. Every port is chosen free, so these nodes cannot collide
with another Ray on the machine.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_members(sid: int) -> list[int]:
    """Live processes in session `sid` (some Ray processes rename themselves, so names won't
    do); zombies, dead but not yet reaped, are not counted."""
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[3]) == sid and fields[0] != "Z":
                pids.append(int(d))
    return pids


def kill_session(sid: int, signals=(signal.SIGTERM, signal.SIGKILL), wait: float = 2.0, timeout: float = 20.0) -> None:
    """Send each signal to every process of the session, waiting up to `wait` after each for
    the session to end, then SIGKILL whatever is still there (a raylet may fork a worker while
    we kill) until the session is empty or `timeout` passes."""

    def send(sig) -> None:
        for pid in session_members(sid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    for sig in signals:
        send(sig)
        settle = time.time() + wait  # up to `wait` for the session to end on this signal
        while session_members(sid) and time.time() < settle:
            time.sleep(0.1)
    deadline = time.time() + timeout
    while session_members(sid) and time.time() < deadline:
        send(signal.SIGKILL)
        time.sleep(0.2)


def node_env(**extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",  # w2s-ray, a job's entry point, lives here
        "RAY_USAGE_STATS_ENABLED": "0",
        **extra,
    }
    env.pop("RAY_ADDRESS", None)
    return env


def node_ports() -> list[str]:
    """Ports every node opens; left to Ray, some have fixed defaults that another Ray holds."""
    return ["--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
            "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port()),
            "--node-manager-port", str(free_port()), "--object-manager-port", str(free_port())]


def start_head(temp_dir: str, env: dict, num_cpus: int = 2, dashboard_port: int | None = None, resources: str | None = None) -> tuple[int, str]:
    """(session id, GCS address) of a head node; `ray start` returns once it is up."""
    gcs = free_port()
    cmd = [str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
           "--ray-client-server-port", str(free_port()), "--num-cpus", str(num_cpus),
           "--disable-usage-stats", "--temp-dir", temp_dir, *node_ports()]
    if dashboard_port:
        cmd += ["--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port)]
    else:
        cmd += ["--include-dashboard", "false"]
    if resources:
        cmd += ["--resources", resources]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    _, err = proc.communicate(timeout=180)
    if proc.returncode != 0:
        kill_session(proc.pid)
        raise RuntimeError(f"ray start --head failed: {err[-2000:]}")
    return proc.pid, f"127.0.0.1:{gcs}"


def start_worker(address: str, env: dict, num_cpus: int, resources: str) -> int:
    """Session id of a second raylet joining `address`; it stays in the foreground (`--block`)
    so that killing its session is a node dying."""
    cmd = [str(BIN / "ray"), "start", "--address", address, "--node-ip-address", "127.0.0.1",
           "--num-cpus", str(num_cpus), "--resources", resources, "--disable-usage-stats", "--block", *node_ports()]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    return proc.pid
