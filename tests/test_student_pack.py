"""`student.pack`: the seeds of a target trained as one pack (`student.core.fit_pack`). A member
is its student trained alone up to float rounding (the same selected epoch, the same record to
1e-5), the same bits each time its pack trains, and the stage caches, resumes and keys packed
students apart from students trained one at a time."""

import pytest
import torch

from conftest import run_dir, small_config
from w2s_ray.config import StageKeys, StudentConfig, parse_config
from w2s_ray.errors import ConfigError
from w2s_ray.executor import InProcess
from w2s_ray.pipeline import run_pipeline
from w2s_ray.student.core import fit, fit_pack, in_memory

CASES = {
    "mixture, rce 0.3": {"rce_weight": 0.3},
    "adaptive quantile, shifts, weights, oracle": {"loss": "adaptive", "adaptive_quantile": 0.4, "augment_shift": 3, "selection": "oracle"},
    "logistic, weight decay, last": {"model": {"name": "logistic"}, "weight_decay": 0.01, "selection": "last"},
    "cnn1d": {"model": {"name": "cnn1d", "width": 8, "depth": 2}},
}


@pytest.mark.parametrize("case", CASES)
def test_a_pack_member_is_its_student_alone_and_the_same_bits_again(case):
    from w2s_ray.student.core import quantile_threshold, row_weights

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x, gold = torch.randn(1200, 24, generator=g), torch.randint(0, 5, (1200,), generator=g)
    t = torch.softmax(2 * torch.randn(1200, 5, generator=g), -1)
    weights = row_weights(StudentConfig(weighting="variance"), torch.rand(1200, generator=g)) if "weights" in case else None
    values = {"model": {"name": "mlp", "width": 32, "depth": 2}, "epochs": 8, "patience": 2, "batch_size": 64} | CASES[case]
    cfgs = [StudentConfig.model_validate(values | {"seed": s}) for s in range(3)]

    def worlds():
        return [in_memory(c, x, t, t.log(), gold=gold, weights=weights) for c in cfgs]

    ws = worlds()
    thresholds = [quantile_threshold(c, t, w.train_rows) for c, w in zip(cfgs, ws)]
    assert len(set(thresholds)) > 1 or "quantile" not in case  # the members' thresholds are their own
    packed = fit_pack(cfgs, ws, 24, 5, thresholds=thresholds)
    alone = [fit(c, w, 24, 5, threshold=th) for c, w, th in zip(cfgs, worlds(), thresholds)]
    for p, a in zip(packed, alone):
        assert (p.best_epoch, p.epochs_run) == (a.best_epoch, a.epochs_run)
        for hp, ha in zip(p.history, a.history):
            assert hp.keys() == ha.keys() and all(hp[k] == pytest.approx(ha[k], rel=1e-5, abs=1e-6) for k in hp), (hp, ha)
        assert p.state_dict.keys() == a.state_dict.keys()
        assert all(torch.allclose(p.state_dict[k], a.state_dict[k], atol=1e-5) for k in p.state_dict)
    assert len({p.epochs_run for p in packed}) > 1 or case != "mixture, rce 0.3"  # members stop on their own
    again = fit_pack(cfgs, worlds(), 24, 5, thresholds=thresholds)
    assert all(torch.equal(p.state_dict[k], q.state_dict[k]) for p, q in zip(packed, again) for k in p.state_dict)


def test_pack_is_refused_where_it_does_not_apply_and_keys_packed_students_apart():
    with pytest.raises(ConfigError, match="student.pack.*student.workers is 2"):
        parse_config({"student": {"pack": True, "workers": 2}})
    with pytest.raises(ConfigError, match="student.pack: packs are for mlp, logistic and cnn1d students.*'custom_model:TinyNet'"):
        parse_config({"student": {"pack": True, "model": {"name": "custom_model:TinyNet"}}})
    parse_config({"student": {"pack": True}})  # the default CNN
    mlp = {"model": {"name": "mlp", "width": 64, "depth": 2}}
    one, packed = StageKeys(parse_config({"student": mlp})), StageKeys(parse_config({"student": mlp | {"pack": True}}))
    assert StageKeys(parse_config({"student": mlp | {"pack": False}})).student("dual_mean") == one.student("dual_mean")
    keys = {one.student("dual_mean"), packed.student("dual_mean"), packed.student("dual_mean", seed=1), one.ceiling, packed.ceiling}
    assert len(keys) == 5
    assert one.report != packed.report and StageKeys(parse_config({"student": mlp | {"pack": False}})).report == one.report
    # a member's key holds its pack: the same seed in a pack of another size is another student,
    # in the same pack (more seeds, cut into packs of 5) the same one
    six = StageKeys(parse_config({"student": mlp | {"pack": True, "seeds": 6}}))
    assert six.student("dual_mean", seed=1) == packed.student("dual_mean", seed=1)
    assert StageKeys(parse_config({"student": mlp | {"pack": True, "seeds": 6, "pack_size": 6}})).student("dual_mean", seed=1) != six.student("dual_mean", seed=1)
    assert StageKeys(parse_config({"student": mlp | {"pack": True, "pack_size": 3}})).student("dual_mean") != packed.student("dual_mean")
    assert StageKeys(parse_config({"student": mlp | {"pack": True, "pack_size": 9}})).student("dual_mean") == packed.student("dual_mean")  # 5 seeds: one pack of 5
    assert StageKeys(parse_config({"student": mlp | {"pack_size": 2}})).student("dual_mean") == one.student("dual_mean")  # read with pack only


def test_the_stage_trains_packs_and_retrains_a_lost_member_to_the_bit(warm, tmp_path, capfd):
    """Seeds 3 of two targets and the ceiling in packs of 2 (seeds 0–1 and 2: six packs);
    every replicate saved and reported; one member's manifest gone: its pack trains again and
    the member comes out the same bits, the others untouched."""
    warm(tmp_path)  # data, teachers and labels from the session's cache
    cfg = small_config(tmp_path, student={"seeds": 3, "targets": ["dual_mean", "single"], "pack": True, "pack_size": 2},
                       posterior={"single_teachers": [0, 1, 2]})
    st = run_pipeline(cfg, until="report", executor=InProcess())
    err = capfd.readouterr().err
    assert "seeds in packs of up to 2" in err and "student[dual_mean] seeds 0–1 (a pack): epoch 1/4" in err and "student[dual_mean] seeds 2–2" in err
    reps = st.students.replicates
    assert [r.seed for r in reps["dual_mean"]] == [0, 1, 2] and [r.teacher for r in reps["single"]] == [0, 1, 2]
    assert len(st.students.ceilings) == 3 and len({r.test_acc for r in reps["single"]} | {r.eval.agree_single_test for r in reps["single"]}) > 2
    y = st.data.splits["test"].y
    for (tgt, i), d in st.students.dirs.items():  # what was saved gives what was reported
        res = st.students.ceilings[i] if tgt is None else reps[tgt][i]
        assert float((st.students.test_logp(tgt, i).argmax(-1) == y).mean()) == pytest.approx(res.test_acc, abs=1e-6), (tgt, i)
    lost = st.students.dirs[("dual_mean", 1)]
    before = {job: (d / "metrics.json").stat().st_mtime_ns for job, d in st.students.dirs.items() if d != lost}
    logp = st.students.test_logp("dual_mean", 1)
    weights = torch.load(lost / "weights.pt")
    (lost / "manifest.json").unlink()
    again = run_pipeline(cfg, until="student", executor=InProcess())
    assert {job: (d / "metrics.json").stat().st_mtime_ns for job, d in again.students.dirs.items() if d != lost} == before
    assert (again.students.test_logp("dual_mean", 1) == logp).all()
    assert all(torch.equal(weights[k], v) for k, v in torch.load(lost / "weights.pt").items())
    assert run_dir(cfg).path.joinpath("student").is_dir()


@pytest.mark.slow
def test_on_ray_a_pack_task_writes_the_bits_of_the_in_process_run(ray_session, warm, tmp_path):
    """The packs as Ray tasks (`workers.student_pack_task`, one per target, each reading its
    labels itself) write the students the in-process run writes, to the bit."""
    import shutil

    from test_pipeline import same_contents

    here = warm(tmp_path / "here")
    pack = {"seeds": 2, "targets": ["dual_mean"], "pack": True}
    local = small_config(tmp_path / "here", student=pack)
    shutil.copytree(run_dir(here).path, run_dir(small_config(tmp_path / "ray")).path, dirs_exist_ok=True)
    on_ray = small_config(tmp_path / "ray", student=pack)
    a, b = run_pipeline(local, until="student", executor=InProcess()), run_pipeline(on_ray, until="student")
    assert set(a.students.dirs) == set(b.students.dirs) == {("dual_mean", 0), ("dual_mean", 1), (None, 0), (None, 1)}
    for stage in ("student", "ceiling"):
        assert same_contents(run_dir(local).path / stage, run_dir(on_ray).path / stage) == [], stage
