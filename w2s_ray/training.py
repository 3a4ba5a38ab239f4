"""One student training run on a target distribution over the transfer inputs.

Used by `run` (one student per target, plus the gold-label ceiling), by Tune trials and by
studies. No Ray: the caller decides where it runs and passes tensors in.

Early stopping looks only at a held-out slice of the *transfer* split: by default the training
objective against the teacher targets there (no gold label used), or, with `selection: oracle`,
gold accuracy on that slice.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from w2s_ray.config import StudentConfig
from w2s_ray.losses import log_softmax, student_loss
from w2s_ray.models import build_model, count_params


@dataclass
class TrainResult:
    """What a training loop returns: the selected weights and the record. A student evaluated
    and saved is a `run.StudentResult`."""

    state_dict: dict[str, torch.Tensor]
    best_epoch: int
    epochs_run: int
    n_params: int
    seconds: float
    history: list[dict] = field(default_factory=list)


def holdout_split(n: int, frac: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train rows, held-out rows) of the transfer split; the same for every target of a run."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(10_007 + seed))
    n_hold = max(1, int(round(n * frac)))
    return perm[n_hold:], perm[:n_hold]


def random_roll(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Roll each row by its own random shift in [-max_shift, max_shift] (MNIST-1D's translations
    are circular rolls, so the label is unchanged). A student made shift-invariant this way
    cannot copy errors a teacher makes because of where a pattern sits."""
    n, length = x.shape
    shift = torch.randint(-max_shift, max_shift + 1, (n, 1), generator=gen).to(x.device)
    idx = (torch.arange(length, device=x.device).unsqueeze(0) - shift) % length
    return x.gather(1, idx)


@torch.no_grad()
def predict_log(model: torch.nn.Module, x: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    model.eval()
    dev = next(model.parameters()).device
    out = [log_softmax(model(x[s : s + chunk].to(dev))).cpu() for s in range(0, len(x), chunk)]
    return torch.cat(out)


def loss_options(cfg: StudentConfig, step: int, total_steps: int, threshold: float) -> dict[str, Any]:
    """The loss knobs at a training step (one place for the single-process and the Ray Train
    loops): the aux weight ramps up over `aux_warmup` of training, and the reverse-CE weight is
    0 for the first `rce_warmup` (a forward-CE warm-up; the holdout loss, at `total_steps`, uses
    the full λ)."""
    return {
        "lam": cfg.rce_weight if step >= cfg.rce_warmup * total_steps else 0.0,
        "alpha": cfg.sym_alpha, "beta": cfg.sym_beta, "threshold": threshold,
        "aux_alpha": cfg.aux_alpha * min(1.0, step / max(1.0, cfg.aux_warmup * total_steps)),
        "aux_soft": cfg.aux_target == "soft", "log_floor": cfg.log_floor,
    }


def epoch_rows(train_rows: torch.Tensor, batch_size: int, gen: torch.Generator, device: str = "cpu") -> Iterator[torch.Tensor]:
    """One epoch of a single-process student's input: the training rows in a fresh random order
    (drawn from `gen`), `batch_size` at a time; the loop gathers its batch with these indices."""
    perm = train_rows[torch.randperm(len(train_rows), generator=gen)].to(device)
    for s in range(0, len(perm), batch_size):
        yield perm[s : s + batch_size]


def train_student(
    cfg: StudentConfig,
    x: torch.Tensor,
    t: torch.Tensor,
    log_t: torch.Tensor,
    n_classes: int,
    *,
    loss: str | None = None,
    y_gold: torch.Tensor | None = None,
    device: str = "cpu",
    on_epoch: Callable[[dict, Callable[[], dict]], None] | None = None,
    resume: dict | None = None,
) -> TrainResult:
    """Fit a student to targets `t` (probabilities) with `log_t` (their logs).

    `loss` overrides `cfg.loss` (the gold ceiling trains with forward CE on one-hot labels).
    `y_gold` (transfer gold labels) is read only when `cfg.selection == "oracle"`.
    `on_epoch(record, checkpoint)` is called after every epoch; `checkpoint()` returns everything
    needed to continue (Tune reports and checkpoints through it), and `resume` takes that back.
    """
    t0 = time.perf_counter()
    loss_name = loss or cfg.loss
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, x.shape[1], n_classes).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    train_rows, hold_rows = holdout_split(len(x), cfg.holdout_frac, cfg.seed)
    x, t, log_t = x.to(device), t.to(device), log_t.to(device)
    threshold = cfg.adaptive_threshold
    if cfg.adaptive_quantile is not None:
        threshold = float(torch.quantile(t[train_rows.to(device)].amax(-1).float().cpu(), cfg.adaptive_quantile))
    oracle = cfg.selection == "oracle"
    if oracle and y_gold is None:
        raise ValueError("selection='oracle' needs the transfer split's gold labels")

    steps_per_epoch = -(-len(train_rows) // cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    gen = torch.Generator().manual_seed(cfg.seed)

    def objective(logits, rows, step):
        return student_loss(loss_name, logits, t[rows], log_t[rows], **loss_options(cfg, step, total_steps, threshold)).mean()

    best_score, best_state, best_epoch, bad, step, start = float("inf"), None, 0, 0, 0, 1
    history: list[dict] = []
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        gen.set_state(resume["generator"])
        best_score, best_state, best_epoch = resume["best_score"], resume["best_state"], resume["best_epoch"]
        bad, step, history = resume["bad"], resume["step"], list(resume["history"])
        start = resume["epoch"] + 1
        if bad >= cfg.patience:  # it had already stopped early
            start = cfg.epochs + 1

    def checkpoint() -> dict:
        return {
            "model": copy.deepcopy(model.state_dict()), "optimizer": copy.deepcopy(opt.state_dict()),
            "generator": gen.get_state(), "best_score": best_score, "best_state": best_state,
            "best_epoch": best_epoch, "bad": bad, "step": step, "history": list(history), "epoch": epoch,
        }

    for epoch in range(start, cfg.epochs + 1):
        model.train()
        total, seen = 0.0, 0
        for rows in epoch_rows(train_rows, cfg.batch_size, gen, device):
            opt.zero_grad(set_to_none=True)
            xb = x[rows]
            if cfg.augment_shift:
                xb = random_roll(xb, cfg.augment_shift, gen)
            batch_loss = objective(model(xb), rows, step)
            batch_loss.backward()
            opt.step()
            total += float(batch_loss.detach()) * len(rows)
            seen += len(rows)
            step += 1
        with torch.no_grad():
            model.eval()
            hold = hold_rows.to(device)
            logits = model(x[hold])
            hold_loss = float(objective(logits, hold, total_steps))
            hold_agree = float((logits.argmax(-1) == t[hold].argmax(-1)).float().mean())
            rec = {"epoch": epoch, "train_loss": total / seen, "holdout_loss": hold_loss, "holdout_agreement": hold_agree}
            if oracle:
                rec["holdout_gold_acc"] = float((logits.argmax(-1).cpu() == y_gold[hold_rows]).float().mean())
        score = -rec["holdout_gold_acc"] if oracle else hold_loss
        history.append(rec)
        if cfg.selection == "last":  # no selection: the last epoch's weights, whatever the loss says
            best_score, best_epoch, bad = score, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        elif score < best_score - 1e-6:
            best_score, best_epoch, bad = score, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            bad += 1
        rec["best_epoch"] = best_epoch
        if on_epoch is not None:
            on_epoch(rec, checkpoint)
        if bad >= cfg.patience:
            break
    model.load_state_dict(best_state)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    model.eval()
    return TrainResult(state, best_epoch, len(history), count_params(model), time.perf_counter() - t0, history)


def load_student(cfg: StudentConfig, state: dict, in_dim: int, n_classes: int) -> torch.nn.Module:
    model = build_model(cfg.model, in_dim, n_classes)
    model.load_state_dict(state)
    return model


# --- what the student learns from ------------------------------------------------------


def _floored_log(t: torch.Tensor, log_floor: float) -> torch.Tensor:
    return t.clamp_min(math.exp(log_floor)).log()


def _hard(labels: dict[str, torch.Tensor], log_floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    hard = torch.nn.functional.one_hot(labels["t_dual"].argmax(-1), labels["t_dual"].shape[1]).float()
    return hard, _floored_log(hard, log_floor)


# name (the config's `student.targets`) → (probabilities, log-probabilities) from the labels table
TARGETS: dict[str, Callable[[dict[str, torch.Tensor], float], tuple[torch.Tensor, torch.Tensor]]] = {
    "dual_mean": lambda labels, log_floor: (labels["t_dual"], labels["logt_dual"]),
    "arith_mean": lambda labels, log_floor: (labels["t_arith"], _floored_log(labels["t_arith"], log_floor)),
    "single": lambda labels, log_floor: (labels["t_single"], labels["logt_single"]),
    "hard": _hard,  # the dual mean's argmax, one-hot
}


# the label-table columns each target reads: a student task reads only these, with `id`, `x`
# and `logt_dual` (misfit against the dual mean): 248 of a row's 380 bytes at 40 features, C = 10
TARGET_COLUMNS: dict[str, tuple[str, ...]] = {
    "dual_mean": ("t_dual", "logt_dual"),
    "arith_mean": ("t_arith",),
    "single": ("t_single", "logt_single"),
    "hard": ("t_dual",),
}


def label_columns(target: str | None, *extra: str) -> list[str]:
    """The label-table columns a student on `target` needs (None: the ceiling, or a target given
    as tensors), and `extra` ones, each once."""
    return list(dict.fromkeys(["id", "x", "logt_dual", *TARGET_COLUMNS.get(target or "", ()), *extra]))


def target_of(labels: dict[str, torch.Tensor], target: str, log_floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities, log-probabilities) of the student's chosen target."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; targets: {sorted(TARGETS)}")
    return TARGETS[target](labels, log_floor)
