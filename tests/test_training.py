import math

import pytest
import torch

from w2s_ray.config import ModelConfig, StudentConfig
from w2s_ray.student.core import holdout_split, in_memory, load_student, predict_log, random_roll, train_student


@pytest.fixture(scope="module")
def toy():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 12, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    t = torch.softmax(torch.nn.functional.one_hot(y, 3).float() * 2 + torch.randn(400, 3, generator=g) * 0.5, -1)
    return x, y, t, t.log()


def cfg(**kw):
    base = dict(model=ModelConfig(name="mlp", width=16, depth=1), epochs=6, batch_size=32, lr=1e-2, patience=10)
    base.update(kw)
    return StudentConfig(**base)


@pytest.mark.parametrize(
    "loss, extra",
    [("mixture", {"rce_weight": 0.5}), ("symmetric", {}), ("adaptive", {"adaptive_quantile": 0.5}), ("aux_conf", {"aux_alpha": 0.5}), ("kl", {}), ("rkl", {})],
)
def test_every_loss_trains_a_student_that_learns(toy, loss, extra):
    x, y, t, log_t = toy
    res = train_student(cfg(loss=loss, **extra), x, t, log_t, 3)
    assert res.epochs_run == 6 and 1 <= res.best_epoch <= 6
    assert all(math.isfinite(h["train_loss"]) for h in res.history)
    model = load_student(cfg(), res.state_dict, 12, 3)
    acc = float((predict_log(model, x).argmax(-1) == y).float().mean())
    assert acc > 0.6  # the majority class is about half of the rows


def test_early_stopping_and_best_state(toy):
    x, y, t, log_t = toy
    res = train_student(cfg(epochs=40, patience=2, lr=5e-2), x, t, log_t, 3)
    assert res.epochs_run < 40
    assert res.epochs_run - res.best_epoch == 2
    best = min(h["holdout_loss"] for h in res.history)
    assert res.history[res.best_epoch - 1]["holdout_loss"] == pytest.approx(best)


def test_oracle_selection_needs_and_uses_gold(toy):
    x, y, t, log_t = toy
    with pytest.raises(ValueError, match="oracle"):
        train_student(cfg(selection="oracle"), x, t, log_t, 3)
    res = train_student(cfg(selection="oracle"), x, t, log_t, 3, y_gold=y)
    assert "holdout_gold_acc" in res.history[0]


def test_same_seed_same_student_and_holdout_is_disjoint(toy):
    x, y, t, log_t = toy
    a = train_student(cfg(), x, t, log_t, 3)
    b = train_student(cfg(), x, t, log_t, 3)
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    tr, ho = holdout_split(400, 0.1, 0)
    assert len(set(tr.tolist()) & set(ho.tolist())) == 0 and len(tr) + len(ho) == 400


def test_resume_from_an_epoch_checkpoint_gives_the_same_student(toy):
    x, y, t, log_t = toy
    whole = train_student(cfg(epochs=5), x, t, log_t, 3)
    saved = {}

    def stop_after_two(rec, checkpoint):
        if rec["epoch"] == 2:
            saved.update(checkpoint())
            raise KeyboardInterrupt  # the trial dies here

    with pytest.raises(KeyboardInterrupt):
        train_student(cfg(epochs=5), x, t, log_t, 3, on_epoch=stop_after_two)
    resumed = train_student(cfg(epochs=5), x, t, log_t, 3, resume=saved)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4, 5]
    for k in whole.state_dict:
        assert torch.allclose(whole.state_dict[k], resumed.state_dict[k], atol=1e-6), k


def test_random_roll_shifts_each_row_circularly():
    x = torch.arange(20.0).view(2, 10)
    gen = torch.Generator().manual_seed(0)
    rolled = random_roll(x, 3, gen)
    for r, orig in zip(rolled, x):
        shifts = [s for s in range(-3, 4) if torch.equal(r, torch.roll(orig, s))]
        assert shifts, (r, orig)
    assert torch.equal(random_roll(x, 0, gen), x)


def test_shift_augmented_student_trains(toy):
    x, y, t, log_t = toy
    res = train_student(cfg(augment_shift=2), x, t, log_t, 3)
    assert res.epochs_run == 6 and all(math.isfinite(h["train_loss"]) for h in res.history)


def test_n_in_memory_ranks_split_the_one_process_global_batches_with_the_same_draws(toy):
    """Rank r of N draws the same order and augmentation shifts as one process and takes its
    contiguous 1/N of each global batch: the ranks' batches, side by side, are the one-process
    batches, row for row and shift for shift; a last global batch shorter than N is dropped."""
    x, y, t, log_t = toy
    c = cfg(batch_size=33, augment_shift=3)
    one = in_memory(c, x, t, log_t)
    ranks = [in_memory(c, x, t, log_t, rank=r, size=3) for r in range(3)]
    for epoch in (1, 2):
        whole = list(one.batches(epoch))
        parts = [list(w.batches(epoch)) for w in ranks]
        assert all(len(p) == len(whole) == one.steps_per_epoch for p in parts)  # 360 training rows: 11 steps, the last of 30 rows
        for i, (xb, tb, lb, wb) in enumerate(whole):
            assert torch.equal(torch.cat([p[i][0] for p in parts]), xb) and torch.equal(torch.cat([p[i][1] for p in parts]), tb)
    short = in_memory(c.model_copy(update={"batch_size": 359}), x, t, log_t, rank=1, size=2)
    assert short.steps_per_epoch == 1 and len(list(short.batches(1))) == 1  # 360 = 359 + 1: the 1-row batch cannot feed 2 ranks


def test_the_loop_scores_the_held_out_slice_at_the_full_reverse_ce_weight(toy):
    """With a forward-CE warm-up (λ = 0 for the first half of the steps) the held-out score is
    the objective at the full λ from the first epoch on, so the selection rule compares epochs
    on one objective."""
    from w2s_ray.losses import student_loss
    from w2s_ray.student.core import fit

    x, y, t, log_t = toy
    c = cfg(epochs=2, rce_weight=0.5, rce_warmup=0.5)
    world = in_memory(c, x, t, log_t)
    seen = []
    fit(c, world, 12, 3, on_epoch=lambda rec, ckpt: seen.append((rec, ckpt()["model"])))
    rec, state = seen[0]
    model = load_student(c, state, 12, 3)
    with torch.no_grad():
        logits = model(world.holdout.x)
    full = student_loss("mixture", logits, world.holdout.t, world.holdout.log_t, lam=0.5, alpha=c.sym_alpha, beta=c.sym_beta,
                        threshold=c.adaptive_threshold, aux_alpha=0.0, aux_soft=c.aux_target == "soft", log_floor=c.log_floor).mean()
    assert rec["holdout_loss"] == pytest.approx(float(full), rel=1e-6)


def test_row_weights_are_the_rules_recomputed_with_mean_one():
    from w2s_ray.student.core import row_weights

    v = torch.tensor([0.0, 0.1, 0.2, 0.4, 0.8, 1.5, 0.05, 0.3, 0.6, 1.0])
    assert row_weights(cfg(), v) is None
    w = row_weights(cfg(weighting="variance"), v)
    want = torch.exp(-v.double() / v.double().mean())
    torch.testing.assert_close(w.double(), want / want.mean(), rtol=1e-6, atol=0)
    assert abs(float(w.mean()) - 1) < 1e-6 and bool((w[:-1] > 0).all())
    d = row_weights(cfg(weighting="drop_disputed", drop_frac=0.2), v)
    assert d.tolist() == pytest.approx([1.25] * 5 + [0.0] + [1.25] * 3 + [0.0])  # the two most disputed rows (1.5, 1.0) out


def test_weights_scale_each_rows_loss_and_nothing_else(toy):
    """All-ones weights train the unweighted student bit for bit; a row of weight 0 is not
    learned from: changing its target changes nothing."""
    from w2s_ray.student.core import fit

    x, y, t, log_t = toy
    c = cfg(epochs=3)

    def train(t, log_t, w):
        world = in_memory(c, x, t, log_t, weights=w)
        return fit(c, world, 12, 3).state_dict

    plain = train(t, log_t, None)
    assert all(torch.equal(a, b) for a, b in zip(plain.values(), train(t, log_t, torch.ones(400)).values()))
    w = torch.ones(400)
    train_rows, _ = holdout_split(400, c.holdout_frac, c.seed)
    dropped = train_rows[:50]
    w[dropped] = 0
    t2 = t.clone()
    t2[dropped] = t[dropped].flip(-1)
    a, b = train(t, log_t, w), train(t2, t2.log(), w)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], plain[k]) for k in a)


def test_weighting_is_teacher_side_and_refused_where_the_stream_cannot_carry_it():
    from w2s_ray.config import StageKeys, load_config
    from w2s_ray.errors import ConfigError

    k = StageKeys(load_config(None))
    w = StageKeys(load_config(None, {"student.weighting": "variance"}))
    assert w.ceiling == k.ceiling and w.student("dual_mean") != k.student("dual_mean")
    assert StageKeys(load_config(None, {"student.drop_frac": 0.3})).student("dual_mean") == k.student("dual_mean")  # read by drop_disputed alone
    with pytest.raises(ConfigError, match="student.weighting with student.workers > 1 needs student.input: memory"):
        load_config(None, {"student.weighting": "variance", "student.workers": 2})
    load_config(None, {"student.weighting": "variance", "student.workers": 2, "student.input": "memory"})
