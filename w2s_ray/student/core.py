"""The one student training loop, for one process or for N data-parallel workers. No Ray.

`fit(cfg, world, ...)` is the epoch loop: zero_grad / loss / backward / step over the world's
batches, then the held-out score, the selection rule (`student.selection`), patience, a record
per epoch (`on_epoch`, through which Tune reports and checkpoints) and resume from such a
checkpoint. Everything that differs between "one task" and "rank r of N Ray Train workers" is
the `World`: its rank and size, how it wraps the model (DDP across workers), where its batches
come from and where it runs.

- `InMemory` holds the training rows and draws a random order each epoch; the whole global batch
  of `student.batch_size` rows is drawn by every rank from the same generator, and rank r trains
  on its contiguous 1/N of it, so N workers take the same steps as one process (DDP averages
  their gradients). At size 1 this is the `workers: 1` student task, draw for draw.
- The Ray Train world's stream source (`student.input: stream`, in `ray_train`) reads each
  worker's shard of a Ray Data stream through a local shuffle buffer instead.

Early stopping looks only at a held-out slice of the *transfer* split: by default the training
objective against the teacher targets there (no gold label used), or, with `selection: oracle`,
gold accuracy on that slice. Every rank scores the whole slice and holds the same weights after
each all-reduce, so all ranks take the same decision without talking.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

import torch

from w2s_ray.adam import Adam
from w2s_ray.config import StudentConfig
from w2s_ray.losses import log_softmax, student_loss
from w2s_ray.models import build_model, count_params


@dataclass
class TrainResult:
    """What the loop returns: the selected weights and the record. A student evaluated and
    saved is a `results.StudentResult`."""

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


def draw_shifts(n: int, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """`[n, 1]` circular shifts in [-max_shift, max_shift], one per row."""
    return torch.randint(-max_shift, max_shift + 1, (n, 1), generator=gen)


def roll_rows(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Roll each row of `x` by its own shift (MNIST-1D's translations are circular rolls, so the
    label is unchanged). A student made shift-invariant this way cannot copy errors a teacher
    makes because of where a pattern sits."""
    length = x.shape[1]
    idx = (torch.arange(length, device=x.device).unsqueeze(0) - shift.to(x.device)) % length
    return x.gather(1, idx)


def random_roll(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Roll each row by its own random shift drawn from `gen`."""
    return roll_rows(x, draw_shifts(len(x), max_shift, gen))


@torch.no_grad()
def predict_log(model: torch.nn.Module, x: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    model.eval()
    dev = next(model.parameters()).device
    out = [log_softmax(model(x[s : s + chunk].to(dev))).cpu() for s in range(0, len(x), chunk)]
    return torch.cat(out)


def loss_options(cfg: StudentConfig, step: int, total_steps: int, threshold: float) -> dict[str, Any]:
    """The loss knobs at a training step: the aux weight ramps up over `aux_warmup` of training,
    and the reverse-CE weight is 0 for the first `rce_warmup` (a forward-CE warm-up). The
    held-out score is taken at `total_steps`, with the full λ, in every world."""
    return {
        "lam": cfg.rce_weight if step >= cfg.rce_warmup * total_steps else 0.0,
        "alpha": cfg.sym_alpha, "beta": cfg.sym_beta, "threshold": threshold,
        "aux_alpha": cfg.aux_alpha * min(1.0, step / max(1.0, cfg.aux_warmup * total_steps)),
        "aux_soft": cfg.aux_target == "soft", "log_floor": cfg.log_floor,
    }


# --- worlds ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Holdout:
    """The held-out transfer slice a world scores after each epoch: inputs, the student's
    target there (probabilities and logs), the dual posterior mean (for `val_teacher_ce`) and,
    for `selection: oracle`, the gold labels."""

    x: torch.Tensor
    t: torch.Tensor
    log_t: torch.Tensor
    dual: torch.Tensor
    gold: torch.Tensor | None = None

    def to(self, device: str) -> "Holdout":
        gold = None if self.gold is None else self.gold.to(device)
        return Holdout(self.x.to(device), self.t.to(device), self.log_t.to(device), self.dual.to(device), gold)


Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]  # (inputs, target probabilities, their logs, row weights or None), on the device


def row_weights(cfg: StudentConfig, variance: torch.Tensor) -> torch.Tensor | None:
    """`student.weighting`: per-row weights of the training loss from the teachers' variance on
    each transfer row (mean KL(dual mean ‖ teacher), no gold label), scaled to mean 1 over the
    rows so that the learning rate means what it meant unweighted; None for `none`.

    - `variance`: exp(−V_i / mean V). Its only scale is the data's own mean variance: a row at
      the mean counts e⁻¹ of an undisputed one, no constant to tune.
    - `drop_disputed`: 0 for the `drop_frac` of rows with the highest V_i (ties at the cut
      kept), 1 for the rest."""
    if cfg.weighting == "none":
        return None
    v = variance.double()
    if cfg.weighting == "variance":
        w = torch.exp(-v / v.mean().clamp_min(1e-12))
    else:
        w = (v <= torch.quantile(v, 1 - cfg.drop_frac)).double()
    return (w / w.mean()).float()


class World(Protocol):
    """Where one student trains: one process (`InMemory`), or rank `rank` of `size` Ray Train
    workers (`ray_train.TrainWorld`)."""

    rank: int
    size: int
    device: str
    holdout: Holdout
    steps_per_epoch: int
    gen: torch.Generator  # this rank's random draws (order, augmentation); saved for resume

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module: ...

    def batches(self, epoch: int) -> Iterator[Batch]: ...


class InMemory:
    """Training rows held in memory, a fresh random order every epoch, `batch_size` rows a step
    (the last global batch may be short; at size N one shorter than N rows is dropped, so every
    rank takes the same number of steps). Rank r of N trains on rows [r/N, (r+1)/N) of each
    global batch, with the global batch's augmentation draws: one generator, seeded the same on
    every rank, draws the order and the shifts, so the ranks stay in step without talking."""

    def __init__(self, cfg: StudentConfig, x: torch.Tensor, t: torch.Tensor, log_t: torch.Tensor, train_rows: torch.Tensor,
                 holdout: Holdout, device: str = "cpu", rank: int = 0, size: int = 1, wrap: Callable | None = None,
                 weights: torch.Tensor | None = None):
        self.cfg, self.rank, self.size, self.device = cfg, rank, size, device
        self.x, self.t, self.log_t = x.to(device), t.to(device), log_t.to(device)
        self.w = None if weights is None else weights.to(device)
        self.train_rows, self.holdout = train_rows, holdout.to(device)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        n, b = len(train_rows), cfg.batch_size
        self.steps_per_epoch = -(-n // b) if size == 1 or n % b == 0 or n % b >= size else n // b
        self._wrap = wrap

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return self._wrap(model) if self._wrap is not None else model

    def batches(self, epoch: int) -> Iterator[Batch]:
        perm = self.train_rows[torch.randperm(len(self.train_rows), generator=self.gen)].to(self.device)
        for s in range(0, self.steps_per_epoch * self.cfg.batch_size, self.cfg.batch_size):
            rows = perm[s : s + self.cfg.batch_size]
            shift = draw_shifts(len(rows), self.cfg.augment_shift, self.gen) if self.cfg.augment_shift else None
            if self.size > 1:
                part = torch.arange(len(rows)).tensor_split(self.size)[self.rank]
                rows, shift = rows[part.to(rows.device)], None if shift is None else shift[part]
            xb = self.x[rows]
            yield (xb if shift is None else roll_rows(xb, shift)), self.t[rows], self.log_t[rows], None if self.w is None else self.w[rows]


def in_memory(cfg: StudentConfig, x: torch.Tensor, t: torch.Tensor, log_t: torch.Tensor, dual: torch.Tensor | None = None,
              gold: torch.Tensor | None = None, device: str = "cpu", rank: int = 0, size: int = 1, wrap: Callable | None = None,
              weights: torch.Tensor | None = None) -> InMemory:
    """The in-memory world of a student on the transfer rows `x` with targets `t`/`log_t`:
    `student.holdout_frac` of them held out (`holdout_split`); `dual`: the dual posterior mean
    (default `t`); `gold`: the transfer gold labels (read only for `selection: oracle`);
    `weights`: the training loss's per-row weights (`row_weights`)."""
    train_rows, hold = holdout_split(len(x), cfg.holdout_frac, cfg.seed)
    dual = t if dual is None else dual
    holdout = Holdout(x[hold], t[hold], log_t[hold], dual[hold], None if gold is None else gold[hold])
    return InMemory(cfg, x, t, log_t, train_rows, holdout, device, rank, size, wrap, weights)


# --- the loop --------------------------------------------------------------------------------


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def fit(
    cfg: StudentConfig,
    world: World,
    in_dim: int,
    n_classes: int,
    *,
    loss: str | None = None,
    threshold: float | None = None,
    on_epoch: Callable[[dict, Callable[[], dict]], None] | None = None,
    resume: dict | None = None,
) -> TrainResult:
    """Train a student in `world`; its selected weights and per-epoch record.

    `loss` overrides `cfg.loss` (the gold ceiling trains with forward CE on one-hot labels);
    `threshold` overrides `cfg.adaptive_threshold` (an `adaptive_quantile` resolved by the
    caller over the training rows). Each epoch's record has `epoch`, `train_loss` (this rank's),
    `holdout_loss` (the objective at the full λ), `holdout_agreement`, `val_teacher_ce`
    (CE against the dual posterior mean on the held-out slice), `holdout_gold_acc` (oracle
    selection) and `best_epoch`. `on_epoch(record, checkpoint)` is called after every epoch;
    `checkpoint()` returns everything needed to continue, and `resume` takes that back.
    """
    t0 = time.perf_counter()
    loss_name = loss or cfg.loss
    threshold = cfg.adaptive_threshold if threshold is None else threshold
    hold = world.holdout
    oracle = cfg.selection == "oracle"
    if oracle and hold.gold is None:
        raise ValueError("selection='oracle' needs the transfer split's gold labels")
    torch.manual_seed(cfg.seed)
    model = world.wrap(build_model(cfg.model, in_dim, n_classes).to(world.device))
    opt = Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)  # torch's Adam, without torch._dynamo
    total_steps = world.steps_per_epoch * cfg.epochs

    def objective(logits, t, log_t, step, w=None):
        per_row = student_loss(loss_name, logits, t, log_t, **loss_options(cfg, step, total_steps, threshold))
        return per_row.mean() if w is None else (per_row * w).mean()

    best_score, best_state, best_epoch, bad, step, start, epoch = float("inf"), None, 0, 0, 0, 1, 0
    history: list[dict] = []
    if resume is not None:
        unwrap(model).load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        world.gen.set_state(resume["generator"])
        best_score, best_state, best_epoch = resume["best_score"], resume["best_state"], resume["best_epoch"]
        bad, step, history = resume["bad"], resume["step"], list(resume["history"])
        start = resume["epoch"] + 1
        if bad >= cfg.patience:  # it had already stopped early
            start = cfg.epochs + 1

    def checkpoint() -> dict:
        return {
            "model": copy.deepcopy(unwrap(model).state_dict()), "optimizer": copy.deepcopy(opt.state_dict()),
            "generator": world.gen.get_state(), "best_score": best_score, "best_state": best_state,
            "best_epoch": best_epoch, "bad": bad, "step": step, "history": list(history), "epoch": epoch,
        }

    for epoch in range(start, cfg.epochs + 1):
        model.train()
        total, seen = 0.0, 0
        for xb, tb, log_tb, wb in world.batches(epoch):
            opt.zero_grad(set_to_none=True)
            batch_loss = objective(model(xb), tb, log_tb, step, wb)
            batch_loss.backward()
            opt.step()
            total += float(batch_loss.detach()) * len(xb)
            seen += len(xb)
            step += 1
        with torch.no_grad():
            model.eval()
            logits = model(hold.x)
            rec = {
                "epoch": epoch, "train_loss": total / max(seen, 1),
                "holdout_loss": float(objective(logits, hold.t, hold.log_t, total_steps)),
                "holdout_agreement": float((logits.argmax(-1) == hold.t.argmax(-1)).float().mean()),
                "val_teacher_ce": float(-(hold.dual * log_softmax(logits)).sum(-1).mean()),
            }
            if oracle:
                rec["holdout_gold_acc"] = float((logits.argmax(-1) == hold.gold).float().mean())
        score = -rec["holdout_gold_acc"] if oracle else rec["holdout_loss"]
        history.append(rec)
        if cfg.selection == "last":  # no selection: the last epoch's weights, whatever the loss says
            best_score, best_epoch, bad = score, epoch, 0
            best_state = copy.deepcopy(unwrap(model).state_dict())
        elif score < best_score - 1e-6:
            best_score, best_epoch, bad = score, epoch, 0
            best_state = copy.deepcopy(unwrap(model).state_dict())
        else:
            bad += 1
        rec["best_epoch"] = best_epoch
        if on_epoch is not None:
            on_epoch(rec, checkpoint)
        if bad >= cfg.patience:
            break
    net = unwrap(model)
    net.load_state_dict(best_state)
    net.eval()
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    return TrainResult(state, best_epoch, len(history), count_params(net), time.perf_counter() - t0, history)


def fit_pack(
    cfgs: list[StudentConfig],
    worlds: list[InMemory],
    in_dim: int,
    n_classes: int,
    *,
    loss: str | None = None,
    thresholds: list[float] | None = None,
    on_epoch: Callable[[int, dict], None] | None = None,
) -> list[TrainResult]:
    """`fit` for S students of one model that differ only in their seed, trained as one pack
    (`student.pack`): their parameters stacked, one `vmap`ped step through autograd, one Adam
    over the stacked tensors (elementwise, so each member has its own moments). Member m runs on
    `worlds[m]` (its seed's held-out slice, batch order, augmentation draws, targets and row
    weights) with `thresholds[m]`, from the initial weights `fit` gives its seed, and has its
    own record, early stopping and best weights. A member that has stopped keeps stepping with
    the others until the last one stops: what it returns (its record up to its stop, its best
    weights) is not changed by those steps, and its bits depend only on its own inputs and its
    place in a pack of S, never on its pack-mates' values or when they stop (so its cache key
    needs no more). Taking stopped members out of the stack was tried: no measurable gain on
    the default run, where members mostly run every epoch, and a member's bits would then
    depend on when the others stop. Each member's `seconds` is the pack's over S.

    Not the same bits as `fit` (batched GEMMs instead of one student's); the same bits each
    time the same pack trains. `on_epoch(m, record)` after each epoch of a running member.
    Measured on 1 thread (`benchmarks/bench_student_pack.py`, 10 students, every step): 2.44x
    the students one after another with `fit` for an MLP of 64 x 2, 1.36x for the default CNN,
    1.22x for an MLP of 256 x 2; the default run's student stage on 2 CPUs 1.74x (MLP 64 x 2)
    and 1.44x (CNN). The vmapped step amortizes the loop's per-step work over the members."""
    t0 = time.perf_counter()
    cfg = cfgs[0]
    if any(c.model_copy(update={"seed": cfg.seed}) != cfg for c in cfgs):
        raise ValueError("a student pack's members differ only in their seed")
    if len({w.steps_per_epoch for w in worlds}) != 1 or any(w.size != 1 for w in worlds):
        raise ValueError("a student pack's members take the same number of steps, each in one process")
    S = len(cfgs)
    loss_name = loss or cfg.loss
    thresholds = [cfg.adaptive_threshold] * S if thresholds is None else list(thresholds)
    oracle = cfg.selection == "oracle"
    holds = [w.holdout for w in worlds]
    if oracle and any(h.gold is None for h in holds):
        raise ValueError("selection='oracle' needs the transfer split's gold labels")
    models = []
    for c in cfgs:  # each member's initial weights are the ones `fit` draws for its seed
        torch.manual_seed(c.seed)
        models.append(build_model(c.model, in_dim, n_classes))
    stacked, buffers = torch.func.stack_module_state(models)
    if buffers:
        raise ValueError(f"a student pack needs a model without buffers ({cfg.model.name} has {sorted(buffers)})")
    device = worlds[0].device
    params = {k: v.detach().to(device).requires_grad_() for k, v in stacked.items()}
    base = copy.deepcopy(models[0]).to("meta")
    batched = torch.vmap(lambda p, x: torch.func.functional_call(base, p, (x,)))
    opt = Adam(list(params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total_steps = worlds[0].steps_per_epoch * cfg.epochs

    def per_member(logits, t, log_t, step, w=None):
        """Each member's mean loss `[S]` (row weights `[S, B]` or None)."""
        b = logits.shape[1]
        thr = thresholds[0] if len(set(thresholds)) == 1 else torch.tensor(thresholds, device=logits.device).repeat_interleave(b)
        rows = student_loss(loss_name, logits.flatten(0, 1), t.flatten(0, 1), log_t.flatten(0, 1), **loss_options(cfg, step, total_steps, thr)).view(S, b)
        return rows.mean(1) if w is None else (rows * w).mean(1)

    hold_x, hold_t, hold_log_t, hold_dual = (torch.stack([getattr(h, a) for h in holds]) for a in ("x", "t", "log_t", "dual"))
    hold_gold = torch.stack([h.gold for h in holds]) if oracle else None
    best_score, best_state, best_epoch, bad = [float("inf")] * S, [None] * S, [0] * S, [0] * S
    history: list[list[dict]] = [[] for _ in range(S)]
    running = list(range(S))
    step = 0
    for epoch in range(1, cfg.epochs + 1):
        total, seen = torch.zeros(S, dtype=torch.float64), 0
        for parts in zip(*(w.batches(epoch) for w in worlds)):
            xb, tb, log_tb = (torch.stack([p[i] for p in parts]) for i in range(3))
            wb = None if parts[0][3] is None else torch.stack([p[3] for p in parts])
            opt.zero_grad(set_to_none=True)
            member = per_member(batched(params, xb), tb, log_tb, step, wb)
            member.sum().backward()  # the sum of the members' mean losses: each gets its own gradient
            opt.step()
            total += member.detach().double().cpu() * xb.shape[1]
            seen += xb.shape[1]
            step += 1
        with torch.no_grad():
            logits = batched(params, hold_x)
            hold_loss = per_member(logits, hold_t, hold_log_t, total_steps)
            agreement = (logits.argmax(-1) == hold_t.argmax(-1)).float().mean(1)
            teacher_ce = -(hold_dual * log_softmax(logits)).sum(-1).mean(1)
            gold_acc = (logits.argmax(-1) == hold_gold).float().mean(1) if oracle else None
        for m in list(running):
            rec = {"epoch": epoch, "train_loss": float(total[m]) / max(seen, 1), "holdout_loss": float(hold_loss[m]),
                   "holdout_agreement": float(agreement[m]), "val_teacher_ce": float(teacher_ce[m])}
            if oracle:
                rec["holdout_gold_acc"] = float(gold_acc[m])
            score = -rec["holdout_gold_acc"] if oracle else rec["holdout_loss"]
            if cfg.selection == "last" or score < best_score[m] - 1e-6:
                best_score[m], best_epoch[m], bad[m] = score, epoch, 0
                best_state[m] = {k: v[m].detach().cpu().clone() for k, v in params.items()}
            else:
                bad[m] += 1
            rec["best_epoch"] = best_epoch[m]
            history[m].append(rec)
            if on_epoch is not None:
                on_epoch(m, rec)
            if bad[m] >= cfg.patience:
                running.remove(m)
        if not running:
            break
    n_params = count_params(models[0])
    seconds = (time.perf_counter() - t0) / S
    return [TrainResult(best_state[m], best_epoch[m], len(history[m]), n_params, seconds, history[m]) for m in range(S)]


def train_student(cfg: StudentConfig, x: torch.Tensor, t: torch.Tensor, log_t: torch.Tensor, n_classes: int, *, loss: str | None = None,
                  y_gold: torch.Tensor | None = None, dual: torch.Tensor | None = None, device: str = "cpu",
                  on_epoch: Callable[[dict, Callable[[], dict]], None] | None = None, resume: dict | None = None) -> TrainResult:
    """`fit` in one process on in-memory rows (tests, benchmarks and studies): targets `t` with
    logs `log_t`; `adaptive_quantile` resolved over the training rows here."""
    world = in_memory(cfg, x, t, log_t, dual, y_gold, device)
    return fit(cfg, world, x.shape[1], n_classes, loss=loss, threshold=quantile_threshold(cfg, t, world.train_rows), on_epoch=on_epoch, resume=resume)


def quantile_threshold(cfg: StudentConfig, t: torch.Tensor, train_rows: torch.Tensor) -> float:
    """The confidence threshold: `adaptive_quantile` of the training rows' target maxima, else
    `adaptive_threshold`."""
    if cfg.adaptive_quantile is None:
        return cfg.adaptive_threshold
    return float(torch.quantile(t[train_rows].amax(-1).float().cpu(), cfg.adaptive_quantile))


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
