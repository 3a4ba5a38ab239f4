"""The data plane: pack workers write their own files and return metadata; the posterior is a
sum of per-pack sums; `teachers.keep_predictions` decides which predictions exist on disk."""

import gc
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from conftest import run_dir, small_config

from w2s_ray import labels as labels_mod
from w2s_ray import packfiles
from w2s_ray.config import ExperimentConfig, parse_config
from w2s_ray.errors import ConfigError, W2SError
from w2s_ray.pipeline import run_pipeline, run_tune
from w2s_ray.posterior import PosteriorAccumulator
from w2s_ray.results import TeacherStage
from w2s_ray.run import RunContext
from w2s_ray.space import load_space
from w2s_ray.packfiles import pack_path, read_pack_logp, sums_path
from w2s_ray.teachers import iter_pack_logp
from w2s_ray.labelfiles import LabelSource
from w2s_ray.labels import read_test_posterior
from w2s_ray.student.ray_train import fit_student
from w2s_ray.student.recipe import StudentJob, TestSplit
from w2s_ray.workers import PackTrainer, student_task


def posterior(cfg):
    st = run_pipeline(cfg, until="labels")
    return st, json.loads((st.labels.dir / "posterior.json").read_text())


@pytest.fixture(scope="module")
def kept(ray_session, tmp_path_factory):
    cfg = small_config(tmp_path_factory.mktemp("all"), teachers={"k": 12, "epochs": 20, "model": {"name": "mlp", "width": 16}, "resources": {"max_pack_size": 3}})
    return cfg, *posterior(cfg)


@pytest.mark.slow
def test_a_pack_worker_writes_its_files_and_returns_only_metadata(ray_session, warm, tmp_path):
    cfg = warm(tmp_path)
    st = run_pipeline(cfg, until="data")
    run, stage = run_dir(cfg), tmp_path / "stage"
    # the actor reads the splits from the data stage's files: only their directory crosses
    out = ray_session.get(ray_session.remote(PackTrainer).remote(1).train.remote(st.data.dir, cfg.teachers.model_dump(mode="json"), st.data.n_classes, 0, [0, 1, 2], run, stage))
    # what crossed to the driver: ids, seeds, accuracies, timings; no arrays
    assert len(pickle.dumps(out)) < 2048 and not any(isinstance(v, np.ndarray) for v in out.values())
    n = st.data.sizes["transfer"]
    assert pq.read_metadata(pack_path(stage, "transfer", 0)).num_rows == 3 * n
    # every column of a prediction file declared without nulls (`packfiles.preds_table`)
    schema = pq.read_schema(pack_path(stage, "transfer", 0))
    assert not any(f.nullable for f in schema) and not schema.field("logp").type.value_field.nullable
    assert pq.read_metadata(sums_path(stage, "transfer", 0)).num_rows == n


@pytest.mark.slow
def test_a_pack_actor_freezes_what_it_imported_and_an_in_process_trainer_does_not(ray_session):
    class Probe(PackTrainer):  # defined here: Ray ships it by value, with PackTrainer by reference
        def frozen(self) -> int:
            return gc.get_freeze_count()

    # the actor's imports (Ray, torch, pyarrow) are out of the collector's sight
    assert ray_session.get(ray_session.remote(Probe).remote(1).frozen.remote()) > 50_000  # about 220,000 measured
    # in this process (an in-process "actor", as `executor.InProcess` makes) nothing is frozen
    before = gc.get_freeze_count()
    assert Probe(1).frozen() == before


@pytest.mark.slow
def test_the_posterior_from_pack_sums_equals_the_one_from_predictions(kept):
    """Four packs of 3 teachers: the stored sums merged equal an accumulator fed every
    teacher's predictions, and the single teacher's rows are the predictions'."""
    cfg, st, _ = kept
    for split in ("transfer", "test"):
        ref = PosteriorAccumulator(len(st.data.splits[split].y), st.data.n_classes)
        for ids, logp in iter_pack_logp(st.teachers, split):
            ref.add(logp, ids.tolist())
        got = packfiles.split_posterior(st.teachers, split, ref.n, ref.c)
        assert got.k == ref.k == cfg.teachers.k
        for name, t in ref.sums().items():
            assert torch.equal(got.sums()[name], t), name
        assert torch.equal(packfiles.single_teacher(st.teachers, split, 0), torch.from_numpy(read_pack_logp(st.teachers.dir, split, 0)[1][0].copy()))


@pytest.mark.slow
def test_a_smaller_k_than_the_stage_holds_reads_the_straddling_pack(kept):
    cfg, st, _ = kept
    part = TeacherStage(st.teachers.dir, 10, st.teachers.packs)  # packs [0-2] [3-5] [6-8] [9-11]
    n = len(st.data.splits["test"].y)
    ref = PosteriorAccumulator(n, st.data.n_classes)
    for ids, logp in iter_pack_logp(part, "test"):
        ref.add(logp, ids.tolist())
    got = packfiles.split_posterior(part, "test", n, st.data.n_classes)
    assert got.k == ref.k == 10
    assert all(torch.allclose(got.sums()[k], t, rtol=1e-12) for k, t in ref.sums().items())


@pytest.mark.slow
def test_bootstrap_counts_by_row_blocks_and_teacher_groups_equal_one_block_in_process_or_in_ray_tasks(kept, monkeypatch):
    cfg, st, post = kept
    y = st.data.splits["test"].y
    whole = labels_mod.bootstrap_ci(st.teachers, y, st.data.n_classes, cfg.posterior.n_boot, cfg.teachers.seed, cfg.posterior.ci)
    assert whole == {"dual": post["ci_dual"], "arith": post["ci_arith"]}
    monkeypatch.setattr(labels_mod, "BOOT_BLOCK_BYTES", 2 * 4 * cfg.posterior.n_boot * st.data.n_classes * 37)  # blocks of 37 rows
    monkeypatch.setattr(labels_mod, "BOOT_TEACHERS", 2)  # packs of 3 read as 2 + 1 teachers
    blocked = labels_mod.bootstrap_ci(st.teachers, y, st.data.n_classes, cfg.posterior.n_boot, cfg.teachers.seed, cfg.posterior.ci)
    for name in whole:
        # float32 sums in another order: a replicate may flip a near-tie, moving a bound by 1/N
        assert np.allclose(blocked[name], whole[name], atol=1 / len(y) + 1e-9), name
    # the same blocks as Ray tasks (what the labels stage does): the same counts, so the same CIs
    with RunContext.open(cfg) as ctx:
        ctx.ray()
        assert labels_mod.bootstrap_ci(st.teachers, y, st.data.n_classes, cfg.posterior.n_boot, cfg.teachers.seed, cfg.posterior.ci, ctx) == blocked


@pytest.mark.slow
@pytest.mark.parametrize("keep", ["none", "float16"])
def test_keep_predictions_changes_the_files_not_the_posterior(kept, tmp_path, keep):
    cfg, st_all, post_all = kept
    cfg2 = ExperimentConfig.model_validate(
        {**cfg.model_dump(mode="json"), "teachers": {**cfg.teachers.model_dump(mode="json"), "keep_predictions": keep}})
    st, post = posterior(cfg2)
    assert st.teachers.dir != st_all.teachers.dir  # another stage directory: its files differ
    exact = ["k", "test_acc_dual", "test_acc_arith", "test_acc_single", "variance_test", "variance_transfer", "mutual_info_test"]
    assert {k: post[k] for k in exact} == {k: post_all[k] for k in exact}
    size = lambda d, split: sum(f.stat().st_size for f in (d / "preds" / split).glob("*.parquet"))
    assert size(st.teachers.dir, "transfer") < 0.7 * size(st_all.teachers.dir, "transfer")
    if keep == "none":
        assert post["ci_dual"] == post_all["ci_dual"]  # test predictions are kept
        with pytest.raises(W2SError, match="keep_predictions: none"):
            list(iter_pack_logp(st.teachers, "transfer"))
        # a stage used with a smaller K whose last pack straddles it needs that pack's predictions
        with pytest.raises(W2SError, match="straddles teachers.k=10"):
            packfiles.split_posterior(TeacherStage(st.teachers.dir, 10, st.teachers.packs), "transfer", len(st.data.splits["transfer"].y), st.data.n_classes)
    else:
        assert np.allclose(post["ci_dual"], post_all["ci_dual"], atol=0.01)


def test_keep_predictions_none_needs_a_kept_single_teacher():
    with pytest.raises(ConfigError, match="posterior.single_teacher=9: with teachers.keep_predictions='none'"):
        parse_config({"teachers": {"k": 16, "keep_predictions": "none"}, "posterior": {"single_teacher": 9}})


@pytest.mark.slow
def test_a_student_across_two_workers_in_a_run_and_in_a_tune_trial(kept, tmp_path, capfd):
    """`student.workers: 2`: Ray Train (DDP, gloo) on the label stream; same held-out rows, a
    global batch of the same size; its accuracy within 0.05 of the single-process student's.
    The same through `w2s-ray tune`: the search's baseline student (the run's student stage) and
    then one trial, whose Ray Train run holds the space's resources per worker (the trial itself
    holds no CPU, so 2 workers fit 2 CPUs); every epoch reaches Tune through the Train→Tune
    callback, and the final report carries the metrics. One search point: a Ray Train run starts
    in about 30 s on 2 CPUs, so a second point would only cost time."""
    cfg, st, _ = kept
    student = {**cfg.student.model_dump(mode="json"), "targets": ["dual_mean"], "ceiling": False, "epochs": 4}
    one = run_pipeline(ExperimentConfig.model_validate({**cfg.model_dump(mode="json"), "student": student}), until="student")
    cfg2 = ExperimentConfig.model_validate({**cfg.model_dump(mode="json"), "student": {**student, "workers": 2}})
    f = tmp_path / "grid.yaml"
    f.write_text("search: grid\nscheduler: {type: none}\nresources: {cpu: 1}\nconfirm_seeds: 0\n"
                 "params: {student.rce_weight: {type: grid, values: [0.5]}}\n")
    capfd.readouterr()
    summary = run_tune(cfg2, load_space(f, cfg2), "ddp")
    assert "student[dual_mean]: across 2 Ray Train workers" in capfd.readouterr().err
    two = run_pipeline(cfg2, until="student")  # the search's student stage, from the cache
    a, b = one.students.students["dual_mean"], two.students.students["dual_mean"]
    assert b.epochs_run == 4 and abs(a.test_acc - b.test_acc) <= 0.05, (a.test_acc, b.test_acc)
    # the student tasks read their labels themselves: the driver never read the transfer split
    assert "transfer" not in one.data.splits.loaded() and "transfer" not in two.data.splits.loaded()
    # a different cache entry: the students differ, so do their keys
    assert len(list((run_dir(cfg).path / "student").iterdir())) >= 2

    d = run_dir(cfg2).path / "tune" / "ddp"
    table = pd.read_parquet(d / "trials.parquet")
    assert len(table) == 1 == summary["n_trials"] and (table["status"] == "TERMINATED").all(), table
    row = table.iloc[0]
    assert row["student.rce_weight"] == 0.5 and 0 < row["test_acc"] <= 1 and row["epoch"] == 4 and np.isfinite(row["val_teacher_ce"])
    epochs = [json.loads(line)["epoch"] for line in Path(row["path"], "result.json").read_text().splitlines()]
    assert epochs[:4] == [1, 2, 3, 4], epochs  # one report per epoch from the workers, then the final ones
    assert (d / "train" / row["trial_id"] / "student-dual_mean").is_dir(), "no Ray Train run inside the trial"


@pytest.mark.parametrize("param", ["student.workers", "student.resources.num_cpus"])
def test_a_search_cannot_vary_what_a_trial_holds(tmp_path, param):
    f = tmp_path / "s.yaml"
    f.write_text(f"search: grid\nparams: {{{param}: {{type: grid, values: [1, 2]}}}}\n")
    with pytest.raises(ConfigError, match=f"parameter '{param}' cannot be searched"):
        load_space(f, parse_config({}))


def test_workers_above_one_refuse_what_the_stream_cannot_give():
    with pytest.raises(ConfigError, match="student.workers > 1 with student.input: stream needs student.selection: teacher"):
        parse_config({"student": {"workers": 2, "selection": "oracle"}})
    with pytest.raises(ConfigError, match="student.input: stream: student.adaptive_quantile is a quantile over every training row"):
        parse_config({"student": {"workers": 2, "adaptive_quantile": 0.5}})
    # in memory every worker holds every row: every selection rule and the quantile work
    parse_config({"student": {"workers": 2, "input": "memory", "selection": "oracle", "adaptive_quantile": 0.5}})


@pytest.mark.slow
def test_one_loop_the_student_task_and_the_ray_train_world_at_size_one_take_the_same_steps(ray_session, kept, tmp_path):
    """The student task (`workers: 1`) and a Ray Train worker (`input: memory`, world size 1)
    run the one loop (`student.core.fit`) on the same batches: the same held-out scores and
    teacher CE every epoch, bit for bit, the same selected epoch and the same weights. With a
    reverse-CE warm-up both score the held-out slice at the full λ (the two loops used to differ
    there), and the augmentation draws come from the same generator."""
    cfg, st, _ = kept
    scfg = cfg.student.model_copy(update={"epochs": 4, "patience": 2, "rce_weight": 0.5, "rce_warmup": 0.5, "augment_shift": 3, "input": "memory"})
    post = read_test_posterior(st.labels.dir)
    test = TestSplit(torch.tensor(st.data.splits["test"].x), torch.tensor(st.data.splits["test"].y), post["dual_log"], post["single_log"])
    job = StudentJob(scfg, "dual_mean", LabelSource(run_dir(cfg), st.labels.dir, st.data.splits.path("transfer")), st.data.n_classes)
    task = ray_session.get(ray_session.remote(student_task).remote(job, test))
    train = fit_student(job, st.data.in_dim, tmp_path / "train")
    scores = [(h["epoch"], h["holdout_loss"], h["val_teacher_ce"]) for h in task.result.history]
    assert scores == [(h["epoch"], h["holdout_loss"], h["val_teacher_ce"]) for h in train.history]
    assert task.result.best_epoch == train.best_epoch and task.result.epochs_run == train.epochs_run
    assert all(torch.equal(task.state_dict[k], train.state_dict[k]) for k in task.state_dict)


@pytest.mark.slow
def test_label_blocks_equal_one_block_and_an_interrupted_labels_stage_keeps_its_parts(kept, tmp_path):
    """Blocks of 100 rows in Ray tasks give the one-block table bit for bit; after an interrupt
    (manifest and two parts gone) a rerun rebuilds those two alone, identical, and the stage's
    posterior.json is the same."""
    cfg, st, _ = kept
    whole = pq.read_table(st.labels.dir / "parts")
    root = tmp_path / "copy"
    shutil.copytree(cfg.output.root, root)
    small = ExperimentConfig.model_validate({**cfg.model_dump(mode="json"), "labels": {"rows_per_file": 100}, "output": {**cfg.output.model_dump(), "root": str(root)}})
    d = run_dir(small).path / st.labels.dir.relative_to(run_dir(cfg).path)
    (d / "manifest.json").unlink()
    blocks = run_pipeline(small, until="labels")
    parts = sorted((d / "parts").glob("*.parquet"))
    assert [p.name for p in parts] == [f"part-{r:012d}.parquet" for r in range(0, st.data.sizes["transfer"], 100)]
    assert pq.read_table(d / "parts").equals(whole)
    before = {p.name: p.stat().st_mtime_ns for p in parts}
    posterior = (d / "posterior.json").read_text()
    (d / "manifest.json").unlink()
    for gone in parts[2:4]:
        gone.unlink()
    again = run_pipeline(small, until="labels")
    after = {p.name: p.stat().st_mtime_ns for p in sorted((d / "parts").glob("*.parquet"))}
    assert {n for n in after if after[n] != before[n]} == {p.name for p in parts[2:4]}
    assert pq.read_table(d / "parts").equals(whole) and (d / "posterior.json").read_text() == posterior
    assert again.labels.posterior == blocks.labels.posterior


@pytest.mark.parametrize("teacher_features", [False, True])
def test_a_split_read_span_by_span_is_its_teacher_features(tmp_path, teacher_features):
    """Pack workers predict the transfer split span by span (`Split.spans`): the spans are the
    whole split's teacher features (`xt` when the teachers have their own, else `x`), in order."""
    from w2s_ray import artifacts
    from w2s_ray.results import Split

    rng = np.random.default_rng(0)
    n = 150_000
    split = Split(ids=np.arange(n), x=rng.random((n, 3), dtype=np.float32), y=np.zeros(n, dtype=np.int64),
                  xt=rng.random((n, 2), dtype=np.float32) if teacher_features else None)
    artifacts.write_parquet(tmp_path / "t.parquet", split.table(), artifacts.ROW_GROUP)
    spans = list(Split.spans(tmp_path / "t.parquet"))
    assert [len(s) for s in spans] == [artifacts.ROW_GROUP, artifacts.ROW_GROUP, n - 2 * artifacts.ROW_GROUP]
    assert np.array_equal(np.concatenate(spans), split.teacher_x)
