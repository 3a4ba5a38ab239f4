"""A node dies mid-run: no teacher is lost and no posterior statistic changes.

A head (2 CPUs) and a second raylet (1 CPU, custom resource `second_node`) run on this machine.
`w2s-ray labels` runs against them as a separate driver; its two teacher actors are spread over
both nodes. As soon as the second node has finished a pack, every process of that node is
killed. The head must take over (Ray restarts the actor there and retries its pack), the stage
must end with exactly K distinct teachers, and teachers and posterior must equal those of an
uninterrupted run of the same config on the test session's Ray.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from local_cluster import BIN, kill_session, node_env, session_members, start_head, start_worker
from w2s_ray.config import parse_config
from w2s_ray.pipeline import run_pipeline
from w2s_ray.packfiles import read_pack_logp

K = 24


def experiment(root, name: str, max_retries: int) -> dict:
    return {
        "data": {"source": "digits", "n_weak": 400, "n_transfer": 700, "n_test": 600},
        # ~3 s per pack of 4: the kill comes with most of the 6 packs still to train
        "teachers": {"k": K, "epochs": 400, "model": {"name": "mlp", "width": 32},
                     "resources": {"num_actors": 2, "max_pack_size": 4, "max_retries": max_retries}},
        "posterior": {"n_boot": 20},
        "output": {"root": str(root), "name": name},
    }


ALIVE_NODES = """
import json, sys, time, ray
ray.init(address=sys.argv[1], logging_level="ERROR")
deadline = time.time() + 120
while time.time() < deadline:
    alive = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
    if len(alive) == 2:
        break
    time.sleep(0.5)
print(json.dumps(alive))
"""


STORE_CREATED = """
import sys, ray
from ray._private.internal_api import get_memory_info_reply, get_state_from_address
ray.init(address=sys.argv[1], logging_level="ERROR")
stats = get_memory_info_reply(get_state_from_address(sys.argv[1])).store_stats
print(stats.cumulative_created_objects, stats.cumulative_created_bytes)
"""


@pytest.fixture
def two_nodes():
    temp_dir = tempfile.mkdtemp(prefix="w2s-ray-nodes-", dir="/tmp")
    # the head notices a dead node within ~2 s instead of Ray's default ~30 s
    env = node_env(RAY_AUTH_MODE="disabled", RAY_health_check_initial_delay_ms="0", RAY_health_check_period_ms="500",
                   RAY_health_check_timeout_ms="1000", RAY_health_check_failure_threshold="3")
    head_sid, address, _ = start_head(temp_dir, env, num_cpus=2)
    try:
        worker_sid = start_worker(address, env, num_cpus=1, resources='{"second_node": 1}', log_dir=temp_dir)
    except BaseException:
        kill_session(head_sid)
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    try:
        out = subprocess.run([sys.executable, "-c", ALIVE_NODES, address], env=env, capture_output=True, text=True, timeout=180)
        nodes = json.loads(out.stdout.strip().splitlines()[-1])
        assert len(nodes) == 2, out.stderr[-2000:]
        second = next(n for n, res in nodes.items() if "second_node" in res)
        yield address, env, worker_sid, second
    finally:
        for sid in (worker_sid, head_sid):
            kill_session(sid)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not session_members(worker_sid) + session_members(head_sid), "a node did not stop"


@pytest.fixture(scope="module")
def whole(ray_session, tmp_path_factory):
    """The same experiment, never interrupted, on the test session's Ray: once for both variants
    (`max_retries` is a resource setting, outside every cache key)."""
    return run_pipeline(parse_config(experiment(tmp_path_factory.mktemp("whole") / "runs", "whole", 0)), until="labels")


def packs_on_disk(run) -> list[dict]:
    rows = []
    for f in sorted(run.glob("teachers/*/packs/pack-*.parquet")):
        try:
            t = pq.read_table(f).to_pylist()
        except OSError:
            continue
        rows.append({"pack": t[0]["pack"], "node": t[0]["node"], "restarted": t[0]["restarted"], "teachers": [r["teacher_id"] for r in t]})
    return rows


@pytest.mark.cluster
@pytest.mark.parametrize("max_retries", [3, 0], ids=["ray-restarts-actor", "driver-requeues-pack"])
def test_node_killed_mid_run_loses_no_teacher(two_nodes, whole, tmp_path, max_retries):
    address, env, worker_sid, second = two_nodes
    cfg_file = tmp_path / "nodes.yaml"
    cfg_file.write_text(yaml.safe_dump(experiment(tmp_path / "runs", "killed", max_retries)))
    driver = subprocess.Popen([str(BIN / "w2s-ray"), "labels", str(cfg_file)], env={**env, "RAY_ADDRESS": address},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run = tmp_path / "runs" / "killed"
    try:
        deadline = time.time() + 240
        while not any(p["node"] == second for p in packs_on_disk(run)):
            assert driver.poll() is None, driver.stdout.read()[-3000:]
            assert time.time() < deadline, "no pack finished on the second node"
            time.sleep(0.05)
        kill_session(worker_sid, signals=(signal.SIGKILL,), wait=0.5)  # the node dies: raylet, object store, workers
        assert not session_members(worker_sid)
        on_disk = packs_on_disk(run)
        before_kill = {p["pack"] for p in on_disk}
        nodes_before_kill = {p["node"] for p in on_disk}
        log, _ = driver.communicate(timeout=300)
        assert driver.returncode == 0, log[-3000:]
    finally:  # a failed assertion must not leave the driver running
        if driver.poll() is None:
            driver.kill()
            driver.wait()

    # what Ray's object stores (on the nodes still alive) created for the whole run: objects
    # under 100 KB travel inline, so a pack's `[4, 700, 10]` predictions (112 KB) would be here
    out = subprocess.run([sys.executable, "-c", STORE_CREATED, address], env=env, capture_output=True, text=True, timeout=120)
    n_objects, n_bytes = map(int, out.stdout.split()[-2:])
    assert n_bytes < 100_000, (n_objects, n_bytes)

    packs = packs_on_disk(run)
    after_kill = [p for p in packs if p["pack"] not in before_kill]
    assert after_kill, "the run had finished before the node died; nothing was tested"
    # the actors were spread over both nodes, as the files said at the kill and after it: a pack
    # finished on the dead node need not keep its files, since one whose result the driver had not
    # received is trained again on the survivor, which writes it anew (seen once in a fresh clone
    # with two test workers: every pack on disk at the end named the head node)
    assert len(nodes_before_kill | {p["node"] for p in packs}) == 2, "the actors were not spread over both nodes"
    assert all(p["node"] != second for p in after_kill), "a pack finished on the dead node"
    teacher_ids = [t for p in packs for t in p["teachers"]]
    assert sorted(teacher_ids) == list(range(K)), "teachers lost or trained twice"
    if max_retries == 0:
        assert "queued again" in log  # Ray gave up on the actor; the driver queued its pack again
    else:
        # any pack, not only a new one: the pack the dead actor had written but not yet returned
        # is retried by Ray on the restarted actor, which writes it again under the same id (a
        # fresh clone's full suite, on a loaded machine, once had only that one)
        assert any(p["restarted"] for p in packs), "no pack was trained by the actor Ray restarted"

    # the same experiment, never interrupted, on the test session's Ray (`whole`)
    tdir_killed = next(run.glob("teachers/*"))
    assert tdir_killed.name == whole.teachers.dir.name
    for split in ("transfer", "test"):
        a = stack_logp(tdir_killed, split)
        b = stack_logp(whole.teachers.dir, split)
        assert a.shape == b.shape == (K, *a.shape[1:])
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    post_killed = json.loads(next(run.glob("labels/*/posterior.json")).read_text())
    post_whole = json.loads((whole.labels.dir / "posterior.json").read_text())
    assert post_killed.keys() == post_whole.keys()
    for key, value in post_whole.items():
        np.testing.assert_allclose(np.asarray(post_killed[key], dtype=float), np.asarray(value, dtype=float), rtol=1e-6, atol=1e-9, err_msg=key)


def stack_logp(tdir, split: str) -> np.ndarray:
    """All teachers' log-probs, ordered by teacher id, whatever packs they came in."""
    ids, logps = [], []
    for f in sorted((tdir / "packs").glob("pack-*.parquet")):
        i, lp = read_pack_logp(tdir, split, int(f.stem.split("-")[1]))
        ids.append(i)
        logps.append(lp)
    ids = np.concatenate(ids)
    return np.concatenate(logps)[np.argsort(ids)]


DRIVER = """
import os, sys, time
import ray

ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR")

@ray.remote
def spin():
    while True:
        time.sleep(0.1)

spin.remote()
print("ready", flush=True)
time.sleep(600)
"""


@pytest.mark.cluster
def test_what_a_killed_driver_left_of_its_embedded_ray_is_ended_before_the_next_starts():
    """A driver SIGKILLed with an embedded Ray leaves its agents and workers running with init
    as their parent for a minute or two (measured); the next embedded start ends them, and only
    them."""
    from w2s_ray.raytools import end_orphans, orphans

    before = set(orphans())
    proc = subprocess.Popen([sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert proc.stdout.readline().strip() == "ready"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    left: set[int] = set()
    for _ in range(100):  # its raylet goes with it; its agents are reparented to init
        left = set(orphans()) - before
        if left:
            break
        time.sleep(0.1)
    assert left, "the killed driver left no orphaned Ray process to end (Ray changed?)"
    # the suite runs in two workers (conftest.py): another test's `w2s-ray` may start its Ray
    # now and end them first, with this same function; either way none may be left
    end_orphans()
    assert not left & set(orphans())
