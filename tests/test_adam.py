"""`w2s_ray.adam.Adam` is `torch.optim.Adam`, bit for bit (that a step imports no `torch._dynamo`
is checked in `test_imports.py`, in a fresh process)."""

import pytest
import torch

from w2s_ray.adam import Adam


def train(make_opt, steps: int = 25, resume_at: int | None = None, other=None):
    """A small MLP trained for `steps` steps on fixed data; with `resume_at`, the optimizer is
    rebuilt there by `other` from the first one's state_dict, as a resumed run does."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))
    x, y = torch.randn(64, 12), torch.randint(0, 5, (64,))
    opt = make_opt(model.parameters())
    for s in range(steps):
        if s == resume_at:
            state = opt.state_dict()
            opt = other(model.parameters())
            opt.load_state_dict(state)
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x[s % 4 * 16:][:16]), y[s % 4 * 16:][:16]).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-3])
def test_the_same_bits_as_torch_adam(foreach, weight_decay):
    ref = train(lambda p: torch.optim.Adam(p, lr=3e-3, weight_decay=weight_decay, foreach=foreach))
    ours = train(lambda p: Adam(p, lr=3e-3, weight_decay=weight_decay, foreach=foreach))
    assert all(torch.equal(a, b) for a, b in zip(ref, ours))
    # the defaults choose as torch does (the single-tensor form on the CPU)
    default = train(lambda p: Adam(p, lr=3e-3, weight_decay=weight_decay))
    assert all(torch.equal(a, b) for a, b in zip(train(lambda p: torch.optim.Adam(p, lr=3e-3, weight_decay=weight_decay)), default))


@pytest.mark.parametrize("foreach", [False, True])
def test_each_resumes_from_the_others_state(foreach):
    ref = train(lambda p: torch.optim.Adam(p, lr=3e-3, foreach=foreach))
    torch_then_ours = train(lambda p: torch.optim.Adam(p, lr=3e-3, foreach=foreach), resume_at=11,
                            other=lambda p: Adam(p, lr=3e-3, foreach=foreach))
    ours_then_torch = train(lambda p: Adam(p, lr=3e-3, foreach=foreach), resume_at=11,
                            other=lambda p: torch.optim.Adam(p, lr=3e-3, foreach=foreach))
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(ref, torch_then_ours, ours_then_torch))
