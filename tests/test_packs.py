import numpy as np
import pytest
import torch

from w2s_ray.config import ModelConfig, TeachersConfig
from w2s_ray.packs import TeacherPack, teacher_indices, teacher_seed, train_one
from w2s_ray.workers import teacher_view


@pytest.fixture(scope="module")
def toy():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 40, generator=g)
    y = (x[:, :5].sum(1) > 0).long() + (x[:, 5] > 1).long()
    return x, y


@pytest.mark.parametrize("model", [ModelConfig(name="mlp", width=16, depth=2), ModelConfig(name="cnn1d", width=4, depth=2), ModelConfig(name="logistic")])
def test_packed_teacher_matches_the_same_teacher_trained_alone(toy, model):
    x, y = toy
    ids = [0, 1, 2]
    seeds = [teacher_seed(7, t) for t in ids]
    index_sets = [teacher_indices("bootstrap", len(y), 3, t, s, 7) for t, s in zip(ids, seeds)]
    pack = TeacherPack(model, 40, 3, seeds)
    pack.fit(x, y, index_sets, epochs=3, batch_size=32, lr=1e-2)
    for i, (s, idx) in enumerate(zip(seeds, index_sets)):
        alone = train_one(model, x, y, 3, s, idx, epochs=3, batch_size=32, lr=1e-2)
        for name, p in alone.state_dict().items():
            assert torch.allclose(pack.state_dicts()[i][name], p, atol=1e-5), (i, name)
    # training actually moved the parameters
    fresh = TeacherPack(model, 40, 3, seeds)
    assert any(not torch.allclose(a, b) for a, b in zip(fresh.state_dicts()[0].values(), pack.state_dicts()[0].values()))


def test_a_teacher_does_not_depend_on_its_pack(toy):
    x, y = toy
    model = ModelConfig(width=8)
    seed = teacher_seed(0, 5)
    idx = teacher_indices("bootstrap", len(y), 8, 5, seed, 0)
    small = TeacherPack(model, 40, 3, [seed])
    small.fit(x, y, [idx], 2, 50, 1e-2)
    others = [teacher_seed(0, t) for t in (1, 2)]
    big = TeacherPack(model, 40, 3, others + [seed])
    big.fit(x, y, [teacher_indices("bootstrap", len(y), 8, t, s, 0) for t, s in zip((1, 2), others)] + [idx], 2, 50, 1e-2)
    assert torch.allclose(small.log_probs(x)[0], big.log_probs(x)[2], atol=1e-5)


def test_resampling_schemes():
    n, k = 100, 4
    boot = [teacher_indices("bootstrap", n, k, t, teacher_seed(0, t), 0) for t in range(k)]
    assert all(len(b) == n for b in boot) and not np.array_equal(boot[0], boot[1])
    assert len(np.unique(boot[0])) < n  # with replacement
    assert np.array_equal(teacher_indices("seed", n, k, 2, 9, 0), np.arange(n))
    parts = [teacher_indices("disjoint", n, k, t, 0, 0) for t in range(k)]
    allp = np.concatenate(parts)
    assert len(allp) == len(np.unique(allp)) == n and all(len(p) == 25 for p in parts)


def test_teacher_window_view_zeroes_everything_outside_the_window():
    x = np.arange(12, dtype=np.float32).reshape(2, 6) + 1
    full = TeachersConfig()
    assert teacher_view(x, full) is x
    win = TeachersConfig(view={"kind": "window", "start": 1, "length": 3})
    v = teacher_view(x, win)
    assert (v[:, 1:4] == x[:, 1:4]).all() and (v[:, [0, 4, 5]] == 0).all()


@pytest.mark.parametrize("model", [{"name": "mlp", "width": 8}, {"name": "cnn1d", "width": 4}, {"name": "logistic"}], ids=lambda m: m["name"])
def test_a_teacher_is_bitwise_the_same_in_every_pack_plan(model):
    """Packs of 1, 3, 5, 8 and 32 teachers, at several offsets, give each teacher the bytes a
    pack of 40 gives it: a resumed, extended or re-planned ensemble (the plan follows the CPU
    count and `max_pack_size`) is the ensemble trained at once."""
    from w2s_ray.workers import train_pack_local

    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 12)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0)
    data = {f"x_{s}": x for s in ("weak", "transfer", "test")} | {f"y_{s}": y for s in ("weak", "transfer", "test")}
    cfg = TeachersConfig(k=40, epochs=4, batch_size=32, model=model)
    packed = train_pack_local(data, cfg, 3, list(range(40)))
    for ids in ([2], [39], [5, 6, 7], [0, 1, 2, 3, 4], [8, 9, 10, 11, 12], list(range(3, 11)), list(range(7, 39))):
        small = train_pack_local(data, cfg, 3, ids)
        for split in ("transfer", "test"):
            assert np.array_equal(small[f"logp_{split}"], packed[f"logp_{split}"][ids[0] : ids[-1] + 1]), (ids, split)  # bitwise
        assert small["seeds"] == packed["seeds"][ids[0] : ids[-1] + 1] and small["steps"] * 40 == packed["steps"] * len(ids)


@pytest.mark.parametrize("model", [ModelConfig(name="mlp", width=16, depth=1), ModelConfig(name="mlp", width=8, depth=3), ModelConfig(name="logistic")],
                         ids=["mlp1", "mlp3", "logistic"])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_the_written_out_chain_is_each_teacher_trained_alone_to_the_bit(model, weight_decay, monkeypatch):
    """`chain_forward`/`chain_backward`/`mean_ce_grad` replace autograd for MLP and logistic
    packs because they are faster; each packed teacher must end with the parameters of the same
    teacher trained alone as a plain module (`train_one`: autograd, one `nn.Linear` after
    another) bit for bit, ragged last batch and weight decay included. The `vmap` + autograd
    path computes the same math with other operand layouts (its weight gradients are GEMMs of
    the transposed shape): equal to float rounding, not to the bit."""
    from w2s_ray.packs import linear_chain
    from w2s_ray.models import build_model

    g = torch.Generator().manual_seed(3)
    x = torch.randn(301, 12, generator=g)
    y = torch.randint(0, 5, (301,), generator=g)
    seeds = [teacher_seed(2, t) for t in range(5)]
    index_sets = [teacher_indices("bootstrap", len(y), 5, t, s, 2) for t, s in enumerate(seeds)]
    assert linear_chain(build_model(model, 12, 5)) is not None
    packs = {}
    for autograd in (False, True):
        pack = packs[autograd] = TeacherPack(model, 12, 5, seeds, autograd=autograd)
        assert (pack._layers is None) == autograd
        pack.fit(x, y, index_sets, epochs=3, batch_size=40, lr=1e-2, weight_decay=weight_decay)
    chain = packs[False].state_dicts()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # alone, a teacher's GEMMs are split across threads (`workers.MIN_PACK`); in a pack each is one thread's
    try:
        alone = [train_one(model, x, y, 5, s, idx, epochs=3, batch_size=40, lr=1e-2, weight_decay=weight_decay).state_dict()
                 for s, idx in zip(seeds, index_sets)]
    finally:
        torch.set_num_threads(threads)
    for i in range(len(seeds)):
        for name, p in alone[i].items():
            assert torch.equal(chain[i][name], p), (i, name)  # bitwise
    for name in packs[True].params:
        assert torch.allclose(packs[False].params[name], packs[True].params[name], rtol=1e-5, atol=1e-6), name
    import w2s_ray.packs

    monkeypatch.setattr(w2s_ray.packs, "CHAIN_BYTES", 4 * 1024 * 16 * 2)  # groups of 2 teachers (and 3 of 5)
    probe = torch.randn(1300, 12, generator=g)  # two chunks, the second ragged
    grouped = packs[False].log_probs(probe, chunk=1024)
    monkeypatch.setattr(w2s_ray.packs, "CHAIN_BYTES", 4 * 2**20)
    assert torch.equal(grouped, packs[False].log_probs(probe, chunk=1024))  # the same bits in any group of teachers
    assert torch.allclose(grouped, packs[True].log_probs(probe, chunk=1024), atol=1e-5)
    first = "linear.weight" if model.name == "logistic" else "net.0.weight"
    assert not torch.equal(packs[False].params[first], TeacherPack(model, 12, 5, seeds).params[first])  # training moved it


def test_only_the_built_in_chains_are_written_out():
    from w2s_ray.models import MLP, build_model
    from w2s_ray.packs import linear_chain

    class Wider(MLP):  # a subclass may change forward: autograd for it
        pass

    assert linear_chain(Wider(4, 2)) is None
    assert linear_chain(build_model(ModelConfig(name="cnn1d", width=4, depth=1), 12, 3)) is None
    assert linear_chain(build_model(ModelConfig(name="mlp", width=4, depth=2), 12, 3)) == ["net.0", "net.2", "net.4"]


def test_pack_batches_are_each_teachers_batch_order():
    from w2s_ray.packs import batch_order, pack_batches

    seeds = [teacher_seed(4, t) for t in range(3)]
    index_sets = [teacher_indices("bootstrap", 50, 3, t, s, 4) for t, s in enumerate(seeds)]
    got = list(pack_batches(seeds, index_sets, epochs=3, batch_size=16))  # 50 rows: a ragged batch an epoch
    want = list(zip(*[batch_order(s, idx, 3, 16) for s, idx in zip(seeds, index_sets)]))
    assert len(got) == len(want) == 12
    for g, w in zip(got, want):
        assert np.array_equal(g.numpy(), np.stack(w))
