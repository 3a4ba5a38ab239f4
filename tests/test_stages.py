"""The stages' file logic in this process (`executor.InProcess`): caching, resume, damaged files,
ensemble extension, replicates, reports, user data. The stage code is the code a Ray run
executes; `test_pipeline.py` checks on a real Ray that both executors write the same bits."""

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from conftest import run_dir, small_config
from w2s_ray import artifacts
from w2s_ray.config import ExperimentConfig, StageKeys, load_config
from w2s_ray.executor import InProcess
from w2s_ray.labels import stage_labels
from w2s_ray.labelfiles import LabelSource
from w2s_ray.pipeline import run_pipeline as run_on
from w2s_ray.posterior import dual_mean_log
from w2s_ray.run import RunContext
from w2s_ray.packfiles import read_pack_logp


def run_pipeline(cfg, until="report"):
    """The pipeline with its work in this process."""
    return run_on(cfg, until, executor=InProcess())


def labels_of(cfg, st):
    """The pseudo-labels as a student task reads them (pyarrow, in its worker)."""
    return LabelSource(run_dir(cfg), st.labels.dir, st.data.splits.path("transfer")).read()


@pytest.fixture(scope="module")
def finished(warm, tmp_path_factory):
    cfg = warm(tmp_path_factory.mktemp("e2e"))  # data, teachers, labels and students from the session's build
    st = run_pipeline(cfg)
    return cfg, st


def test_outputs_exist_and_are_consistent(finished):
    cfg, st = finished
    run = run_dir(cfg).path
    for f in ("config.yaml", "results.json", "results.parquet", "summary.png"):
        assert (run / f).is_file(), f
    events = list((run / "tensorboard").glob("*/events.out.tfevents.*"))
    assert len(events) == 1  # one TensorBoard run per experiment config
    results = json.loads((run / "results.json").read_text())
    names = [r["model"] for r in results["rows"]]
    assert "ensemble: dual mean" in names and "student on dual_mean" in names and "ceiling: student on gold labels" in names
    teachers = pd.read_parquet(st.teachers.dir / "teachers.parquet")
    assert sorted(teachers["teacher_id"]) == list(range(cfg.teachers.k))
    assert teachers["seed"].nunique() == cfg.teachers.k
    assert teachers["acc_test"].mean() > 0.15 and (teachers["acc_test"] <= 1).all()  # chance is 0.1
    assert [r["role"] for r in results["rows"]] == ["teachers", "teacher", "ensemble", "ensemble", "student", "student", "student", "ceiling"]
    for d in (st.data.dir, st.teachers.dir, st.labels.dir):
        assert artifacts.read_manifest(d) is not None, d


def test_labels_equal_a_batch_recomputation_from_the_teacher_predictions(finished):
    cfg, st = finished
    tm = artifacts.read_manifest(st.teachers.dir)
    logps = [read_pack_logp(st.teachers.dir, "transfer", p)[1] for p in tm["packs"]]
    logp = torch.from_numpy(np.concatenate(logps))
    assert logp.shape[0] == cfg.teachers.k
    labels = labels_of(cfg, st)
    assert torch.allclose(labels["logt_dual"], dual_mean_log(logp.double()).float(), atol=1e-5)


def test_rerun_uses_the_cache_and_a_student_change_keeps_teachers(finished, capfd):
    cfg, st = finished
    mtime = (st.teachers.dir / "teachers.parquet").stat().st_mtime_ns
    run_pipeline(cfg, until="labels")
    err = capfd.readouterr().err
    assert "teachers: cached" in err and "labels: cached" in err
    changed = cfg.model_copy(update={"student": cfg.student.model_copy(update={"rce_weight": 0.5, "targets": ["dual_mean"], "ceiling": False})})
    st2 = run_pipeline(changed)
    assert st2.teachers.dir == st.teachers.dir and st2.labels.dir == st.labels.dir
    assert (st.teachers.dir / "teachers.parquet").stat().st_mtime_ns == mtime
    assert "students: training 1 mlp students" in capfd.readouterr().err  # the λ = 0.5 student alone (no ceiling asked)
    # both configs keep their own report; the run's top level shows the last one
    run = run_dir(cfg).path
    reports = {d.name: load_config(d / "config.yaml") for d in (run / "report").iterdir()}
    assert len(reports) == 2 and {c.student.rce_weight for c in reports.values()} == {0.0, 0.5}
    for d in (run / "report").iterdir():
        assert artifacts.read_manifest(d) is not None and json.loads((d / "results.json").read_text())["config"]["student"]["rce_weight"] == reports[d.name].student.rce_weight
    assert json.loads((run / "results.json").read_text())["config"]["student"]["rce_weight"] == 0.5


def test_interrupted_teacher_stage_resumes_only_missing_packs(warm, tmp_path, capfd):
    warm(tmp_path)  # the data stage from the session's cache
    cfg = small_config(tmp_path, teachers={"k": 6, "epochs": 3, "resources": {"num_actors": 2, "max_pack_size": 2}, "model": {"name": "mlp", "width": 8}})
    st = run_pipeline(cfg, until="labels")
    full = labels_of(cfg, st)
    # simulate a crash after two of three packs: drop the last pack and the stage manifest
    (st.teachers.dir / "manifest.json").unlink()
    last = sorted((st.teachers.dir / "packs").glob("pack-*.parquet"))[-1]
    kept = set(pq.read_table(last)["teacher_id"].to_pylist())
    last.unlink()
    st.labels.dir.joinpath("manifest.json").unlink()
    capfd.readouterr()
    st2 = run_pipeline(cfg, until="labels")
    err = capfd.readouterr().err
    assert f"{cfg.teachers.k - len(kept)}/{cfg.teachers.k}" in err  # progress started from the packs on disk
    resumed = labels_of(cfg, st2)
    for key in ("t_dual", "t_arith", "variance"):
        assert torch.allclose(full[key], resumed[key], atol=1e-6), key


def test_labels_rewrite_overwrites(finished):
    cfg, st = finished
    n_files = len(list((st.labels.dir / "parts").glob("*.parquet")))
    (st.labels.dir / "manifest.json").unlink()
    with RunContext.open(cfg, InProcess()) as ctx:  # the labels stage alone, on the cached data and teachers
        stage_labels(ctx, st.data, st.teachers)
    assert len(list((st.labels.dir / "parts").glob("*.parquet"))) == n_files
    assert len(pd.read_parquet(st.labels.dir / "parts")) == cfg.data.n_transfer


def test_parquet_source_end_to_end(tmp_path):
    import pyarrow as pa

    rng = np.random.default_rng(0)
    n, d = 600, 8
    y = rng.integers(0, 3, n)
    x = rng.normal(size=(n, d)).astype(np.float32) + y[:, None]
    names = np.array(["cat", "ant", "bee"])[y]  # string labels: classes in sorted order, ant = 0
    pq.write_table(pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), d), "label": names}), tmp_path / "u.parquet")
    cfg = small_config(
        tmp_path,
        data={"source": "parquet", "path": str(tmp_path / "u.parquet"), "label_column": "label", "n_weak": 100, "n_transfer": 250, "n_test": 200},
        student={"targets": ["dual_mean"], "ceiling": False, "epochs": 40, "batch_size": 32},
    )
    st = run_pipeline(cfg)
    assert st.data.n_classes == 3 and st.data.in_dim == d
    assert st.students.students["dual_mean"].test_acc > 0.5
    assert st.data.classes == ["ant", "bee", "cat"] and st.results["classes"] == ["ant", "bee", "cat"]
    manifest = artifacts.read_manifest(st.data.dir)
    assert manifest["classes"] == ["ant", "bee", "cat"] and len(manifest["standardize"]["mean"]) == d


def test_extending_an_ensemble_equals_training_it_at_once(warm, tmp_path, capfd):
    warm(tmp_path / "a"), warm(tmp_path / "b")  # the data stage from the session's cache
    small = small_config(tmp_path / "a", teachers={"k": 4, "epochs": 3, "model": {"name": "mlp", "width": 8}})
    st_small = run_pipeline(small, until="labels")
    bigger = small.model_copy(update={"teachers": small.teachers.model_copy(update={"k": 8})})
    capfd.readouterr()
    st_ext = run_pipeline(bigger, until="labels")
    assert "extending the 4 on disk" in capfd.readouterr().err
    assert st_ext.teachers.dir == st_small.teachers.dir  # the same ensemble, grown
    fresh = bigger.model_copy(update={"output": bigger.output.model_copy(update={"root": str(tmp_path / "b")})})
    st_fresh = run_pipeline(fresh, until="labels")
    ext, new = labels_of(bigger, st_ext), labels_of(fresh, st_fresh)
    for key in ("t_dual", "t_arith", "variance", "mutual_info"):
        assert torch.allclose(ext[key], new[key], atol=1e-6), key
    assert st_ext.labels.posterior.ci_dual == pytest.approx(st_fresh.labels.posterior.ci_dual)
    # going back to K=4 reuses the 8 on disk and gives the first labels again
    again = run_pipeline(small, until="labels")
    assert torch.allclose(labels_of(small, again)["t_dual"], labels_of(small, st_small)["t_dual"])


def test_damaged_pack_files_are_trained_again(warm, tmp_path, capfd):
    warm(tmp_path)  # the data stage from the session's cache
    cfg = small_config(tmp_path, teachers={"k": 6, "epochs": 3, "resources": {"num_actors": 2, "max_pack_size": 2}, "model": {"name": "mlp", "width": 8}})
    st = run_pipeline(cfg, until="teachers")
    before = pd.read_parquet(st.teachers.dir / "teachers.parquet").drop(columns=["seconds", "node", "pack"]).sort_values("teacher_id").reset_index(drop=True)
    meta = sorted((st.teachers.dir / "packs").glob("pack-*.parquet"))
    meta[0].write_bytes(meta[0].read_bytes()[:40])  # a truncated metadata row
    preds = st.teachers.dir / "preds" / "test" / meta[1].name
    preds.write_bytes(preds.read_bytes()[: preds.stat().st_size // 2])  # a truncated prediction file
    capfd.readouterr()
    again = run_pipeline(cfg, until="teachers")  # the manifest no longer verifies: the stage is checked pack by pack
    err = capfd.readouterr().err
    assert "pack 0 is damaged" in err and "pack 1 is damaged" in err and "2/6" in err  # one good pack kept
    after = pd.read_parquet(again.teachers.dir / "teachers.parquet").drop(columns=["seconds", "node", "pack"]).sort_values("teacher_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(before, after)
    assert artifacts.read_manifest(again.teachers.dir) is not None


def test_an_interrupted_student_stage_trains_only_the_students_it_had_not_finished(finished, tmp_path):
    """A student counts as done when its manifest is written (last): a copy of the finished run
    with two students' manifests gone (what an interrupt before they finished leaves) retrains
    those two alone, to the same evaluation; the others are not touched."""
    import shutil

    cfg, st = finished
    root = tmp_path / "copy"
    shutil.copytree(cfg.output.root, root)
    again = ExperimentConfig.model_validate({**cfg.model_dump(mode="json"), "output": {**cfg.output.model_dump(), "root": str(root)}})
    run, keys = run_dir(again).path, StageKeys(again)
    dirs = {tgt: run / "student" / keys.student(tgt) for tgt in again.student.targets} | {None: run / "ceiling" / keys.ceiling}
    gone = [dirs[None], dirs[again.student.targets[0]]]
    for d in gone:
        (d / "manifest.json").unlink()
    before = {name: (d / "metrics.json").stat().st_mtime_ns for name, d in dirs.items() if d not in gone}
    resumed = run_pipeline(again)
    after = {name: (dirs[name] / "metrics.json").stat().st_mtime_ns for name in before}
    assert after == before
    assert all((d / "manifest.json").is_file() for d in gone)
    for tgt, res in st.students.students.items():
        assert resumed.students.students[tgt].eval == res.eval, tgt
    assert resumed.students.ceiling.eval == st.students.ceiling.eval


def test_replicates_give_n_a_ci_and_paired_differences(warm, tmp_path):
    """`student.seeds: 3` with `posterior.single_teachers: [0, 1, 2]`: three seeds per target and
    ceiling, the single target's replicate i on teacher i; the report's numbers are recomputed
    here from the saved per-seed test predictions."""
    from scipy import stats

    warm(tmp_path)  # data, teachers and labels from the session's cache
    cfg = small_config(tmp_path, student={"seeds": 3, "targets": ["dual_mean", "single"]}, posterior={"single_teachers": [0, 1, 2]})
    st = run_pipeline(cfg)
    reps = st.students.replicates
    assert [r.seed for r in reps["dual_mean"]] == [0, 1, 2] and [r.teacher for r in reps["single"]] == [0, 1, 2]
    assert len(st.students.ceilings) == 3 and st.students.students["single"] is reps["single"][0]
    y = st.data.splits["test"].y
    for (tgt, i), d in st.students.dirs.items():  # what was saved gives what was reported
        acc = float((st.students.test_logp(tgt, i).argmax(-1) == y).mean())
        res = st.students.ceilings[i] if tgt is None else reps[tgt][i]
        assert acc == pytest.approx(res.test_acc, abs=1e-6), (tgt, i)  # accuracy is computed in float32
    rows = {r["model"]: r for r in st.results["rows"]}
    dual, single = rows["student on dual_mean"], rows["student on single"]
    accs = np.array([r.test_acc for r in reps["dual_mean"]])
    half = stats.t.ppf(0.975, 2) * accs.std(ddof=1) / np.sqrt(3)
    assert dual["n"] == 3 and dual["test_acc"] == pytest.approx(accs.mean()) and dual["ci"] == pytest.approx([accs.mean() - half, accs.mean() + half])
    # the single-teacher students' PGR is against their own teachers
    own = st.teachers.accuracies()[[0, 1, 2]]
    ceil = np.array([c.test_acc for c in st.students.ceilings])
    per = [(r.test_acc - w) / (c - w) if c - w > 1e-12 else np.nan for r, w, c in zip(reps["single"], own, ceil)]
    if np.isfinite(per).any():  # a replicate whose ceiling is not above its teacher has no PGR
        assert single["pgr_vs_teacher"] == pytest.approx(np.nanmean(per))
    # a different teacher gives a different student
    assert len({r.eval.agree_single_test for r in reps["single"]}) > 1 or len({r.test_acc for r in reps["single"]}) > 1
    [c] = st.results["comparisons"]
    d = np.array([a.test_acc - b.test_acc for a, b in zip(reps["dual_mean"], reps["single"])])
    assert c["comparison"] == "dual_mean − single" and c["n"] == 3 and c["mean"] == pytest.approx(d.mean())
    per_seed = pd.read_parquet(run_dir(cfg).path / "replicates.parquet")
    assert len(per_seed) == 9 and set(per_seed["target"]) == {"dual_mean", "single", "ceiling"}
    # every replicate is cached on its own key: a rerun trains nothing
    again = run_pipeline(cfg)
    assert [r.test_acc for r in again.students.replicates["single"]] == [r.test_acc for r in reps["single"]]


def test_single_teachers_must_match_the_seeds():
    from w2s_ray.config import parse_config
    from w2s_ray.errors import ConfigError

    with pytest.raises(ConfigError, match=r"posterior.single_teachers has 2 teachers for student.seeds=5"):
        parse_config({"posterior": {"single_teachers": [0, 1]}})
    with pytest.raises(ConfigError, match=r"posterior.single_teachers=\[0, 0, 1, 2, 3\]: distinct"):
        parse_config({"posterior": {"single_teachers": [0, 0, 1, 2, 3]}})


def test_teachers_on_their_own_features_and_the_student_on_its_own(warm, tmp_path):
    """The shipped two-view digits table (`configs/make_digits_views.py`): teachers read the
    16 low-resolution features, the student the 64 pixels, through the whole pipeline; a teacher
    retrained here on the low-resolution split columns matches the actor's."""
    import importlib.util

    from w2s_ray.results import Split
    from w2s_ray.workers import train_pack_local

    from pathlib import Path

    spec = importlib.util.spec_from_file_location("make_digits_views", Path(__file__).parent.parent / "configs" / "make_digits_views.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(str(tmp_path / "views.parquet"))
    cfg = small_config(
        tmp_path,
        data={"source": "parquet", "path": str(tmp_path / "views.parquet"), "features": "pixels", "teacher_features": "lowres",
              "label_column": "label", "n_weak": 200, "n_transfer": 400, "n_test": 300},
        student={"targets": ["dual_mean"], "epochs": 20},
    )
    st = run_pipeline(cfg)
    assert st.data.in_dim == 64 and st.data.teacher_dim == 16
    transfer = Split.read(st.data.splits.path("transfer"))
    assert transfer.x.shape[1] == 64 and transfer.xt.shape[1] == 16
    assert labels_of(cfg, st)["x"].shape[1] == 64  # the student's features in its labels
    splits = {name: Split.read(st.data.splits.path(name)) for name in ("weak", "transfer", "test")}
    data = {f"{k}_{name}": v for name, s in splits.items() for k, v in (("x", s.xt), ("y", s.y))}
    local = train_pack_local(data, cfg.teachers, st.data.n_classes, [0, 1, 2])
    assert np.allclose(local["acc_test"], st.teachers.accuracies()[:3])
    assert st.students.students["dual_mean"].test_acc > 0.5 and st.students.ceiling.test_acc > 0.8


def zero_middle(path, n=4096):
    """Same-size damage: n bytes in the middle of the file set to zero."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid - n // 2 : mid + n // 2] = bytes(min(n, len(data)))[: len(data[mid - n // 2 : mid + n // 2])]
    path.write_bytes(bytes(data))


def test_same_size_damage_is_found_by_checksum_and_recomputed_bit_for_bit(warm, tmp_path, capfd):
    """A damaged file that keeps its size and may still parse is not re-signed as good: a teacher's
    prediction file, a pack's sums file and a labels part, each rebuilt to the same bytes, and the
    run's results equal the reference."""
    cfg = warm(tmp_path)
    ref = run_pipeline(cfg)
    t, lab = ref.teachers.dir, ref.labels.dir
    packs = sorted((t / "packs").glob("pack-*.parquet"))
    victims = [t / "preds" / "test" / packs[0].name, t / "sums" / "transfer" / packs[-1].name, sorted((lab / "parts").glob("part-*.parquet"))[0]]
    before = {v: v.read_bytes() for v in victims}
    for v in victims:
        zero_middle(v)
        assert v.stat().st_size == len(before[v]) and v.read_bytes() != before[v]
    capfd.readouterr()
    again = run_pipeline(cfg)
    err = capfd.readouterr().err
    assert f"pack 0 is damaged (ValueError: preds/test/{packs[0].name} does not match the sha256 its writer recorded)" in err
    assert f"pack {len(packs) - 1} is damaged (ValueError: sums/transfer/{packs[-1].name} does not match the sha256" in err
    assert f"labels: part {victims[2].name} is damaged (parts/{victims[2].name} does not match the sha256" in err
    for v in victims:
        assert v.read_bytes() == before[v], v  # rebuilt bit for bit
    assert again.labels.posterior == ref.labels.posterior and again.results["rows"] == ref.results["rows"]
    assert artifacts.read_manifest(again.teachers.dir) is not None and artifacts.read_manifest(again.labels.dir) is not None
    run_pipeline(cfg)  # and now everything is cached again
    err = capfd.readouterr().err
    assert "teachers: cached" in err and "labels: cached" in err and "damaged" not in err


def test_resources_the_cluster_cannot_place_stop_the_stage_with_the_key(warm, tmp_path):
    from w2s_ray.errors import W2SError

    cfg = warm(tmp_path, until="labels")
    gpu_teachers = small_config(tmp_path, teachers={"k": 9, "resources": {"num_gpus_per_actor": 0.5}})  # K = 9: one teacher to train
    with pytest.raises(W2SError, match=r"teachers.resources.num_gpus_per_actor asks for 0.5 GPU for one teacher actor \(the cluster has 0\)"):
        run_pipeline(gpu_teachers, until="teachers")
    gpu_student = small_config(tmp_path, student={"resources": {"num_gpus": 0.5}})
    with pytest.raises(W2SError, match=r"student.resources.num_gpus asks for 0.5 GPU for one student \(the cluster has 0\)"):
        run_pipeline(gpu_student, until="student")
    many = small_config(tmp_path, student={"resources": {"num_cpus": 3}})
    with pytest.raises(W2SError, match=r"student.resources.num_cpus asks for 3 CPU"):
        run_pipeline(many, until="student")
    assert cfg.teachers.k == 8


def test_a_teacher_stage_resumed_with_another_pack_size_gives_the_same_teachers_bit_for_bit(warm, tmp_path):
    """Packs of 8, interrupted after the first; resumed with packs of at most 5 (5 and 3): every
    teacher's predictions are the bytes the uninterrupted plan gave (the pack plan follows the
    CPU count and `max_pack_size`, neither in the teacher key)."""
    from w2s_ray.packfiles import pack_files, pack_unit
    from w2s_ray.teachers import iter_pack_logp

    warm(tmp_path, until="data")
    model = {"name": "mlp", "width": 8}

    def plan(size):
        return small_config(tmp_path, teachers={"k": 16, "epochs": 3, "model": model, "resources": {"num_actors": 1, "max_pack_size": size}})

    def predictions(st):
        return {split: {int(t): lp[i].numpy() for ids, lp in iter_pack_logp(st.teachers, split) for i, t in enumerate(ids)}
                for split in ("transfer", "test")}

    st = run_pipeline(plan(8), until="labels")
    ref, ref_post = predictions(st), st.labels.posterior
    d = st.teachers.dir
    assert pd.read_parquet(d / "teachers.parquet")["pack"].value_counts().tolist() == [8, 8]
    for f in (d / "manifest.json", *pack_files(d, 1), d / artifacts.seal_name(pack_unit(1))):  # what a run killed after pack 0 leaves
        f.unlink()
    import shutil

    shutil.rmtree(st.labels.dir)
    again = run_pipeline(plan(5), until="labels")
    assert sorted(pd.read_parquet(d / "teachers.parquet")["pack"].value_counts().tolist()) == [3, 5, 8]
    got = predictions(again)
    for split in ("transfer", "test"):
        assert sorted(got[split]) == list(range(16))
        assert all(np.array_equal(got[split][t], ref[split][t]) for t in range(16)), split
    post = again.labels.posterior
    assert post.test_acc_dual == ref_post.test_acc_dual and post.variance_test == pytest.approx(ref_post.variance_test, rel=1e-12)
