import math

import pytest
import torch

from w2s_ray import losses as L

LOG_FLOOR = math.log(1e-8)


def logits_for(probs):
    return torch.tensor([probs]).log().requires_grad_()


def test_log_softmax_matches_torch():
    z = torch.randn(50, 10) * 5
    assert torch.allclose(L.log_softmax(z), torch.log_softmax(z, -1), atol=1e-6)


def test_forward_ce_value_and_gradient_by_hand():
    z = logits_for([1 / 3, 2 / 3])
    t = torch.tensor([[0.5, 0.5]])
    loss = L.forward_ce(z, t).sum()
    assert loss.item() == pytest.approx(-(0.5 * math.log(1 / 3) + 0.5 * math.log(2 / 3)), abs=1e-6)
    loss.backward()
    # d CE / d z = s - t
    assert torch.allclose(z.grad, torch.tensor([[1 / 3 - 0.5, 2 / 3 - 0.5]]), atol=1e-6)


def test_reverse_ce_value_and_gradient_by_hand():
    z = logits_for([1 / 3, 2 / 3])
    a = [math.log(0.25), math.log(0.75)]
    loss = L.reverse_ce(z, torch.tensor([a]), LOG_FLOOR).sum()
    sa = 1 / 3 * a[0] + 2 / 3 * a[1]
    assert loss.item() == pytest.approx(-sa, abs=1e-6)
    loss.backward()
    # d(-Σ s a)/dz_j = -s_j (a_j - Σ s a)
    expected = [-(1 / 3) * (a[0] - sa), -(2 / 3) * (a[1] - sa)]
    assert torch.allclose(z.grad, torch.tensor([expected]), atol=1e-6)


def test_reverse_ce_floors_log_zero():
    z = logits_for([0.5, 0.5])
    log_t = torch.tensor([[0.0, -float("inf")]])
    loss = L.reverse_ce(z, log_t, LOG_FLOOR)
    assert torch.isfinite(loss).all()
    assert loss.item() == pytest.approx(-0.5 * LOG_FLOOR, abs=1e-5)


def test_mixture_endpoints_and_midpoint():
    z = torch.randn(7, 4)
    t = torch.softmax(torch.randn(7, 4), -1)
    log_t = t.log()
    ce, rce = L.forward_ce(z, t), L.reverse_ce(z, log_t, LOG_FLOOR)
    assert torch.allclose(L.mixture(z, t, log_t, 0.0, LOG_FLOOR), ce)
    assert torch.allclose(L.mixture(z, t, log_t, 1.0, LOG_FLOOR), rce)
    assert torch.allclose(L.mixture(z, t, log_t, 0.3, LOG_FLOOR), 0.7 * ce + 0.3 * rce, atol=1e-6)
    assert torch.allclose(L.symmetric(z, t, log_t, 2.0, 0.5, LOG_FLOOR), 2 * ce + 0.5 * rce, atol=1e-6)


def test_kl_forward_and_reverse_are_ce_minus_entropy():
    z = torch.randn(5, 3)
    t = torch.softmax(torch.randn(5, 3), -1)
    s = torch.softmax(z, -1)
    h_t = -(t * t.log()).sum(-1)
    h_s = -(s * s.log()).sum(-1)
    assert torch.allclose(L.kl_forward(z, t, t.log()), L.forward_ce(z, t) - h_t, atol=1e-6)
    assert torch.allclose(L.kl_reverse(z, t.log(), LOG_FLOOR), L.reverse_ce(z, t.log(), LOG_FLOOR) - h_s, atol=1e-6)
    assert (L.kl_forward(z, t, t.log()) >= -1e-7).all()


def test_kl_forward_handles_zero_target_probabilities():
    z = torch.zeros(1, 2)
    t = torch.tensor([[1.0, 0.0]])
    assert L.kl_forward(z, t, t.log()).item() == pytest.approx(math.log(2), abs=1e-6)


def test_confidence_adaptive_switches_per_example():
    z = torch.randn(2, 3)
    t = torch.tensor([[0.9, 0.05, 0.05], [0.4, 0.3, 0.3]])
    out = L.confidence_adaptive(z, t, t.log(), 0.5, LOG_FLOOR)
    assert out[0].item() == pytest.approx(L.forward_ce(z[:1], t[:1]).item(), abs=1e-6)
    assert out[1].item() == pytest.approx(L.reverse_ce(z[1:], t[1:].log(), LOG_FLOOR).item(), abs=1e-6)


def test_aux_confidence_alpha_zero_is_ce_on_the_teachers_soft_or_hard_labels():
    z = torch.randn(6, 3)
    t = torch.softmax(torch.randn(6, 3), -1)
    assert torch.allclose(L.aux_confidence(z, t, 0.0), L.forward_ce(z, t))  # soft, as Burns et al.
    assert torch.allclose(L.aux_confidence(z, t, 0.0, soft=False), L.cross_entropy(z, t.argmax(-1)))
    # with alpha = 1 the loss is the CE on the student's own hardened (argmax) predictions
    for soft in (True, False):
        assert torch.allclose(L.aux_confidence(z, t, 1.0, soft), L.cross_entropy(z, z.argmax(-1)))
    mixed = L.aux_confidence(z, t, 0.25, soft=False)
    assert torch.allclose(mixed, 0.75 * L.cross_entropy(z, t.argmax(-1)) + 0.25 * L.cross_entropy(z, z.argmax(-1)))
    assert torch.allclose(L.aux_confidence(z, t, 0.25), 0.75 * L.forward_ce(z, t) + 0.25 * L.cross_entropy(z, z.argmax(-1)))


def test_student_loss_dispatch_rejects_unknown():
    with pytest.raises(ValueError):
        L.student_loss("nope", torch.zeros(1, 2), torch.ones(1, 2) / 2, torch.ones(1, 2).log())


def test_reverse_ce_starts_after_the_warm_up_and_the_holdout_loss_uses_the_full_weight():
    from w2s_ray.config import StudentConfig
    from w2s_ray.student.core import loss_options

    cfg = StudentConfig(rce_weight=0.5, rce_warmup=0.25, aux_alpha=0.8, aux_warmup=0.5)
    assert loss_options(cfg, 0, 100, 0.5)["lam"] == 0.0 and loss_options(cfg, 24, 100, 0.5)["lam"] == 0.0
    assert loss_options(cfg, 25, 100, 0.5)["lam"] == 0.5 and loss_options(cfg, 100, 100, 0.5)["lam"] == 0.5
    assert loss_options(cfg, 25, 100, 0.5)["aux_alpha"] == pytest.approx(0.4) and loss_options(cfg, 100, 100, 0.5)["aux_alpha"] == pytest.approx(0.8)
    assert loss_options(StudentConfig(rce_weight=0.3), 0, 100, 0.5)["lam"] == 0.3  # no warm-up: λ from the first step
