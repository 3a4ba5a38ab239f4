"""End to end on a real local Ray (2 CPUs): real Parquet, real actors, real Ray Data, the same
bits as the stages in this process (`test_stages.py` tests their file logic there), Ctrl-C,
two runs at once, placement."""

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from conftest import run_dir, small_config
from w2s_ray import artifacts
from w2s_ray.executor import InProcess
from w2s_ray.labels import iter_label_batches
from w2s_ray.labelfiles import LabelSource
from w2s_ray.pipeline import run_pipeline

pytestmark = pytest.mark.slow


def labels_of(cfg, st):
    """The pseudo-labels as a student task reads them (pyarrow, in its worker)."""
    return LabelSource(run_dir(cfg), st.labels.dir, st.data.splits.path("transfer")).read()


@pytest.fixture(scope="module")
def finished(ray_session, tmp_path_factory):
    """The small pipeline from nothing, on Ray."""
    cfg = small_config(tmp_path_factory.mktemp("e2e"))
    st = run_pipeline(cfg)
    return cfg, st


def same_contents(a, b) -> list[str]:
    """The files under `a` whose contents differ from `b`'s namesake: Parquet tables column by
    column (less the wall-clock and node columns), weights tensor by tensor, other files byte
    for byte (`torch.save` names its archive after the file, so a weights file's bytes differ)."""
    differ = []
    for f in sorted(p for p in a.rglob("*") if p.is_file() and ".lock" not in p.name):
        g = b / f.relative_to(a)
        if f.suffix == ".parquet":
            ta, tb = pq.read_table(f), pq.read_table(g)
            ok = ta.column_names == tb.column_names and all(ta[c].equals(tb[c]) for c in ta.column_names if c not in ("seconds", "node"))
        elif f.suffix == ".pt":
            wa, wb = torch.load(f), torch.load(g)
            ok = wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
        elif f.name in ("manifest.json", "metrics.json") or f.parent.name == artifacts.SEALS:
            continue  # times, paths and checksums of the files compared above
        else:
            ok = f.read_bytes() == g.read_bytes()
        if not ok:
            differ.append(str(f.relative_to(a)))
    return differ


def test_the_stages_in_this_process_write_what_ray_writes(finished, tmp_path):
    """`executor.InProcess` runs the stage code that Ray runs, in this process: every stage
    file (splits, teacher packs, sums, pseudo-label parts, students' predictions and weights) and
    the report's rows are the same bits, so the fast tests of the file logic test the Ray run's."""
    cfg, st = finished
    local = small_config(tmp_path)
    lst = run_pipeline(local, executor=InProcess())
    ray_run, here = run_dir(cfg).path, run_dir(local).path
    for stage in ("data", "teachers", "labels", "student", "ceiling"):
        assert (ray_run / stage).is_dir() and same_contents(ray_run / stage, here / stage) == [], stage
    assert lst.labels.posterior == st.labels.posterior
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert drop(lst.results["rows"]) == drop(st.results["rows"])


def test_labels_round_trip_through_ray_data_and_have_no_gold(finished):
    cfg, st = finished
    manifest = artifacts.read_manifest(st.labels.dir)
    assert manifest["rows"] == cfg.data.n_transfer and manifest["k"] == cfg.teachers.k
    assert "y" not in manifest["schema"]
    df = pd.read_parquet(st.labels.dir / "parts")  # readable with plain pandas
    assert len(df) == cfg.data.n_transfer
    labels = labels_of(cfg, st)
    assert torch.equal(labels["id"], torch.tensor(st.data.splits["transfer"].ids))
    assert torch.allclose(labels["t_dual"].sum(-1), torch.ones(len(df)), atol=1e-4)
    assert (labels["variance"] >= 0).all()
    # the Ray Data stream (Ray Train students) gives the same rows
    stream = list(iter_label_batches(run_dir(cfg), st.labels.dir, batch_size=256))
    streamed = {name: torch.cat([b[name] for b in stream]) for name in labels}
    order = torch.argsort(streamed["id"])
    assert all(torch.equal(streamed[name][order], labels[name]) for name in labels)


def test_ctrl_c_stops_with_one_line_and_exit_130(warm, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    import yaml

    warm(tmp_path)  # the data stage from the session's cache
    cfg = small_config(tmp_path, teachers={"k": 8, "epochs": 2000})  # long enough to be interrupted
    conf = tmp_path / "c.yaml"
    conf.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    proc = subprocess.Popen([sys.executable, "-m", "w2s_ray.cli", "teachers", str(conf), "--set", "ray.num_cpus=2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    try:
        for line in proc.stderr:  # wait until it trains
            if "teachers: training" in line:
                break
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends to the whole foreground group
        err = proc.stderr.read()
        assert proc.wait(timeout=120) == 130, err[-2000:]
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert "w2s-ray: interrupted" in err and "Traceback" not in err, err[-2000:]


def test_two_identical_runs_started_together_do_each_stage_once(ray_session, tmp_path):
    """The lock protocol: take the stage's lock, then check its manifest. The second run waits
    for the first (and says so), then takes what the first produced; nothing is built twice or
    removed under the other run."""
    import os
    import subprocess
    import sys

    import yaml

    cfg = small_config(tmp_path, teachers={"k": 4, "epochs": 5}, student={"epochs": 2, "seeds": 1})
    conf = tmp_path / "c.yaml"
    conf.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "disabled"}
    procs = [subprocess.Popen([sys.executable, "-m", "w2s_ray.cli", "run", str(conf)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-3000:] + outs[1][1][-3000:]
    err = outs[0][1] + outs[1][1]
    for built in ("data: building", "teachers: training", "labels: posterior over teachers", "students: training"):
        assert err.count(built) == 1, (built, err)
    assert "is being written by another run" in err and "waiting for it" in err
    assert outs[0][0] == outs[1][0]  # the same table


def test_placement_can_wait_for_a_growing_cluster_before_it_refuses(ray_session, capfd):
    """`ray.placement_wait_s`: an autoscaling cluster may add the nodes; the run says it waits,
    then refuses with the key named. Resources the cluster has pass at once."""
    from w2s_ray.errors import W2SError
    from w2s_ray.raytools import check_placeable

    with pytest.raises(W2SError, match=r"student.resources.num_gpus asks for 0.5 GPU for a task \(the cluster has 0\): it could never start after waiting 1s"):
        check_placeable({"GPU": 0.5}, {"GPU": "student.resources.num_gpus"}, wait_s=1.0, poll_s=0.2)
    assert "waiting up to 1s for the cluster to grow (ray.placement_wait_s)" in capfd.readouterr().err
    check_placeable({"CPU": 1.0}, {"CPU": "student.resources.num_cpus"}, wait_s=60.0)
    assert "waiting" not in capfd.readouterr().err
