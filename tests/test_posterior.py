import numpy as np
import pytest
import torch

from w2s_ray.posterior import PosteriorAccumulator, arith_mean, bregman_variance, dual_mean_log, kl


def random_logp(k=6, n=40, c=5, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(k, n, c, generator=g, dtype=torch.float64) * scale, -1)


def test_dual_mean_of_identical_teachers_is_that_teacher():
    one = random_logp(k=1)
    same = one.repeat(5, 1, 1)
    assert torch.allclose(dual_mean_log(same), one[0], atol=1e-12)
    assert torch.allclose(arith_mean(same), one[0].exp(), atol=1e-12)


def test_variance_is_zero_iff_teachers_agree():
    one = random_logp(k=1)
    assert torch.allclose(bregman_variance(one.repeat(4, 1, 1)), torch.zeros(40, dtype=torch.float64), atol=1e-12)
    logp = random_logp()
    v = bregman_variance(logp)
    assert (v > 1e-6).all()
    # one example where all teachers agree, the others differ
    logp[:, 3] = logp[0, 3]
    v = bregman_variance(logp)
    assert v[3].abs() < 1e-12 and (v[torch.arange(40) != 3] > 1e-6).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bias_variance_decomposition_identity(seed):
    logp = random_logp(k=7, seed=seed)
    y = torch.softmax(torch.randn(40, 5, generator=torch.Generator().manual_seed(100 + seed), dtype=torch.float64), -1)
    log_y = y.log()
    lhs = kl(log_y.unsqueeze(0).expand_as(logp), logp).mean(0)
    q = dual_mean_log(logp)
    rhs = kl(log_y, q) + kl(q.unsqueeze(0).expand_as(logp), logp).mean(0)
    assert torch.allclose(lhs, rhs, atol=1e-5)
    # and for a one-hot label
    onehot = torch.nn.functional.one_hot(torch.arange(40) % 5, 5).double()
    lhs = kl(onehot.clamp_min(1e-300).log().unsqueeze(0).expand_as(logp), logp).mean(0)
    rhs = kl(onehot.clamp_min(1e-300).log(), q) + bregman_variance(logp)
    assert torch.allclose(lhs, rhs, atol=1e-5)


def test_streaming_accumulator_equals_batch_in_any_packing_and_order():
    logp = random_logp(k=10)
    ref = PosteriorAccumulator(40, 5)
    ref.add(logp)
    r = ref.finalize()
    assert torch.allclose(r["dual_log"].double(), dual_mean_log(logp), atol=1e-6)
    assert torch.allclose(r["arith"].double(), arith_mean(logp), atol=1e-6)
    assert torch.allclose(r["variance"].double(), bregman_variance(logp), atol=1e-6)
    acc = PosteriorAccumulator(40, 5)
    for ids in ([7, 2], [0, 1, 3], [9], [4, 5, 6, 8]):
        acc.add(logp[ids])
    s = acc.finalize()
    for key in r:
        assert torch.allclose(r[key], s[key], atol=1e-6), key


@pytest.mark.parametrize("elements", [1, 63 * 16, 63 * 48, 2**18])
def test_the_sums_are_the_same_bits_in_blocks_of_any_size(monkeypatch, elements):
    """`add` sums in blocks of rows (memory and speed); each row's sums must be the bits of the
    whole-tensor float64 formula, whatever the block, with a -inf log-prob (p = 0), one whose
    p underflows to 0 (p·log p = -0.0) and a diverged teacher's nan among them."""
    import w2s_ray.posterior as posterior

    logp = random_logp(k=9, n=301, c=7, seed=3, scale=6.0).float()
    logp[2, 5, 1] = -float("inf")
    logp[3, 7, 2] = -800.0
    logp[4, 9, :] = float("nan")
    logp64 = logp.double()
    p64 = logp64.exp()
    whole = {"sum_p": p64.sum(0), "sum_logp": logp64.sum(0),
             "sum_neg_entropy": torch.where(p64 > 0, p64 * logp64, torch.zeros_like(p64)).sum((0, 2))}
    monkeypatch.setattr(posterior, "ADD_ELEMENTS", elements)
    acc = PosteriorAccumulator(301, 7)
    acc.add(logp)
    assert acc.k == 9
    for name, ref in whole.items():
        torch.testing.assert_close(acc.sums()[name], ref, rtol=0, atol=0, equal_nan=True, msg=f"{elements} {name}")
        assert torch.equal(torch.signbit(acc.sums()[name]), torch.signbit(ref)), (elements, name)  # zeros of the same sign


def test_entropy_terms_and_mutual_information():
    logp = random_logp(k=5)
    r = PosteriorAccumulator(40, 5)
    r.add(logp)
    out = r.finalize()
    p = logp.exp()
    expected_h = -(p * logp).sum(-1).mean(0)
    a = p.mean(0)
    pred_h = -(a * a.log()).sum(-1)
    assert torch.allclose(out["expected_entropy"].double(), expected_h, atol=1e-5)
    assert torch.allclose(out["mutual_info"].double(), pred_h - expected_h, atol=1e-5)
    assert (out["mutual_info"] >= 0).all()


def test_bootstrap_is_independent_of_arrival_order_and_brackets_the_estimate():
    logp = random_logp(k=12, n=200, c=3, scale=0.7).float()
    y = torch.randint(0, 3, (200,), generator=torch.Generator().manual_seed(5))
    a = PosteriorAccumulator(200, 3, n_boot=50, boot_seed=3)
    a.add(logp, list(range(12)))
    b = PosteriorAccumulator(200, 3, n_boot=50, boot_seed=3)
    b.add(logp[6:], list(range(6, 12)))
    b.add(logp[:6], list(range(6)))
    ca, cb = a.bootstrap_accuracy(y), b.bootstrap_accuracy(y)
    assert np.allclose(ca["dual"], cb["dual"]) and np.allclose(ca["arith"], cb["arith"])
    acc = float((dual_mean_log(logp).argmax(-1) == y).float().mean())
    lo, hi = ca["dual"]
    assert lo <= acc + 0.02 and acc - 0.02 <= hi and lo < hi


def test_merge_extends_an_ensemble():
    logp = random_logp(k=8)
    whole = PosteriorAccumulator(40, 5)
    whole.add(logp)
    first, second = PosteriorAccumulator(40, 5), PosteriorAccumulator(40, 5)
    first.add(logp[:4])
    second.add(logp[4:])
    first.merge(second)
    for key, v in whole.finalize().items():
        assert torch.allclose(v, first.finalize()[key], atol=1e-6)
