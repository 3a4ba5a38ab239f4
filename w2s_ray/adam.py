"""Adam in plain torch, the same bits as `torch.optim.Adam`, without importing `torch._dynamo`.

`torch.optim.Adam.step` imports `torch._dynamo` on its first call (its `_use_grad` wrapper calls
`torch._dynamo.graph_break()`), and `Optimizer.add_param_group` does too through
`torch._disable_dynamo`. Measured in a fresh Ray worker on this 2-core CPU: 0.98 s of CPU for
the first `Adam(...)` and step, against 1.03 s to import everything else the worker runs
(torch included). Every teacher actor and student worker of a run paid it; nothing here
compiles (`teachers.resources.compile` aside, which imports dynamo anyway).

`Adam` runs the update of `torch.optim.Adam` with `amsgrad`, `maximize`, `capturable` and
`differentiable` off (what w2s-ray uses), in its two forms, chosen as torch chooses:
- `foreach=True` (torch's `_multi_tensor_adam`), what `packs.make_adam` asks for, and torch's
  default when every parameter is on a GPU;
- `foreach=False` (`_single_tensor_adam`), torch's default on the CPU.
The operations, their order and their scalars (computed in Python floats) are torch's, so the
parameters are bitwise the same after any number of steps (`tests/test_adam.py` checks both
forms, with and without weight decay, and that each loads the other's `state_dict`).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch


class Adam:
    def __init__(self, params: Iterable[torch.Tensor], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, foreach: bool | None = None) -> None:
        self.params = list(params)
        self.lr, self.betas, self.eps, self.weight_decay = float(lr), (float(betas[0]), float(betas[1])), float(eps), float(weight_decay)
        if foreach is None:  # torch's default: the multi-tensor kernels when every parameter is on a GPU
            foreach = bool(self.params) and all(p.is_cuda for p in self.params)
        self.foreach = foreach
        self.state: dict[int, dict[str, torch.Tensor]] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_()
                p.grad.zero_()

    def _group(self) -> tuple[list[torch.Tensor], ...]:
        params, grads, avgs, sqs, steps = [], [], [], [], []
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            st = self.state.get(i)
            if st is None:  # as torch's `_init_group`: a float32 step on the CPU, zero moments like p
                st = self.state[i] = {"step": torch.tensor(0.0, dtype=torch.float32),
                                      "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                      "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
            params.append(p)
            grads.append(p.grad)
            avgs.append(st["exp_avg"])
            sqs.append(st["exp_avg_sq"])
            steps.append(st["step"])
        return params, grads, avgs, sqs, steps

    @torch.no_grad()
    def step(self) -> None:
        params, grads, avgs, sqs, steps = self._group()
        if not params:
            return
        if self.foreach:
            groups: dict[tuple, list[int]] = {}
            for i, p in enumerate(params):  # torch groups by device and dtype; each tensor's update is its own
                groups.setdefault((p.device, p.dtype), []).append(i)
            for idx in groups.values():
                self._multi([params[i] for i in idx], [grads[i] for i in idx], [avgs[i] for i in idx],
                            [sqs[i] for i in idx], [steps[i] for i in idx])
        else:
            self._single(params, grads, avgs, sqs, steps)

    def _single(self, params, grads, avgs, sqs, steps) -> None:
        """torch's `_single_tensor_adam` (not capturable, not differentiable, no amsgrad)."""
        beta1, beta2 = self.betas
        for param, grad, exp_avg, exp_avg_sq, step_t in zip(params, grads, avgs, sqs, steps):
            step_t += 1
            if self.weight_decay != 0:
                grad = grad.add(param, alpha=self.weight_decay)
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            step = step_t.item()
            bias_correction1 = 1 - beta1**step
            bias_correction2 = 1 - beta2**step
            step_size = self.lr / bias_correction1
            bias_correction2_sqrt = bias_correction2**0.5
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.eps)
            param.addcdiv_(exp_avg, denom, value=-step_size)

    def _multi(self, params, grads, avgs, sqs, steps) -> None:
        """torch's `_multi_tensor_adam` for one device and dtype (not capturable, no amsgrad)."""
        beta1, beta2 = self.betas
        if steps[0].is_cpu:
            torch._foreach_add_(steps, torch.tensor(1.0, device="cpu"), alpha=1.0)
        else:
            torch._foreach_add_(steps, 1)
        if self.weight_decay != 0:
            grads = torch._foreach_add(grads, params, alpha=self.weight_decay)
        torch._foreach_lerp_(avgs, grads, 1 - beta1)
        torch._foreach_mul_(sqs, beta2)
        torch._foreach_addcmul_(sqs, grads, grads, 1 - beta2)
        bias_correction1 = [1 - beta1 ** s.item() for s in steps]
        bias_correction2 = [1 - beta2 ** s.item() for s in steps]
        step_size = [(self.lr / bc) * -1 for bc in bias_correction1]
        bias_correction2_sqrt = [bc**0.5 for bc in bias_correction2]
        exp_avg_sq_sqrt = torch._foreach_sqrt(sqs)
        torch._foreach_div_(exp_avg_sq_sqrt, bias_correction2_sqrt)
        torch._foreach_add_(exp_avg_sq_sqrt, self.eps)
        torch._foreach_addcdiv_(params, avgs, exp_avg_sq_sqrt, step_size)

    def state_dict(self) -> dict[str, Any]:
        """`torch.optim.Adam`'s layout, so either loads the other's."""
        group = {"lr": self.lr, "betas": self.betas, "eps": self.eps, "weight_decay": self.weight_decay, "amsgrad": False,
                 "foreach": self.foreach, "maximize": False, "capturable": False, "differentiable": False, "fused": None,
                 "decoupled_weight_decay": False, "params": list(range(len(self.params)))}
        return {"state": {i: dict(st) for i, st in self.state.items()}, "param_groups": [group]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        groups = state_dict["param_groups"]
        if len(groups) != 1 or len(groups[0]["params"]) != len(self.params):
            raise ValueError(f"an optimizer state for {sum(len(g['params']) for g in groups)} parameters in {len(groups)} group(s), "
                             f"not {len(self.params)} in one")
        self.state = {}
        for i, st in state_dict["state"].items():
            p = self.params[int(i)]
            self.state[int(i)] = {"step": st["step"].detach().clone().to(torch.float32).cpu(),
                                  "exp_avg": st["exp_avg"].detach().to(device=p.device, dtype=p.dtype).clone(),
                                  "exp_avg_sq": st["exp_avg_sq"].detach().to(device=p.device, dtype=p.dtype).clone()}
