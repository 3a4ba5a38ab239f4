"""The typed results the stages hand each other, and how they read and write themselves. No Ray.

Each stage returns a typed result (`DataStage`, `TeacherStage`, `LabelStage`, `StudentStage`)
that the next stage takes as an argument, and the JSON a stage writes (`posterior.json`,
`metrics.json`) is written from and read into one dataclass each (`PosteriorSummary`,
`StudentResult`), so report, Tune and studies read attributes, never string keys. They live
apart from the run context (`run`, which starts Ray) so that every reader of a stage's files,
the pack and label files included, imports no Ray.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from w2s_ray import artifacts
from w2s_ray.artifacts import fixed_list, matrix
from w2s_ray.config import ExperimentConfig
from w2s_ray.metrics import StudentEval


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
        cols = {"id": self.ids, "x": fixed_list(self.x), "y": self.y}
        if self.xt is not None:
            cols["xt"] = fixed_list(self.xt)
        return pa.table(cols)

    @classmethod
    def read(cls, path: str | Path, rows: tuple[int, int] | None = None, teacher_features: bool = True) -> "Split":
        """A split file, or its rows [r0, r1); without the teachers' own features (`xt`) when
        `teacher_features` is False."""
        columns = None if teacher_features else ["id", "x", "y"]
        t = artifacts.read_rows(path, rows, columns)
        xt = matrix(t["xt"]) if "xt" in t.column_names else None
        return cls(ids=t["id"].to_numpy(), x=matrix(t["x"]), y=t["y"].to_numpy().astype(np.int64), xt=xt)

    @classmethod
    def spans(cls, path: str | Path, rows: int = artifacts.ROW_GROUP) -> Iterator[np.ndarray]:
        """A split file's teacher features, `rows` rows at a time (one row group of the data
        stage's files each), reading only the teachers' column: a pack worker predicts the
        transfer split without holding it (at N = 1M a pack actor held those features, 160 MB,
        twice while Arrow combined its chunks, for its whole life)."""
        pf = pq.ParquetFile(path)
        column = "xt" if "xt" in pf.schema_arrow.names else "x"
        for batch in pf.iter_batches(batch_size=rows, columns=[column]):
            yield matrix(batch.column(0))


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
class EmbedStage:
    """The embed stage's vectors: one directory per view (`"student"`, and `"teacher"` when the
    teachers have their own encoder; one directory when both use the same), `embedfiles`."""

    dirs: dict[str, Path]
    dims: dict[str, int]
    rows: int


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
    ceiling, in seed order, and each one's directory. `students` and `ceiling` are the first
    replicate's (seed `student.seed`, the designated single teacher)."""

    replicates: dict[str, list[StudentResult]]  # by target, in the config's order
    ceilings: list[StudentResult] = field(default_factory=list)
    dirs: dict[tuple[str | None, int], Path] = field(default_factory=dict)  # (target or None, replicate) → its directory

    @property
    def students(self) -> dict[str, StudentResult]:
        return {tgt: reps[0] for tgt, reps in self.replicates.items()}

    @property
    def ceiling(self) -> StudentResult | None:
        return self.ceilings[0] if self.ceilings else None

    def test_logp(self, target: str | None, replicate: int) -> np.ndarray:
        """`[n_test, C]` log-probabilities of one student on the test split, as saved."""
        return matrix(pq.read_table(self.dirs[(target, replicate)] / TEST_LOGP)["logp"], copy=True)  # writable: callers hand it to torch


TEST_LOGP = "test_logp.parquet"
"""Each student's log-probabilities on the test split (`id`, `logp`), beside its metrics: what a
reader needs to recompute every number the report and the claims study state."""


@dataclass
class Stages:
    """What `pipeline.run_stages` reached: each stage's result, None past `until`."""

    embed: EmbedStage | None = None
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
