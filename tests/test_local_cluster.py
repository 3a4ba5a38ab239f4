"""The test helpers that start Ray nodes: their ports cannot be taken in passing, and a head
whose port was taken anyway starts again on fresh ports (a CI run lost its GCS port to another
process between choosing it and binding it)."""

import shutil
import socket
import tempfile

import pytest

import local_cluster
from local_cluster import RAY_FIXED_PORTS, RAY_WORKER_PORTS, free_port, kill_session, node_env, outgoing_ports, session_members, start_head


def test_free_ports_are_outside_the_ranges_other_processes_draw_from():
    ports = [free_port() for _ in range(200)]
    assert not [p for p in ports if p in outgoing_ports() or p in RAY_WORKER_PORTS or p in RAY_FIXED_PORTS]
    for p in ports[:20]:  # and they bind on every address
        with socket.socket() as s:
            s.bind(("0.0.0.0", p))


@pytest.mark.cluster
def test_a_head_whose_gcs_port_is_taken_starts_again_on_fresh_ports(monkeypatch):
    taken = socket.socket()
    taken.bind(("127.0.0.1", free_port()))
    taken.listen()
    port = taken.getsockname()[1]
    handed = []

    def first_the_taken_port() -> int:  # the GCS port is the first one start_head asks for
        handed.append(port if not handed else free_port())
        return handed[-1]

    monkeypatch.setattr(local_cluster, "free_port", first_the_taken_port)
    temp_dir = tempfile.mkdtemp(prefix="w2s-ray-ports-", dir="/tmp")
    sid = None
    try:
        sid, address, _ = start_head(temp_dir, node_env(RAY_AUTH_MODE="disabled"), num_cpus=1)
        assert handed[0] == port and address != f"127.0.0.1:{port}"
        assert session_members(sid)
    finally:
        taken.close()
        if sid is not None:
            kill_session(sid)
            assert not session_members(sid), "the head node did not stop"
        shutil.rmtree(temp_dir, ignore_errors=True)
