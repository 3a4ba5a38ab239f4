"""Ray nodes that a test starts on 127.0.0.1 and stops again.

Each `ray start` runs as the leader of a new process session, and every daemon, agent and worker
of its node stays in that session, so a test stops exactly the node it started: `ray stop` would
also stop the test session's own Ray. Every port is chosen free, outside the kernel's range for
outgoing connections and Ray's range for workers, and a node that still finds one of its ports
taken when it binds is started again on fresh ports: these nodes cannot collide with another Ray
on the machine.
"""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


RAY_WORKER_PORTS = range(10002, 20000)  # Ray's default --min-worker-port .. --max-worker-port
RAY_FIXED_PORTS = {6379, 8265, 10001, 52365}  # GCS, dashboard, client server, dashboard agent: Ray's defaults
# what `ray start` prints when a daemon found its port taken between `free_port` and its bind (a
# CI run's GCS lost port 41929, a port the kernel had given out: the old `bind(0)` drew from
# the range every outgoing connection of the other test worker's Ray also draws from)
PORT_TAKEN = re.compile(r"already in use|Failed to start the grpc server|[Cc]ould not bind|bind.*failed")


def port_taken_line(text: str) -> str:
    """The line of a node's output that says a port was taken, or ''."""
    return next((line.strip() for line in text.splitlines() if PORT_TAKEN.search(line)), "")


def outgoing_ports() -> range:
    lo, hi = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    return range(lo, hi + 1)


def free_port() -> int:
    """A port that binds now on every address (Ray's GCS listens on 0.0.0.0) and that neither the
    kernel gives to outgoing connections nor Ray to its workers or by default, so no other Ray on
    the machine takes it in passing."""
    busy = outgoing_ports()
    while True:
        port = random.randrange(1024, 65536)
        if port in busy or port in RAY_WORKER_PORTS or port in RAY_FIXED_PORTS:
            continue
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
        return port


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


ATTEMPTS = 3


def with_fresh_ports(what: str, attempt) -> object:
    """`attempt(i)` → (result, output): a node started on fresh ports, its result, or None and
    its output once its session is stopped. Tried up to `ATTEMPTS` times while the output says a
    port was taken; any other failure, or the last, raises with that output."""
    for i in range(ATTEMPTS):
        result, text = attempt(i)
        if result is not None:
            return result
        if not PORT_TAKEN.search(text) or i == ATTEMPTS - 1:
            raise RuntimeError(f"{what} failed (attempt {i + 1} of {ATTEMPTS}): {port_taken_line(text)[:500]}\n{text[-2000:]}")
        print(f"{what}: a port was taken, starting again on fresh ports: {port_taken_line(text)[:300]}", file=sys.stderr)
    raise AssertionError("unreachable")


def gcs_log(temp_dir: str, before: set[Path]) -> str:
    """What the GCS of a session started after `before` wrote to its logs, if it says a port was taken."""
    for session in set(Path(temp_dir).glob("session_2*")) - before:
        for f in (session / "logs" / "gcs_server.out", session / "logs" / "gcs_server.err"):
            text = f.read_text(errors="replace") if f.exists() else ""
            if PORT_TAKEN.search(text):
                return text
    return ""


def start_head(temp_dir: str, env: dict, num_cpus: int = 2, dashboard: bool = False) -> tuple[int, str, int | None]:
    """(session id, GCS address, dashboard port or None) of a head node; `ray start` returns once
    it is up. Started again on fresh ports, up to `ATTEMPTS` times, when a port was taken.

    A GCS that could not bind exits at once, but `ray start` goes on waiting for it for ~40 s
    (measured: 41.7 s); so the GCS's own log is watched too, and the attempt is stopped as soon
    as it says its port was taken (a retried head is up in ~7 s in all)."""

    def attempt(i: int):
        gcs, dash = free_port(), free_port() if dashboard else None
        cmd = [str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
               "--ray-client-server-port", str(free_port()), "--num-cpus", str(num_cpus),
               "--disable-usage-stats", "--temp-dir", temp_dir, *node_ports()]
        if dash:
            cmd += ["--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash)]
        else:
            cmd += ["--include-dashboard", "false"]
        before = set(Path(temp_dir).glob("session_2*"))  # earlier attempts' sessions say "taken" too
        log = Path(temp_dir) / f"head-start-{i}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline, gcs_said = time.time() + 180, ""
        while proc.poll() is None and time.time() < deadline and not gcs_said:
            time.sleep(0.2)
            gcs_said = gcs_log(temp_dir, before)
        if proc.poll() == 0:
            return (proc.pid, f"127.0.0.1:{gcs}", dash), ""
        kill_session(proc.pid)
        proc.wait()
        return None, log.read_text(errors="replace") + gcs_said

    return with_fresh_ports("ray start --head", attempt)


def start_worker(address: str, env: dict, num_cpus: int, resources: str, log_dir: str) -> int:
    """Session id of a second raylet joining `address`; it stays in the foreground (`--block`)
    so that killing its session is a node dying. Returns once `ray start` says it blocks, that is
    once the node is up; started again on fresh ports when a port was taken."""

    def attempt(i: int):
        log = Path(log_dir) / f"worker-start-{i}.log"
        cmd = [str(BIN / "ray"), "start", "--address", address, "--node-ip-address", "127.0.0.1",
               "--num-cpus", str(num_cpus), "--resources", resources, "--disable-usage-stats", "--block", *node_ports()]
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 180
        while proc.poll() is None and "will now block" not in log.read_text() and time.time() < deadline:
            time.sleep(0.1)
        if proc.poll() is None and "will now block" in log.read_text():
            return proc.pid, ""
        kill_session(proc.pid)
        proc.wait()
        return None, log.read_text(errors="replace")

    return with_fresh_ports("ray start --address --block", attempt)
