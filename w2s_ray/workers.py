"""What runs inside Ray workers: the pack-training actor, the student task (the student recipe,
`student.recipe`, in a task) and the label-block task (the Tune trial is in `trial`, which needs
Ray Tune).

They live apart from the stage modules so that a worker imports only what it runs: Ray core,
torch, pydantic and the math modules, not pandas, Ray Data, matplotlib, TensorBoard or the
dataset packages the driver's stages use. Every worker process that unpickles one of these
functions imports this module: measured on 2 cores, importing it costs 0.4 s beyond Ray
and torch, where importing the stage modules that used to hold them cost 1.1–1.4 s.
"""

from __future__ import annotations

import gc
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import ray
import torch

from w2s_ray.artifacts import ROW_GROUP
from w2s_ray.config import TeachersConfig
from w2s_ray.embedfiles import EncodeParts
from w2s_ray.labelfiles import STAT_COLUMNS, labels_table
from w2s_ray.packfiles import PRED_SPLITS, pack_ids, single_teacher, split_posterior, write_pack
from w2s_ray.packs import LOG_PROB_ROWS, TeacherPack, teacher_indices, teacher_seed
from w2s_ray.raytools import epoch_printer, gpu_device
from w2s_ray.results import Split, TeacherStage
from w2s_ray.storage import RunDir
from w2s_ray.student import recipe
from w2s_ray.student.core import TrainResult
from w2s_ray.student.recipe import StudentJob, TestSplit, Trained

MIN_PACK = 2  # smaller packs are padded with copies of their teachers (see fit_pack)


# --- embed ---------------------------------------------------------------------------------


class EncoderActor(EncodeParts):
    """An actor of the embed stage's Ray Data pool (`embed.stage_embed`): `EncodeParts` on the
    GPU Ray gave it, if any."""

    def __init__(self, enc: dict, run: RunDir, stage: Path, threads: int) -> None:
        super().__init__(enc, run, stage, threads, gpu_device())


# --- teachers ------------------------------------------------------------------------------


def teacher_view(x: np.ndarray, cfg: TeachersConfig) -> np.ndarray:
    """The teachers' view of the inputs (weak, transfer and test alike)."""
    if cfg.view.kind == "full":
        return x
    out = np.zeros_like(x)
    sl = slice(cfg.view.start, cfg.view.start + cfg.view.length)
    out[:, sl] = x[:, sl]
    return out


PRED_BYTES = 32 * 2**20
"""Bytes of float32 log-probs per block of a pack's predictions (`pred_rows`)."""

def pred_rows(k: int, c: int) -> int:
    """Rows per block of a pack's predictions for k teachers and c classes: `[k, rows, C]`
    float32 in about `PRED_BYTES`, so a pack worker's memory for predicting, summing and
    writing is a few such blocks whatever N is (a fixed 65,536 rows held `[64, 65536, 10]`
    several times over, 2.5–2.7 GB per pack actor at N = 100k). At least `LOG_PROB_ROWS`."""
    return max(1, PRED_BYTES // (4 * k * c * LOG_PROB_ROWS)) * LOG_PROB_ROWS


def fit_pack(data: dict[str, np.ndarray], cfg: TeachersConfig, n_classes: int, teacher_ids: list[int], device: str = "cpu") -> tuple[TeacherPack, dict[str, Any]]:
    """Train one pack in this process: (the pack, its metadata: ids, seeds, steps, weak accuracy)."""
    # arrays from the object store are read-only; torch.tensor copies them into writable memory
    x_weak = torch.tensor(teacher_view(data["x_weak"], cfg))
    y_weak = torch.tensor(data["y_weak"])
    n, k = len(y_weak), len(teacher_ids)
    # A teacher must not depend on its pack's size, or a resumed, extended or re-planned
    # ensemble would differ from one trained at once (the pack plan follows the CPU count).
    # Measured: with Adam's foreach kernels (`packs.make_adam`) MLP and logistic teachers are
    # bitwise equal in packs of 1 to 64, CNN teachers in packs of 2 to 64; one CNN teacher alone
    # takes another convolution path (4.8e-7 off in log p). So a pack of one trains beside a
    # copy of its teacher, whose outputs are dropped.
    ids = (list(teacher_ids) * MIN_PACK)[: max(k, MIN_PACK)]
    seeds = [teacher_seed(cfg.seed, t) for t in ids]
    index_sets = [teacher_indices(cfg.resample, n, cfg.k, t, s, cfg.seed) for t, s in zip(ids, seeds)]
    pack = TeacherPack(cfg.model, x_weak.shape[1], n_classes, seeds, device=device, compile=cfg.resources.compile)
    steps = pack.fit(x_weak, y_weak, index_sets, cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight_decay) // len(ids) * k
    acc_weak = (pack.log_probs(x_weak).numpy()[:k].argmax(-1) == data["y_weak"][None]).mean(1).tolist()
    return pack, {"teacher_ids": list(teacher_ids), "seeds": seeds[:k], "steps": steps, "acc_weak": acc_weak}


def pack_log_probs(pack: TeacherPack, x: np.ndarray | Iterable[np.ndarray], cfg: TeachersConfig, k: int, n_classes: int) -> Iterator[np.ndarray]:
    """The pack's first `k` teachers' log-probs on `x` (an array, or its consecutive spans of
    rows, `Split.spans`), `[k, rows, C]` block after block (`pred_rows` of the whole pack, whose
    every teacher is predicted)."""
    rows = pred_rows(pack.k, n_classes)
    for span in ([x] if isinstance(x, np.ndarray) else x):
        for r0 in range(0, len(span), rows):
            yield pack.log_probs(torch.tensor(teacher_view(span[r0 : r0 + rows], cfg)), LOG_PROB_ROWS).numpy()[:k]


def train_pack_local(data: dict[str, np.ndarray], cfg: TeachersConfig, n_classes: int, teacher_ids: list[int], device: str = "cpu") -> dict[str, Any]:
    """Train one pack in this process and return it with its whole `[k, N, C]` log-probs per
    split (tests and benchmarks; the actors write theirs block by block instead)."""
    t0 = time.perf_counter()
    pack, out = fit_pack(data, cfg, n_classes, teacher_ids, device)
    k = len(teacher_ids)
    for split in PRED_SPLITS:
        out[f"logp_{split}"] = np.concatenate(list(pack_log_probs(pack, data[f"x_{split}"], cfg, k, n_classes)), 1)
    out["acc_test"] = (out["logp_test"].argmax(-1) == data["y_test"][None]).mean(1).tolist()
    out["seconds"] = time.perf_counter() - t0
    return out


class PackTrainer:
    """Trains pack after pack on its CPU or GPU; stateless between packs, so a restarted
    actor (after a node loss) retries its pack with nothing to recover. A plain class: the
    executor makes it a Ray actor (`executor.RayExecutor.actor`) or an object in this process."""

    def __init__(self, threads: int):
        self.threads = max(1, threads)
        torch.set_num_threads(self.threads)
        self.device = gpu_device()
        self.in_actor = ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None
        self.node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "this process"
        self.inputs: dict[Path, dict[str, np.ndarray]] = {}
        if self.in_actor:
            # What the process imported (Ray, torch, pyarrow: about 220,000 objects) lives
            # as long as the actor: out of the garbage collector's sight, a full collection walks
            # only the packs' own objects. Measured on 2 cores, packs of 128 MLP teachers: without
            # it a full collection took 0.13-0.15 s, in the first pack and in 2 of 6 packs in a row;
            # with it 0.01-0.02 s. Only in an actor, whose process is its own: in a driver (an
            # in-process "actor") objects the run frees later would never be collected.
            gc.freeze()

    def data(self, run: RunDir, data_dir: Path) -> dict[str, np.ndarray]:
        """The weak and test splits, read from the data stage's files once per actor (fetched from
        the run's store on a node that lacks them): nothing per-row comes from the driver. The
        transfer split, the large one, is read span by span as each pack predicts it (`train`)."""
        if data_dir not in self.inputs:
            out: dict[str, Any] = {}
            for name in ("weak", "test"):
                split = Split.read(run.need(data_dir / f"{name}.parquet", f"the data stage's {name} split"))
                out[f"x_{name}"], out[f"y_{name}"] = split.teacher_x, split.y  # the teachers' features
            self.inputs = {data_dir: out}
        return self.inputs[data_dir]

    def train(self, data_dir: Path, cfg_json: dict, n_classes: int, pack_index: int, teacher_ids: list[int], run: RunDir, stage: Path) -> dict[str, Any]:
        """Train a pack, write its files into the run's store from here, return its metadata
        (ids, seeds, accuracies, timings: a few hundred bytes, never its predictions)."""
        torch.set_num_threads(self.threads)  # again: an in-process "actor" shares its process's setting (`executor.InProcess`)
        data = self.data(run, data_dir)
        cfg = TeachersConfig.model_validate(cfg_json)
        t0 = time.perf_counter()
        pack, out = fit_pack(data, cfg, n_classes, teacher_ids, self.device)
        # provenance: a pack trained by an actor Ray restarted after losing it (a node died);
        # Ray 2.60 deprecates the property with a warning per actor but offers no replacement
        restarted = False
        if self.in_actor:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                restarted = ray.get_runtime_context().was_current_actor_reconstructed
        out.update(pack=pack_index, node=self.node, device=self.device, restarted=restarted)
        inputs = {"transfer": Split.spans(run.need(data_dir / "transfer.parquet", "the data stage's transfer split")), "test": data["x_test"]}
        blocks = {split: pack_log_probs(pack, inputs[split], cfg, len(teacher_ids), n_classes) for split in PRED_SPLITS}
        out["seconds"] = time.perf_counter() - t0  # training; the blocks are predicted while written
        return write_pack(run, stage, out, cfg.keep_predictions, blocks, data["y_test"])



# --- students ------------------------------------------------------------------------------


def student_task(job: StudentJob, test: TestSplit, threads: int = 1) -> Trained:
    """Train and evaluate one student in a Ray task that reads its own labels (`job.src`): the
    recipe (`student.recipe`) on this worker's CPU or GPU."""
    torch.set_num_threads(max(1, threads))
    device = gpu_device()
    inputs = recipe.read_inputs(job, test)
    show = epoch_printer(job.name, job.cfg.epochs)
    return recipe.finish(inputs, recipe.train(inputs, device, on_epoch=lambda rec, _: show(rec)), device)


def student_pack_task(jobs: list[StudentJob], test: TestSplit, threads: int = 1) -> list[Trained]:
    """Train and evaluate the students of `jobs` (one target, seeds apart; `student.pack`) as
    one pack in a Ray task, the labels read once (`recipe.read_pack_inputs`); each member is
    evaluated alone, as a student trained alone would be."""
    torch.set_num_threads(max(1, threads))
    device = gpu_device()
    inputs = recipe.read_pack_inputs(jobs, test)
    show = epoch_printer(f"{jobs[0].name} seeds {jobs[0].cfg.seed}–{jobs[-1].cfg.seed} (a pack)", jobs[0].cfg.epochs)
    shown = [0]

    def on_epoch(m: int, rec: dict) -> None:  # one line per epoch for the pack: its first running member's
        if rec["epoch"] > shown[0]:
            shown[0] = rec["epoch"]
            show(rec)

    results = recipe.train_pack(inputs, device, on_epoch=on_epoch)
    return [recipe.finish(i, r, device) for i, r in zip(inputs, results)]


def evaluate_task(job: StudentJob, res: TrainResult, test: TestSplit, threads: int = 1) -> Trained:
    """Evaluate a student trained elsewhere (across Ray Train workers); runs in a Ray task."""
    torch.set_num_threads(max(1, threads))
    return recipe.finish(recipe.read_inputs(job, test), res, "cpu")


# --- labels --------------------------------------------------------------------------------


def label_block(run: RunDir, data_dir: Path, teachers: TeacherStage, single: int, n_classes: int, rows: tuple[int, int], out: Path) -> dict[str, Any]:
    """One block of the pseudo-label table, in a Ray task: rows [r0, r1) of the transfer split,
    each pack's stored sums for those rows, the designated single teacher's rows; the posterior
    (`PosteriorAccumulator.finalize`) and the labels part written into the run's store from here.
    Returns the block's size, K and its summed statistics, never rows. Memory: a few
    `[rows, C]` arrays, whatever N and K are."""
    tr = Split.read(run.need(data_dir / "transfer.parquet", "the data stage's transfer split"), rows, teacher_features=False)
    run.need(teachers.dir / "teachers.parquet", "the teachers stage's table")
    packs = pack_ids(teachers)  # read once for both
    acc = split_posterior(teachers, "transfer", rows[1], n_classes, rows, run, packs)
    post = acc.finalize()
    post["single_log"] = single_teacher(teachers, "transfer", single, rows, run, packs)
    run.write_parquet(out, labels_table(tr.ids, tr.x, post), ROW_GROUP)
    run.seal(out.parent.parent, out.stem, [out])  # a resumed labels stage keeps the part only if it still matches
    return {"rows": len(tr.ids), "k": acc.k, **{f"sum_{s}": float(post[s].numpy().astype(np.float64).sum()) for s in STAT_COLUMNS}}  # as labels.label_parts sums a kept part
