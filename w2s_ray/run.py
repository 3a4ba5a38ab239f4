"""The run context and the typed results the stages hand each other.

`RunContext` is created once per command (`run`, a stage, `tune`, a study) by `pipeline` and
passed explicitly to every stage function: the config, its per-stage cache keys, the run
directory with its store, the teacher actor pool (released when the context closes) and the
log. Nothing about a run lives in a module global.

Each stage returns a typed result (`DataStage`, `TeacherStage`, `LabelStage`, `StudentStage`)
that the next stage takes as an argument, and the JSON a stage writes (`posterior.json`,
`metrics.json`) is written from and read into one dataclass each (`PosteriorSummary`,
`StudentResult`), so report, Tune and studies read attributes, never string keys.

Imports, for the whole package: every module imports what it depends on at its top, so its
header says what it needs. The math modules (`losses`, `posterior`, `metrics`, `models`,
`packs`, `training`, `theory`) never import Ray (a test enforces it); the Ray layer
(`raytools`, `run` and everything above) imports Ray at the top. Nothing touches CUDA at
import: a worker asks for a device only when Ray gave it a GPU. The one function-level import
is in `cli`, which imports the pipeline only once the config (and search space) validated, so
a bad input answers in seconds instead of waiting for Ray, Tune and the dataset packages; figures
use matplotlib's object API, so no pyplot backend is switched in the caller. Modules form a
stack with no cycles: `config` → math → `storage` → `raytools` → `run` → what Ray workers run
(`workers`, `trial`: kept light, since every worker process imports them) → stages (`data`,
`teachers`, `labels`, `students`) → `report`, `tune`, `studies` → `pipeline` → `cli`; only
`cli` imports `pipeline`.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from w2s_ray import artifacts
from w2s_ray.config import ExperimentConfig, StageKeys
from w2s_ray.metrics import StudentEval
from w2s_ray import worker_setup
from w2s_ray.raytools import ActorPool, init_ray
from w2s_ray.storage import RunDir

def log(msg: str) -> None:
    print(f"[w2s-ray] {msg}", file=sys.stderr, flush=True)


@dataclass
class RunContext:
    """Everything a stage needs besides its inputs; a context manager that releases the actors."""

    cfg: ExperimentConfig
    run: RunDir
    pool: ActorPool = field(default_factory=ActorPool)
    log: Callable[[str], None] = log
    keys: StageKeys = field(init=False)

    def __post_init__(self) -> None:
        self.keys = StageKeys(self.cfg)

    @classmethod
    def open(cls, cfg: ExperimentConfig) -> "RunContext":
        """The run directory is opened (a store's filesystem once, here); Ray is not started."""
        return cls(cfg, RunDir.open(cfg.output.root, cfg.output.name, cfg.output.cache, cfg.output.wait))

    def __enter__(self) -> "RunContext":
        worker_setup.setup_process()  # the driver computes too (the test split's posterior, the studies)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.pool.release()

    def derive(self, cfg: ExperimentConfig) -> "RunContext":
        """The same run (directory, store, actors, log) for a variant of the config, as studies use."""
        if cfg.output != self.cfg.output:
            raise ValueError("a derived context must write to the same run directory")
        return RunContext(cfg, self.run, self.pool, self.log)

    def ray(self) -> None:
        """Start or join Ray: called by a stage that has work for it, never for a cached one."""
        init_ray(self.cfg.ray)


# --- typed stage results -------------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    ids: np.ndarray  # int64 [n], row in the source
    x: np.ndarray  # float32 [n, d]: the student's features (and the teachers', unless `xt`)
    y: np.ndarray  # int64 [n]
    xt: np.ndarray | None = None  # float32 [n, d_t]: the teachers' own features (`data.teacher_features`)

    @property
    def teacher_x(self) -> np.ndarray:
        return self.x if self.xt is None else self.xt

    def table(self) -> pa.Table:
        """The split's Parquet form: `id`, `x` (fixed-size list of float32), `y`, and `xt` when
        the teachers have features of their own."""
        cols = {"id": self.ids, "x": _fixed(self.x), "y": self.y}
        if self.xt is not None:
            cols["xt"] = _fixed(self.xt)
        return pa.table(cols)

    @classmethod
    def read(cls, path: str | Path, rows: tuple[int, int] | None = None, teacher_features: bool = True) -> "Split":
        """A split file, or its rows [r0, r1); without the teachers' own features (`xt`) when
        `teacher_features` is False."""
        columns = None if teacher_features else ["id", "x", "y"]
        t = artifacts.read_rows(path, rows, columns)
        xt = _matrix(t["xt"]) if "xt" in t.column_names else None
        return cls(ids=t["id"].to_numpy(), x=_matrix(t["x"]), y=t["y"].to_numpy().astype(np.int64), xt=xt)


def _fixed(a: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1), type=pa.float32()), a.shape[1])


def _matrix(col) -> np.ndarray:
    x = col.combine_chunks()
    return np.ascontiguousarray(x.flatten().to_numpy().reshape(-1, x.type.list_size).astype(np.float32, copy=False))


class SplitFiles(Mapping):
    """A data stage's splits by name, each read from its Parquet file when first used and then
    kept. The driver reads only the splits it touches: the pipeline's own stages never read the
    transfer split here (teacher actors, label blocks and student tasks read it themselves), so
    the driver's memory does not grow with it."""

    def __init__(self, directory: Path, names: tuple[str, ...]):
        self.dir, self.names, self._read = Path(directory), names, {}

    def path(self, name: str) -> Path:
        return self.dir / f"{name}.parquet"

    def __getitem__(self, name: str) -> Split:
        if name not in self.names:
            raise KeyError(name)
        if name not in self._read:
            self._read[name] = Split.read(self.path(name))
        return self._read[name]

    def loaded(self) -> set[str]:
        """The splits this process has read so far."""
        return set(self._read)

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


@dataclass(frozen=True)
class DataStage:
    dir: Path
    splits: SplitFiles  # weak, transfer, test
    n_classes: int
    in_dim: int
    classes: list[str] | None = None  # names of classes 0..C-1, for a string label column
    sizes: dict[str, int] = field(default_factory=dict)  # rows per split
    teacher_dim: int | None = None  # the teachers' own features' width (`data.teacher_features`); None: in_dim


@dataclass(frozen=True)
class TeacherStage:
    """The first `k` teachers of an ensemble directory (which may hold more: an extended one)."""

    dir: Path
    k: int
    packs: list[int]

    def table(self):
        """Per-teacher rows (teacher_id, seed, pack, node, restarted, acc_test, acc_weak), ids < k."""
        t = pq.read_table(self.dir / "teachers.parquet")
        return t.filter(pc.less(t["teacher_id"], self.k))

    def accuracies(self) -> np.ndarray:
        return self.table()["acc_test"].to_numpy()


@dataclass(frozen=True)
class PosteriorSummary:
    """`posterior.json`: the ensemble's statistics on the test split (variance also on transfer)."""

    k: int
    test_acc_dual: float
    test_acc_arith: float
    test_acc_single: float
    ci_dual: list[float] | None
    ci_arith: list[float] | None
    variance_test: float
    variance_transfer: float
    mutual_info_test: float
    pred_entropy_test: float
    expected_entropy_test: float

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def read(cls, path: Path) -> "PosteriorSummary":
        return cls(**artifacts.read_json(path))


@dataclass(frozen=True)
class LabelStage:
    dir: Path
    posterior: PosteriorSummary


@dataclass(frozen=True)
class StudentResult:
    """`metrics.json` of one student: its evaluation, how it trained, and per-epoch history.
    `target` is the teacher target it learned from; None for the gold-label ceiling."""

    target: str | None
    eval: StudentEval
    best_epoch: int
    epochs_run: int
    n_params: int
    seconds: float
    device: str
    history: list[dict] = field(default_factory=list)
    seed: int = 0  # the replicate's student seed
    teacher: int | None = None  # for the single target: the teacher it learned from

    @property
    def test_acc(self) -> float:
        return self.eval.test_acc

    def to_json(self) -> dict[str, Any]:
        """Flat, as pandas reads it: the evaluation's columns beside the training record."""
        out = dataclasses.asdict(self)
        return {**out.pop("eval"), **out}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "StudentResult":
        names = {f.name for f in dataclasses.fields(StudentEval)}
        rest = {k: v for k, v in d.items() if k not in names}
        return cls(eval=StudentEval(**{k: d[k] for k in names}), **rest)


@dataclass(frozen=True)
class StudentStage:
    """The students of a run: every replicate (`student.seeds`) of every target and of the
    ceiling, in seed order; `students` and `ceiling` are the first replicate's (seed
    `student.seed`, the designated single teacher), as a run with one seed has."""

    students: dict[str, StudentResult]  # by target, in the config's order
    ceiling: StudentResult | None
    replicates: dict[str, list[StudentResult]] = field(default_factory=dict)
    ceilings: list[StudentResult] = field(default_factory=list)
    dirs: dict[tuple[str | None, int], Path] = field(default_factory=dict)  # (target or None, replicate) → its directory

    def test_logp(self, target: str | None, replicate: int) -> np.ndarray:
        """`[n_test, C]` log-probabilities of one student on the test split, as saved."""
        t = pq.read_table(self.dirs[(target, replicate)] / TEST_LOGP)
        col = t["logp"].combine_chunks()
        return col.flatten().to_numpy().reshape(-1, col.type.list_size).copy()  # writable: callers hand it to torch


TEST_LOGP = "test_logp.parquet"
"""Each student's log-probabilities on the test split (`id`, `logp`), beside its metrics: what a
reader needs to recompute every number the report and the claims study state."""


@dataclass
class Stages:
    """What `pipeline.run_stages` reached: each stage's result, None past `until`."""

    data: DataStage | None = None
    teachers: TeacherStage | None = None
    labels: LabelStage | None = None
    students: StudentStage | None = None
    results: dict | None = None


@dataclass(frozen=True)
class StageRequest:
    """What a study needs run before it starts: the stages up to `until` for config `cfg`,
    known to the study as `name`."""

    name: str
    cfg: ExperimentConfig
    until: str
