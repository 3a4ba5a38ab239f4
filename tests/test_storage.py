"""Run directories in a store: `output.root` as a `file://` URI and as `s3://` on a local S3
server (moto). Every stage lands in the store, a run with an empty local copy is served from the
store without recomputing, a teacher stage resumes from the packs the store holds, pseudo-labels
are written and read by Ray Data in the store, and Tune keeps its state there."""

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pandas as pd
import pyarrow.fs as pafs
import pytest
import yaml

from conftest import run_dir, small_config
from w2s_ray import artifacts, storage
from w2s_ray.errors import ConfigError, W2SError
from w2s_ray.pipeline import run_pipeline, run_tune
from w2s_ray.pipeline import run_pipeline as run_on
from w2s_ray.space import load_space
from w2s_ray.storage import RunDir

STAGES = ("data", "teachers", "labels", "student", "ceiling")


def store_files(fs: pafs.FileSystem, base: str) -> dict[str, int]:
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    return {i.path[len(base) + 1 :]: i.size for i in infos if i.type == pafs.FileType.File}


def stage_manifests(files: dict[str, int]) -> set[str]:
    return {f.split("/")[0] for f in files if f.count("/") == 2 and f.endswith("/manifest.json")}


def check_store_matches(cfg, fs, base):
    """Every stage complete in the store, each file there byte-identical in size to its manifest."""
    files = store_files(fs, base)
    assert set(STAGES) <= stage_manifests(files), sorted(files)
    assert {"config.yaml", "results.json", "results.parquet", "summary.png"} <= set(files)
    assert not [f for f in files if f.endswith(".tmp")], "temporary files left in the store"
    assert any(f.startswith("labels/") and "/parts/" in f and f.endswith(".parquet") for f in files)
    for f in [f for f in files if f.endswith("/manifest.json") and f.count("/") == 2]:
        with fs.open_input_stream(f"{base}/{f}") as s:
            manifest = json.loads(s.read())
        stage = f.rsplit("/", 1)[0]
        for name, meta in manifest["files"].items():
            assert files.get(f"{stage}/{name}") == meta["bytes"], f"{stage}/{name}"
    return files


def test_file_uri_run_resumes_from_the_store(tmp_path, capfd, monkeypatch):
    """A run in a `file://` store, in this process (`executor.InProcess`: the store logic is the
    stage code's; the S3 test below runs on Ray): a fresh machine takes every stage from the
    store, and half a teacher stage there is resumed, not retrained."""
    from w2s_ray.executor import InProcess

    def run_pipeline(cfg, until="report"):
        return run_on(cfg, until, executor=InProcess())

    # one run here: a lease read back at once is its own (the 1 s settle is for two writers of an object store)
    monkeypatch.setattr(RunDir, "LEASE_SETTLE_S", 0.01)
    store_root = tmp_path / "store"
    cfg = small_config(tmp_path, output={"root": f"file://{store_root}", "cache": str(tmp_path / "cache"), "name": "s"})
    assert run_dir(cfg).path == tmp_path / "cache" / "file" / str(store_root).strip("/") / "s"
    first = run_pipeline(cfg)
    fs, base = pafs.LocalFileSystem(), str(store_root / "s")
    check_store_matches(cfg, fs, base)
    results = json.loads((store_root / "s" / "results.json").read_text())["rows"]

    # a fresh machine: nothing local; every stage comes from the store, nothing is retrained
    artifacts.reset_dir(tmp_path / "cache")  # the cache is not under the store: only local files go
    capfd.readouterr()
    again = run_pipeline(cfg)
    log = capfd.readouterr().err
    for stage in ("data", "teachers", "labels"):
        assert f"{stage}: cached" in log, (stage, log[-2000:])
    assert "students: 4 of 4 cached" in log and "students: training" not in log, log[-2000:]  # 3 targets + the ceiling
    assert json.loads((run_dir(cfg) / "results.json").read_text())["rows"] == results

    # the store holds half a teacher stage (an interrupted run elsewhere): only the rest is trained
    tdir = store_root / "s" / "teachers" / first.teachers.dir.name
    teachers = pd.read_parquet(tdir / "teachers.parquet").set_index("teacher_id")
    packs = sorted((tdir / "packs").glob("pack-*.parquet"))
    kept = packs[:1]
    for f in [tdir / "manifest.json", tdir / "teachers.parquet", *packs[1:]]:
        f.unlink()
    stamp = {f: f.stat().st_mtime_ns for f in kept}
    artifacts.reset_dir(tmp_path / "cache")
    capfd.readouterr()
    resumed = run_pipeline(cfg, until="teachers")
    assert "teachers: training" in capfd.readouterr().err
    assert {f: f.stat().st_mtime_ns for f in kept} == stamp, "a pack the store held was trained again"
    assert artifacts.read_manifest(tdir) is not None and artifacts.read_manifest(resumed.teachers.dir) is not None
    again = pd.read_parquet(tdir / "teachers.parquet").set_index("teacher_id")
    pd.testing.assert_series_equal(again["acc_test"], teachers["acc_test"])


@pytest.mark.slow  # the CLI gets past validation and imports the pipeline
def test_unopenable_root_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"output\.root"):
        RunDir.open("nosuchscheme://bucket/runs", "x")
    out = subprocess.run([sys.executable, "-m", "w2s_ray.cli", "run", "--set", "output.root=nosuchscheme://bucket/runs"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "output.root" in out.stderr and "Traceback" not in out.stderr


@pytest.fixture(scope="module")
def s3_root():
    moto = pytest.importorskip("moto.server")
    server = moto.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    # credentials in the URI, so Ray's workers need no environment; moto accepts any
    root = f"s3://test:test@w2s-runs/exp?endpoint_override={host}:{port}&scheme=http&region=us-east-1"
    pafs.FileSystem.from_uri(f"{root}&allow_bucket_creation=true")[0].create_dir("w2s-runs")
    fs, _ = storage.open_filesystem(root)
    yield root, fs
    server.stop()


@pytest.mark.slow
def test_s3_run_and_tune_live_in_the_bucket(ray_session, tmp_path, s3_root, monkeypatch):
    root, fs = s3_root
    monkeypatch.setattr(RunDir, "LEASE_SETTLE_S", 0.01)  # one run: see test_file_uri_run_resumes_from_the_store
    cfg = small_config(tmp_path, output={"root": root, "cache": str(tmp_path / "cache"), "name": "s3"})
    run_pipeline(cfg)
    base = "w2s-runs/exp/s3"
    check_store_matches(cfg, fs, base)

    space_file = tmp_path / "space.yaml"
    space_file.write_text(yaml.safe_dump({
        "search": "optuna", "num_samples": 2, "seed": 0, "resources": {"cpu": 1},
        "params": {"student.model.width": {"type": "choice", "values": [8, 32]}}, "confirm_seeds": 0,
    }))
    summary = run_tune(cfg, load_space(space_file, cfg), "s3tune")
    assert summary["n_trials"] == 2
    files = store_files(fs, base)
    tune_files = [f for f in files if f.startswith("tune/s3tune/")]
    for name in ("trials.parquet", "best.yaml", "summary.json", "optuna.db"):
        assert f"tune/s3tune/{name}" in files, name
    assert any(f.startswith("tune/s3tune/experiment_state") for f in tune_files), tune_files  # Tune's own state
    assert sum("/checkpoint_" in f for f in tune_files) >= 2, "trial checkpoints are not in the bucket"

    # `--resume` on a machine with nothing local: Tune restores the search from the bucket
    trials = set(pd.read_parquet(run_dir(cfg) / "tune" / "s3tune" / "trials.parquet")["trial_id"])
    shutil.rmtree(tmp_path / "cache")
    resumed = run_tune(cfg, load_space(space_file, cfg), "s3tune", resume=True)
    assert resumed["n_trials"] == 2
    assert set(pd.read_parquet(run_dir(cfg) / "tune" / "s3tune" / "trials.parquet")["trial_id"]) == trials, "the search was not restored"


@pytest.mark.slow  # the CLI gets past validation and imports the pipeline
def test_an_output_root_that_is_a_file_is_a_config_error(tmp_path):
    blocker = tmp_path / "taken"
    blocker.write_text("a file, not a directory\n")
    with pytest.raises(ConfigError, match=r"output\.root: .* is a file, not a directory"):
        RunDir.open(str(blocker), "x")
    out = subprocess.run([sys.executable, "-m", "w2s_ray.cli", "run", "--set", f"output.root={blocker}"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "output.root" in out.stderr and "Traceback" not in out.stderr


def test_a_stage_directory_is_written_by_one_run_at_a_time(tmp_path):
    run = RunDir.open(str(tmp_path), "r")
    stage = run.stage("teachers", "abc")
    with run.lock(stage, "teachers stage"):
        assert (stage.parent / ".abc.lock").read_text().endswith(f" {os.getpid()}")
        second = subprocess.run([sys.executable, "-c", (
            "import sys\nfrom pathlib import Path\nfrom w2s_ray.storage import RunDir\nfrom w2s_ray.errors import W2SError\n"
            "try:\n    with RunDir(Path(sys.argv[1]), wait=False).lock(Path(sys.argv[2]), 'teachers stage'):\n        print('taken')\n"
            "except W2SError as e:\n    print(e)\n"), str(run.path), str(stage)], capture_output=True, text=True, timeout=60)
        assert "is being written by another run" in second.stdout and str(os.getpid()) in second.stdout, second.stdout + second.stderr
    assert not (stage.parent / ".abc.lock").exists()
    # by default a second run waits for the holder, says so, and takes the lock once it is released
    waiter = subprocess.Popen([sys.executable, "-c", (
        "import sys\nfrom pathlib import Path\nfrom w2s_ray.storage import RunDir\n"
        "with RunDir(Path(sys.argv[1])).lock(Path(sys.argv[2]), 'teachers stage'):\n    print('taken', flush=True)\n"),
        str(run.path), str(stage)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with run.lock(stage, "teachers stage"):
        line = waiter.stderr.readline()  # it is waiting
        assert "is being written by another run" in line and "waiting for it" in line, line
        assert waiter.poll() is None
    out, _ = waiter.communicate(timeout=60)
    assert waiter.returncode == 0 and out == "taken\n"
    # a lock whose process is gone is taken over
    (stage.parent / ".abc.lock").write_text(f"{socket.gethostname()} 999999999")
    with run.lock(stage, "teachers stage"):
        pass


def test_a_stage_in_a_store_is_written_by_one_run_at_a_time(tmp_path, monkeypatch):
    """Two machines (two caches) on one store: the second is kept out by the lease in the store,
    a lease whose run stopped renewing it is taken over, and a released lease is gone."""
    monkeypatch.setattr(RunDir, "LEASE_S", 3.0)  # renewed every 0.75 s: a loaded CI machine may delay a renewal by a second
    monkeypatch.setattr(RunDir, "LEASE_SETTLE_S", 0.05)
    root = f"file://{tmp_path / 'store'}"
    a, b = RunDir.open(root, "r", cache=str(tmp_path / "cache-a")), RunDir.open(root, "r", cache=str(tmp_path / "cache-b"))
    lease = tmp_path / "store" / "r" / "teachers" / ".abc.lock"
    with a.lock(a.stage("teachers", "abc"), "teachers stage"):
        owner = json.loads(lease.read_text())["owner"]
        time.sleep(3.5)  # past one lease period: renewed, so still held
        with pytest.raises(W2SError, match=r"being written by another run .*lease in the store"):
            with dataclasses.replace(b, wait=False).lock(b.stage("teachers", "abc"), "teachers stage"):
                pass
        assert json.loads(lease.read_text())["owner"] == owner
    assert not lease.exists()
    lease.write_text(json.dumps({"owner": "elsewhere 1 dead", "expires": time.time() - 1}))  # a run that died
    with b.lock(b.stage("teachers", "abc"), "teachers stage"):
        assert json.loads(lease.read_text())["owner"] != "elsewhere 1 dead"


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_respect_the_umask(tmp_path, mask, mode):
    """Files are written under a temporary name (mkstemp: 0600) and renamed; the final file has
    the mode any other program would give it, so a teammate can read a shared run directory."""
    old = os.umask(mask)
    try:
        run = RunDir.open(str(tmp_path), "r")
        written = [run.write_json(run / "a.json", {"x": 1}), run.write_text(run / "b.txt", "x")]
        with run.atomic(run / "c.bin") as tmp:
            tmp.write_bytes(b"x")
        written.append(run / "c.bin")
    finally:
        os.umask(old)
    assert [oct(p.stat().st_mode & 0o777) for p in written] == [oct(mode)] * 3


def test_a_damaged_manifest_or_seal_reads_as_incomplete(tmp_path):
    """Same-size damage to the manifest or a seal themselves: the stage is incomplete, the unit
    is not kept, and nothing raises."""
    from w2s_ray import artifacts

    run = RunDir.open(str(tmp_path), "r")
    d = run.stage("labels", "abc")
    part = run.write_text(d / "parts" / "part-0.parquet", "rows")
    run.seal(d, "part-0", [part])
    run.write_manifest(d, "abc")
    assert artifacts.read_manifest(d) is not None and artifacts.check_seal(d, "part-0") is None
    for f in (d / "manifest.json", d / "seals" / "part-0.json"):
        f.write_bytes(b"\xff" * f.stat().st_size)  # not UTF-8, not JSON
    assert artifacts.read_manifest(d) is None and "damaged" in artifacts.check_seal(d, "part-0")
    run.write_json(d / "manifest.json", {"files": {"parts/part-0.parquet": {"size": 4}}})  # not a manifest's shape
    assert artifacts.read_manifest(d) is None


def test_a_manifest_holds_what_the_writer_sealed_not_what_is_on_disk_now(tmp_path):
    """`write_manifest` records a sealed file as its writer recorded it (`artifacts.sealed_files`),
    without hashing it again: a file damaged after its seal, same size or truncated, fails the
    manifest's next check instead of being signed as good, and passes once it is what its
    writer wrote. A file no seal lists is hashed. `check_seal(verify=False)` checks sizes only."""
    run = RunDir.open(str(tmp_path), "r")
    d = run.stage("labels", "abc")
    part = run.write_text(d / "parts" / "part-0.parquet", "rows of a part")
    run.seal(d, "part-0", [part])
    other = run.write_text(d / "posterior.json", "{}")
    sealed = artifacts.read_json(d / "seals" / "part-0.json")["files"]["parts/part-0.parquet"]
    part.write_text("rows of a PART")  # same size
    assert artifacts.check_seal(d, "part-0", verify=False) is None and "sha256" in artifacts.check_seal(d, "part-0")
    manifest = run.write_manifest(d, "abc")
    assert manifest["files"]["parts/part-0.parquet"] == sealed
    assert manifest["files"]["posterior.json"] == {"bytes": 2, "sha256": artifacts.sha256_file(other)}
    assert artifacts.read_manifest(d) is None
    part.write_text("rows of a part")
    assert artifacts.read_manifest(d) is not None
    part.write_text("rows")  # truncated
    run.write_manifest(d, "abc")
    assert artifacts.read_manifest(d) is None and "bytes" in artifacts.check_seal(d, "part-0", verify=False)


def test_a_stage_file_neither_here_nor_in_the_store_is_one_error_that_names_it(tmp_path):
    """`RunDir.need` / `read_table` / `read_json`: the file, fetched from the store when only the
    store has it; otherwise one error type (a W2SError, so the CLI prints it in one line) that
    names what the file is and where it was looked for."""
    import pyarrow as pa

    from w2s_ray.errors import MissingArtifact, W2SError
    from w2s_ray.storage import RunDir

    local = RunDir.open(str(tmp_path / "runs"), "r")
    with pytest.raises(MissingArtifact, match=r"the labels stage's manifest: .*manifest.json is not here, and this run has no store; on a cluster"):
        local.read_json(local.path / "labels" / "k" / "manifest.json", "the labels stage's manifest")
    assert issubclass(MissingArtifact, W2SError)
    f = local.path / "t.parquet"
    local.write_parquet(f, pa.table({"a": [1, 2]}))
    assert local.read_table(f, "a table", columns=["a"])["a"].to_pylist() == [1, 2]
    remote = RunDir.open(f"file://{tmp_path / 'store'}", "r", cache=str(tmp_path / "cache"))
    remote.write_json(remote.path / "x.json", {"v": 1})  # written here and published to the store
    (remote.path / "x.json").unlink()  # as on a node that did not write it
    assert remote.read_json(remote.path / "x.json", "x") == {"v": 1}
    with pytest.raises(MissingArtifact, match=r"y: .*y.json is neither here nor in the run's store; rerun the stage"):
        remote.need(remote.path / "y.json", "y")
    assert json.loads((remote.path / "x.json").read_text()) == {"v": 1}  # fetched into the local cache


def test_many_store_leases_are_taken_with_one_settle_and_all_or_none(tmp_path, monkeypatch):
    """The student stage holds a lease per student: they are written together and read back
    after one settle (a settle each cost a default run 20 s on a store). A run that finds any
    of them held by another machine takes none: it neither keeps the ones it could have had
    nor leaves a lease of its own behind."""
    import w2s_ray.storage as storage

    monkeypatch.setattr(RunDir, "LEASE_SETTLE_S", 0.05)
    settles = []
    real_sleep = time.sleep
    monkeypatch.setattr(storage.time, "sleep", lambda s: (settles.append(s) if s == RunDir.LEASE_SETTLE_S else None, real_sleep(s))[1])
    root = f"file://{tmp_path / 'store'}"
    a, b = RunDir.open(root, "r", cache=str(tmp_path / "cache-a")), RunDir.open(root, "r", cache=str(tmp_path / "cache-b"))
    leases = lambda names: [tmp_path / "store" / "r" / "student" / f".{n}.lock" for n in names]  # noqa: E731
    with a.locks([a.stage("student", f"s{i}") for i in range(20)], "student"):
        assert settles == [0.05] and all(p.exists() for p in leases(f"s{i}" for i in range(20)))
        owner = json.loads(leases(["s7"])[0].read_text())["owner"]
        with pytest.raises(W2SError, match=r"student .*s7 is being written by another run .*lease in the store"):
            with dataclasses.replace(b, wait=False).locks([b.stage("student", n) for n in ("s7", "t1", "t2")], "student"):
                pass
        assert not any(p.exists() for p in leases(["t1", "t2"])), "the refused run left leases behind"
        assert json.loads(leases(["s7"])[0].read_text())["owner"] == owner
    assert not any(p.exists() for p in leases(f"s{i}" for i in range(20)))
    with b.locks([b.stage("student", n) for n in ("s7", "t1")], "student"):  # released: the other machine takes them
        assert all(p.exists() for p in leases(["s7", "t1"]))


def test_a_run_that_loses_one_lease_race_gives_back_the_ones_it_won(tmp_path, monkeypatch):
    """Two machines write leases at once; the last writer keeps each. A run that lost any gives
    back those it won, so two runs cannot each hold a part of one stage's set."""
    import w2s_ray.storage as storage

    monkeypatch.setattr(RunDir, "LEASE_SETTLE_S", 0.05)
    root = f"file://{tmp_path / 'store'}"
    b = dataclasses.replace(RunDir.open(root, "r", cache=str(tmp_path / "cache-b")), wait=False)
    t1, t2 = (tmp_path / "store" / "r" / "student" / f".{n}.lock" for n in ("t1", "t2"))
    real_sleep = time.sleep

    def settle(s):  # during the settle, another machine writes t2's lease after this run did
        if s == RunDir.LEASE_SETTLE_S:
            t2.write_text(json.dumps({"owner": "elsewhere 1 abc", "expires": time.time() + 60}))
        real_sleep(s)

    monkeypatch.setattr(storage.time, "sleep", settle)
    with pytest.raises(W2SError, match=r"t2 is being written by another run \(elsewhere 1 abc"):
        with b.locks([b.stage("student", n) for n in ("t1", "t2")], "student"):
            pass
    assert not t1.exists() and json.loads(t2.read_text())["owner"] == "elsewhere 1 abc"
