"""The experiment schema: one pydantic model, YAML in and out, and per-stage hashes.

Every field has a default, so `w2s-ray run` with no file is the default experiment, and the
resolved config (every default written out) is saved beside the run's outputs. Unknown keys,
wrong types, out-of-range values and model names that do not resolve (built-in or import path)
are rejected here, before Ray starts, by `load_config`, which raises `ConfigError` with the
dotted key in the message.

The config is pure data: opening the output store, reading data and starting Ray happen in
`run.RunContext`. What determines results sits beside what only says where and how fast it runs:
each stage's `resources` part (actors, pack size, CPUs, GPU fractions, compile, retries) and the
run plan (`student.targets`, `student.ceiling`) are left out of every cache key wholesale
(`StageKeys`), so a scheduling change never recomputes a stage.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from w2s_ray import models, numerics
from w2s_ray.errors import ConfigError

STAGES = ("embed", "data", "teachers", "labels", "student", "report")  # in the order data flows (embed: text data only)
DIGITS_SIZE = 1797  # scikit-learn's digits has exactly this many samples


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """`k: true` is a mistake, not 1 (pydantic would read a boolean as a number)."""
        if isinstance(value, bool) and _numeric(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"{str(value).lower()} is a boolean; a number is expected")
        return value


def _numeric(annotation: Any) -> bool:
    args = typing.get_args(annotation) or (annotation,)
    return bool(set(args) & {int, float}) and bool not in args


class ModelConfig(Strict):
    """A model family and its capacity knob.

    `name` is a built-in (`mlp`, `cnn1d`, `logistic`) or an import path `package.module:Class`
    of a `torch.nn.Module` taking `(in_dim, n_classes, width, depth, **kwargs)`; import paths are
    only imported because the user named them here.
    """

    name: str = "mlp"
    width: int = Field(32, ge=1, description="hidden units (mlp) or channels (cnn1d)")
    depth: int = Field(1, ge=1, description="hidden layers (mlp) or conv layers (cnn1d)")
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _resolves(cls, name: str, info: ValidationInfo) -> str:
        try:
            # configs read from files (`load_config`) are checked for local code before any
            # import; configs the driver built and passes on (workers, searches) are not again
            if info.context is not None and not info.context.get("allow_local_code", False):
                models.check_installed(name)
            models.resolve(name)
        except ConfigError as err:
            raise ValueError(str(err)) from None
        return name


SourceName = Literal["mnist1d", "digits", "synthetic", "parquet"]


class DataConfig(Strict):
    source: SourceName = "mnist1d"
    path: str | None = Field(None, description="Parquet file or directory (local or pyarrow URI)")
    feature_columns: list[str] | None = Field(
        None, min_length=1, description="numeric feature columns; default: the list column named by `features`"
    )
    features: str = "x"
    teacher_features: str | None = Field(
        None, description="user Parquet: the teachers' own list column of features (e.g. a small model's embeddings), "
        "while the student reads `features`; default: teachers and student read the same features",
    )
    teacher_feature_columns: list[str] | None = Field(None, min_length=1, description="user Parquet: the teachers' own numeric feature columns")
    label_column: str = "y"
    missing: Literal["error", "drop"] = Field(
        "error", description="user Parquet rows with a null, NaN or inf in a column the run uses: error (naming every such column) or drop those rows")
    n_classes: int | None = Field(None, ge=2, description="default: largest label + 1")
    num_samples: int = Field(12000, ge=30, le=50_000_000, description="mnist1d and synthetic only")
    chunk_size: int = Field(4000, ge=100, description="mnist1d / synthetic samples per Ray generation task")
    n_weak: int = Field(2000, ge=10, description="weak-gold split: the only gold labels teachers see")
    n_transfer: int = Field(6000, ge=10, description="transfer split: the student sees teacher labels")
    n_test: int = Field(4000, ge=10, description="gold test split, evaluation only")
    seed: int = 0
    standardize: bool | None = Field(
        None, description="scale each feature by the weak-gold split's mean and sd; default: on for user Parquet, "
        "off for the built-in sources (already on a fixed scale)"
    )

    @model_validator(mode="after")
    def _splits_fit(self) -> "DataConfig":
        need = self.n_weak + self.n_transfer + self.n_test
        have = {"mnist1d": self.num_samples, "synthetic": self.num_samples, "digits": DIGITS_SIZE}.get(self.source)
        if have is not None and need > have:
            raise ValueError(
                f"data.n_weak + data.n_transfer + data.n_test = {need} is larger than the "
                f"{have} samples of data.source={self.source!r}"
            )
        if self.source == "parquet" and not self.path:
            raise ValueError("data.path is required when data.source is 'parquet'")
        if (self.teacher_features or self.teacher_feature_columns) and self.source != "parquet":
            raise ValueError(f"data.teacher_features / data.teacher_feature_columns name columns of user Parquet; data.source is {self.source!r}")
        if self.teacher_features and self.teacher_feature_columns:
            raise ValueError("data.teacher_features and data.teacher_feature_columns: give one of them")
        for key, cols in (("data.feature_columns", self.feature_columns), ("data.teacher_feature_columns", self.teacher_feature_columns)):
            dup = sorted({c for c in cols or [] if (cols or []).count(c) > 1})
            if dup:
                raise ValueError(f"{key} names {dup} more than once")
            if self.label_column in (cols or []):
                raise ValueError(f"{key} includes the label column {self.label_column!r} (data.label_column): the models would see the label")
        for key, col in (("data.features", None if self.feature_columns else self.features), ("data.teacher_features", self.teacher_features)):
            if col is not None and col == self.label_column:
                raise ValueError(f"{key} is the label column {self.label_column!r} (data.label_column): the models would see the label")
        if self.standardize is None:
            self.standardize = self.source == "parquet"
        return self


class ViewConfig(Strict):
    """What part of each input the teachers see: all of it, or a window of positions (the rest
    zeroed) — a less informative view than the student's."""

    kind: Literal["full", "window"] = "full"
    start: int = Field(0, ge=0)
    length: int = Field(20, ge=1)


class EncoderConfig(Strict):
    """One encoder of the embed stage (`encoders`): the text of each row to a vector.

    - `hashed`: a bag of word n-grams, hashed (with a sign) into `dim` buckets, counts
      log-scaled, rows L2-normalised. Built in, no download, no fitting: a deliberately weak view.
    - `hf`: a Hugging Face transformer saved on this machine (`save_pretrained` directory, or a
      model already in the local Hugging Face cache), pooled over its last hidden states. A
      sentence-transformers model directory loads the same way (its default is mean pooling,
      normalised). Needs the `text` extra (transformers); nothing is downloaded.
    """

    kind: Literal["hashed", "hf"] = "hashed"
    dim: int = Field(256, ge=2, le=65_536, description="hashed: buckets, the width of the features")
    ngrams: int = Field(1, ge=1, le=3, description="hashed: word n-grams up to this length")
    path: str | None = Field(None, description="hf: the model's directory (or a name in the local Hugging Face cache)")
    pooling: Literal["mean", "cls"] = Field("mean", description="hf: the mean of the last hidden states over the tokens, or the first token's")
    max_length: int = Field(128, ge=1, description="hf: tokens per text; longer texts are cut")
    batch_size: int = Field(64, ge=1, description="hf: texts per forward pass (part of the key: padding depends on a batch's texts)")
    normalize: bool = Field(True, description="L2-normalise each row")

    @model_validator(mode="after")
    def _hf_needs_a_path(self) -> "EncoderConfig":
        if self.kind == "hf" and not self.path:
            raise ValueError("an hf encoder needs `path`: a local model directory (save_pretrained) or a name in the local Hugging Face cache")
        return self


class EmbedResources(Strict):
    """Where the encoders run; never part of a cache key."""

    num_actors: int | None = Field(None, ge=1, description="encoder actors in Ray Data's pool; default: as many as the CPUs/GPUs allow")
    num_cpus_per_actor: float = Field(1.0, gt=0)
    num_gpus_per_actor: float = Field(0.0, ge=0, le=1, description="> 0: each encoder actor runs its model on a GPU")


class EmbedConfig(Strict):
    """Text data (`data.source: parquet` with a text column): the embed stage turns the column
    into the student's features and, with `teacher`, the teachers' own features, cached per
    (data, encoder)."""

    column: str = Field(..., description="the text column of data.path")
    student: EncoderConfig = Field(..., description="the student's view: its features")
    teacher: EncoderConfig | None = Field(None, description="the teachers' view (their own features); default: the student's")
    rows_per_part: int = Field(4096, ge=16, description="rows per unit of work (one Parquet part, kept by a resume)")
    resources: EmbedResources = Field(default_factory=EmbedResources)


class TeacherResources(Strict):
    """Where and how fast teachers train; never part of a cache key (a pack's teachers are the
    same whatever actor, device or pack size trains them)."""

    num_actors: int | None = Field(None, ge=1, description="default: as many as the CPUs/GPUs allow")
    max_pack_size: int = Field(256, ge=1, description="bounds the memory of one pack result")
    num_cpus_per_actor: float = Field(1.0, gt=0)
    num_gpus_per_actor: float = Field(0.0, ge=0, le=1)
    compile: bool = Field(False, description="torch.compile the pack's forward and loss")
    max_retries: int = Field(3, ge=0, description="a pack whose actor dies is retried this often")


class StudentResources(Strict):
    """Per student task, and the default per Tune trial; never part of a cache key."""

    num_cpus: float = Field(1.0, gt=0)
    num_gpus: float = Field(0.0, ge=0, le=1)


ResampleName = Literal["bootstrap", "seed", "disjoint"]


MAX_TEACHERS = 100_000
"""A bound on `teachers.k`: the driver plans a list of K teacher ids, and the labels stage reads
one sums file per pack; beyond this the run is days, not a typo's worth of memory."""


class TeachersConfig(Strict):
    k: int = Field(64, ge=2, le=MAX_TEACHERS, description=f"number of teachers (at most {MAX_TEACHERS:,}: K = 4096 at N = 1M took 40 min on 2 cores)")
    view: ViewConfig = Field(default_factory=ViewConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    resample: ResampleName = "bootstrap"
    seed: int = 0
    keep_predictions: Literal["all", "float16", "none"] = Field(
        "all",
        description="per-teacher predictions written: all (float32), float16, or none (the posterior needs only each "
        "pack's sums; test predictions and the first 8 teachers' transfer predictions are kept)",
    )
    resources: TeacherResources = Field(default_factory=TeacherResources)


class PosteriorConfig(Strict):
    n_boot: int = Field(200, ge=0, description="bootstrap replicates over teachers (0: no CIs)")
    ci: float = Field(0.95, gt=0, lt=1)
    single_teacher: int = Field(0, ge=0, description="the designated single teacher's index")
    single_teachers: list[int] | None = Field(
        None, description="teachers for the single target's replicates: replicate i learns from teacher i of this list "
        "(one per student seed), so single-teacher students vary over teacher draws; default: single_teacher for every seed",
    )


class LabelsConfig(Strict):
    rows_per_file: int = Field(20000, ge=100)
    read_batch_size: int = Field(65536, ge=1)


TargetName = Literal["single", "arith_mean", "dual_mean", "hard"]
LossName = Literal["mixture", "symmetric", "adaptive", "aux_conf", "kl", "rkl"]


ALWAYS_KEPT = 8
"""Teachers (ids below this) whose transfer predictions are written even with keep_predictions:
none: the candidates for the designated single teacher."""


DEFAULT_STUDENT_MODEL = {"name": "cnn1d", "width": 32, "depth": 3}


class StudentConfig(Strict):
    # what to run rather than how one student trains: left out of the student keys
    PLAN_FIELDS: ClassVar[frozenset[str]] = frozenset({"targets", "ceiling", "resources", "seeds", "ceiling_augment"})
    # what concerns teacher targets only: left out of the gold ceiling's key
    TEACHER_SIDE_FIELDS: ClassVar[frozenset[str]] = frozenset(
        {"loss", "rce_weight", "rce_warmup", "sym_alpha", "sym_beta", "adaptive_threshold", "adaptive_quantile", "aux_alpha", "aux_warmup", "aux_target", "log_floor",
         "weighting", "drop_frac"}
    )

    model: ModelConfig = Field(default_factory=lambda: ModelConfig(**DEFAULT_STUDENT_MODEL))
    targets: list[TargetName] = Field(
        default_factory=lambda: ["dual_mean", "arith_mean", "single"],
        min_length=1,
        description="one student is trained per target; the first is the headline student",
    )
    loss: LossName = "mixture"
    rce_weight: float = Field(0.0, ge=0, le=1, description="λ in (1-λ)·CE + λ·RCE")
    rce_warmup: float = Field(0.0, ge=0, lt=1, description="fraction of training steps with λ = 0 (forward CE) before λ applies: "
                              "reverse CE as a fine-tuning phase")
    sym_alpha: float = Field(1.0, ge=0)
    sym_beta: float = Field(1.0, ge=0)
    adaptive_threshold: float = Field(0.5, ge=0, le=1, description="teacher confidence threshold")
    adaptive_quantile: float | None = Field(None, ge=0, le=1, description="overrides the threshold")
    aux_alpha: float = Field(0.75, ge=0, le=1)
    aux_warmup: float = Field(0.2, ge=0, le=1, description="fraction of training before aux weight is full")
    aux_target: Literal["soft", "hard"] = Field(
        "soft", description="aux_conf's teacher term: CE to the teacher's probabilities (soft, as Burns et al. 2023) or to its argmax (hard)"
    )
    log_floor: float = Field(math.log(1e-8), lt=0, description="floor on log teacher probs in RCE")
    weighting: Literal["none", "variance", "drop_disputed"] = Field(
        "none", description="per-row weights of the training loss from the teachers' disagreement on the row (no gold label): "
        "'variance', exp(-V_i / mean V) with V_i the row's teacher variance (no tuned constant); 'drop_disputed', the drop_frac "
        "of rows with the highest V_i left out; 'none', every row alike. The held-out loss that selects the epoch is unweighted",
    )
    drop_frac: float = Field(0.2, gt=0, lt=1, description="drop_disputed: the fraction of transfer rows with the highest teacher variance left out")
    epochs: int = Field(25, ge=1)
    augment_shift: int = Field(0, ge=0, description="random circular shifts of the student's inputs, up to this many positions")
    batch_size: int = Field(128, ge=1)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    holdout_frac: float = Field(0.1, gt=0, lt=0.9, description="transfer slice held out for early stopping")
    patience: int = Field(5, ge=1)
    selection: Literal["teacher", "oracle", "last"] = Field(
        "teacher", description="early stopping on teacher labels (realistic), on gold labels (oracle), or none: "
        "the weights after the last epoch (last), a rule that does not depend on the loss being compared",
    )
    seed: int = 0
    seeds: int = Field(
        5, ge=1, description="replicates: every target (and the ceiling) is trained with seeds seed, seed+1, ..., "
        "and the report gives n, mean, sd and a 95% CI over them, and paired differences between targets",
    )
    ceiling: bool = Field(True, description="also train the strong ceiling on gold transfer labels")
    ceiling_augment: bool = Field(
        False, description="train the ceiling with the student's augment_shift too; default: without, so the ceiling "
        "is the student's recipe on gold labels, not lowered by an augmentation chosen for the teachers' weakness",
    )
    workers: int = Field(
        1, ge=1, description="train one student across this many Ray Train workers (DDP; gloo on CPU, NCCL on GPUs), "
        "each fed its shard of the pseudo-label stream; 1: one task on the whole table",
    )
    input: Literal["stream", "memory"] = Field(
        "stream", description="with workers > 1, where each worker's batches come from: 'stream', its shard of a Ray Data stream "
        "of the labels (a worker holds a few batches); 'memory', the labels' columns read whole by every worker, which then takes "
        "its 1/N of the same global batches as one process (the one-worker student's steps, up to the gradient all-reduce's "
        "order; every selection rule). Not read with workers: 1",
    )
    pack: bool = Field(
        False, description="train the seeds of each target (and of the ceiling) in packs of up to pack_size, one task a pack: "
        "stacked parameters, one vmapped step, each member with its own seed, batch order, early stopping and best weights "
        "(the teachers' trick). "
        "Built-in models (mlp, logistic, cnn1d), workers: 1. Measured on a 2-core CPU, the default run's student stage: "
        "1.74x faster for MLP 64 x 2 students, 1.44x for the default CNN (benchmarks/bench_student_pack.py --stage). Not the "
        "same bits as the students one at a time (batched GEMMs; equal to 1e-5), so packed students have their own cache "
        "keys; a member is the same bits every time its pack is trained again",
    )
    pack_size: int = Field(
        5, ge=1, description="with pack: the most students in one pack; a target's seeds are cut into packs of this many, "
        "in seed order, each pack one task of student.resources. Smaller packs use more CPUs at once (a study run of one "
        "target and 10 seeds is 2 tasks at 5, 1 task at 10); a member's cache key holds its pack's size and its place in it",
    )
    resources: StudentResources = Field(default_factory=StudentResources)

    @field_validator("model", mode="before")
    @classmethod
    def _same_family_keeps_its_defaults(cls, model: Any) -> Any:
        """`student.model.depth: 4` tunes the default student (a cnn1d); naming a family starts
        from that family's own defaults."""
        if isinstance(model, dict) and "name" not in model:
            return {**DEFAULT_STUDENT_MODEL, **model}
        return model


PACK_MODELS = ("mlp", "logistic", "cnn1d")
"""The student models `student.pack` trains as packs (`student.core.fit_pack`)."""


def pack_of(s: StudentConfig, replicate: int) -> tuple[int, int]:
    """The pack of replicate `replicate` (`student.pack`): the replicates [start, stop)."""
    start = replicate // s.pack_size * s.pack_size
    return start, min(start + s.pack_size, s.seeds)


RAY_ADDRESS = re.compile(r"auto|local|ray://[^\s/:]+(:\d+)?/?|[^\s/:]+:\d+")


class RayConfig(Strict):
    address: str | None = Field(None, description="None: RAY_ADDRESS or an embedded local Ray; 'local': always a new local Ray")
    num_cpus: int | None = Field(None, ge=1, description="local Ray only")
    object_store_mb: int | None = Field(None, ge=75, description="local Ray only")
    placement_wait_s: float = Field(0.0, ge=0, description="resources the cluster lacks: wait this long for it to grow "
                                    "(an autoscaler adding nodes) before refusing; 0: refuse at once")

    @field_validator("address")
    @classmethod
    def _an_address(cls, address: str | None) -> str | None:
        if address is not None and not RAY_ADDRESS.fullmatch(address):
            raise ValueError(f"{address!r} is not a Ray address: 'auto', 'local', 'host:port' (a head's GCS address) or 'ray://host:10001' (Ray Client)")
        return address


RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class OutputConfig(Strict):
    root: str = Field("runs", description="a path (NFS on a cluster) or a pyarrow filesystem URI: s3://bucket/prefix, gs://..., file:///...")
    name: str = "default"
    cache: str | None = Field(None, description="local working copy of a run whose root is a URI; default ~/.cache/w2s-ray")
    tensorboard: bool = True
    wait: bool = Field(True, description="a stage another run is writing: wait for it (False, or --no-wait: stop with a message)")

    @field_validator("name")
    @classmethod
    def _one_folder(cls, name: str) -> str:
        """One folder under `output.root`: `../x` or `a/b` would write a run elsewhere."""
        if not RUN_NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not a folder name: letters, digits, '.', '_' and '-', starting with a letter or digit (the run is written to output.root/<name>)")
        return name


class ExperimentConfig(Strict):
    data: DataConfig = Field(default_factory=DataConfig)
    embed: EmbedConfig | None = Field(None, description="text data: encoders that make the features (see EmbedConfig)")
    teachers: TeachersConfig = Field(default_factory=TeachersConfig)
    posterior: PosteriorConfig = Field(default_factory=PosteriorConfig)
    labels: LabelsConfig = Field(default_factory=LabelsConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @model_validator(mode="after")
    def _tabular_student(self) -> "ExperimentConfig":
        """Feature columns (and an encoder's embedding) are a set, not a sequence: unless the
        student is named, it is an MLP with clearly more capacity than the teachers (8× their
        width, two hidden layers) instead of the default 1-D CNN, which on tables was no
        stronger than the teachers."""
        if (self.embed is not None or (self.data.source == "parquet" and self.data.feature_columns)) and "model" not in self.student.model_fields_set:
            self.student.model = ModelConfig(name="mlp", width=max(256, 8 * self.teachers.model.width), depth=2)
        return self

    @model_validator(mode="after")
    def _cross_checks(self) -> "ExperimentConfig":
        if self.embed is not None:
            if self.data.source != "parquet":
                raise ValueError(f"embed: encoders read a text column of user Parquet; data.source is {self.data.source!r} (set data.source: parquet and data.path)")
            d = self.data  # by value, not by what was set: a saved config writes every default out
            given = [k for k in ("feature_columns", "teacher_features", "teacher_feature_columns") if getattr(d, k) is not None] + (["features"] if d.features != "x" else [])
            if given:
                raise ValueError(f"embed: the encoders make the features; remove data.{', data.'.join(given)}")
            if self.embed.column == self.data.label_column:
                raise ValueError(f"embed.column is the label column {self.data.label_column!r} (data.label_column): the models would see the label")
        if self.posterior.single_teacher >= self.teachers.k:
            raise ValueError(
                f"posterior.single_teacher={self.posterior.single_teacher} must be < teachers.k={self.teachers.k}"
            )
        singles = self.posterior.single_teachers
        if singles is not None:
            if len(singles) != self.student.seeds:
                raise ValueError(f"posterior.single_teachers has {len(singles)} teachers for student.seeds={self.student.seeds}: "
                                 "give one teacher per seed (replicate i learns from teacher i)")
            if len(set(singles)) != len(singles) or min(singles) < 0 or max(singles) >= self.teachers.k:
                raise ValueError(f"posterior.single_teachers={singles}: distinct teacher ids below teachers.k={self.teachers.k}")
            if self.teachers.keep_predictions == "none" and max(singles) >= ALWAYS_KEPT:
                raise ValueError(f"posterior.single_teachers={singles}: with teachers.keep_predictions='none' only teachers "
                                 f"0..{ALWAYS_KEPT - 1} keep their transfer predictions")
        if self.student.workers > 1 and self.student.input == "stream" and self.student.weighting != "none":
            raise ValueError("student.weighting with student.workers > 1 needs student.input: memory (the label stream carries no row weights)")
        if self.student.workers > 1 and self.student.input == "stream" and self.student.selection == "oracle":
            raise ValueError("student.workers > 1 with student.input: stream needs student.selection: teacher (gold labels never enter "
                             "the label stream the workers read); student.input: memory supports every selection rule")
        if self.student.workers > 1 and self.student.input == "stream" and self.student.adaptive_quantile is not None:
            raise ValueError("student.workers > 1 with student.input: stream: student.adaptive_quantile is a quantile over every training row; "
                             "set student.adaptive_threshold instead, or student.input: memory")
        if self.student.pack and self.student.workers > 1:
            raise ValueError(f"student.pack trains a pack of students in one task; student.workers is {self.student.workers} (set 1, or pack: false)")
        if self.student.pack and self.student.model.name not in PACK_MODELS:
            raise ValueError(f"student.pack: packs are for {', '.join(PACK_MODELS[:-1])} and {PACK_MODELS[-1]} students (the built-in models without buffers); "
                             f"student.model.name is {self.student.model.name!r} (set pack: false)")
        if self.teachers.keep_predictions == "none" and self.posterior.single_teacher >= ALWAYS_KEPT:
            raise ValueError(
                f"posterior.single_teacher={self.posterior.single_teacher}: with teachers.keep_predictions='none' only "
                f"teachers 0..{ALWAYS_KEPT - 1} keep their transfer predictions; choose one of them"
            )
        if self.teachers.resample == "disjoint" and self.data.n_weak < self.teachers.k:
            raise ValueError(
                f"teachers.resample='disjoint' needs data.n_weak ({self.data.n_weak}) >= teachers.k ({self.teachers.k})"
            )
        return self


# keys that moved into a `resources` part: an old config gets told where
MOVED = {
    **{f"teachers.{k}": f"teachers.resources.{k}" for k in TeacherResources.model_fields},
    **{f"student.{k}": f"student.resources.{k}" for k in StudentResources.model_fields},
}


TRAINING_BYTES_PER_PARAM = 16  # float32 weights, gradients, and Adam's two moments


def memory_bytes() -> int:
    """This machine's physical memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_shapes(cfg: ExperimentConfig, in_dim: int, n_classes: int, teacher_dim: int | None = None) -> dict[str, int]:
    """What the config can only be checked against once the data's shape is known: the teacher
    view, and every model built (on the meta device) with its training memory estimated.
    `teacher_dim`: the teachers' own features' width, when they have their own. Returns the
    parameter count per model key. Run before Ray starts."""
    t_dim = teacher_dim or in_dim
    view = cfg.teachers.view
    if view.kind == "window" and view.start + view.length > t_dim:
        raise ConfigError(
            f"teachers.view: the window [{view.start}, {view.start + view.length}) does not fit in the teachers' "
            f"{t_dim} features"
        )
    pack = min(cfg.teachers.k, cfg.teachers.resources.max_pack_size)
    params, limit = {}, memory_bytes()
    for key, model, copies, dim in (("teachers.model", cfg.teachers.model, pack, t_dim), ("student.model", cfg.student.model, 1, in_dim)):
        try:
            params[key] = models.check_model(model, dim, n_classes)
        except ConfigError as err:
            raise ConfigError(f"{key}: {err}") from None
        need = params[key] * TRAINING_BYTES_PER_PARAM * copies
        if need > limit and not (cfg.ray.address or os.environ.get("RAY_ADDRESS")):
            what = f"a pack of {copies} needs" if copies > 1 else "needs"
            raise ConfigError(
                f"{key}: {params[key]:,} parameters; training {what} about {need / 1e9:,.1f} GB "
                f"(weights, gradients, Adam state), more than this machine's {limit / 1e9:.0f} GB"
            )
    return params


def _format_errors(err: ValidationError, source: str, overrides: dict[str, Any] | None = None) -> str:
    """One line per error, naming the key; a key set on the command line is blamed on its
    `--set`, not on the config file."""
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = f"unknown key (moved to {MOVED[key]})" if key in MOVED else "unknown key"
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        given = next((k for k in (overrides or {}) if key == k or key.startswith(f"{k}.")), None)
        where = f" (from --set {given}={_plain_value(overrides[given])})" if given else ""
        lines.append(f"  {key}: {msg}{where}")
    return "\n".join(lines)


def _plain_value(v: Any) -> str:
    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("\n...").strip()


def parse_config(data: dict[str, Any] | None, source: str = "<dict>", context: dict[str, Any] | None = None,
                 overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config ({source}): the top level must be a mapping, got {type(data).__name__}")
    try:
        return ExperimentConfig.model_validate(data, context=context)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source, overrides)) from None


def set_dotted(data: dict[str, Any], dotted: str, value: Any, source: str, must_exist: bool = False) -> None:
    """Set `a.b.c` in nested dicts. With `must_exist`, every part must already be a key (a
    search space names existing keys; `kwargs` of a model are free-form)."""
    node = data
    *parents, leaf = dotted.split(".")
    for p in parents:
        if must_exist and not isinstance(node.get(p), dict):
            raise ConfigError(f"{source}: {dotted!r} is not a key of the experiment config")
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{source}: {dotted}: {p} is not a section")
    if must_exist and leaf not in node and not (parents and parents[-1] == "kwargs"):
        raise ConfigError(f"{source}: {dotted!r} is not a key of the experiment config")
    node[leaf] = value


class StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that names a key twice (YAML would keep the last)."""


def _mapping_without_duplicates(loader: StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {seen[key] + 1})", key_node.start_mark
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)
# YAML 1.1 (PyYAML) reads `1e3` and `1e-4` as strings, not numbers; YAML 1.2 and every user read them as numbers
StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line: what is wrong and where (PyYAML's own message spans several lines)."""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    mark = getattr(err, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def parse_yaml(text: str, source: str) -> Any:
    """YAML text to Python, duplicate keys refused; errors name `source` and the place, in one line."""
    try:
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - StrictLoader is a SafeLoader
    except yaml.YAMLError as err:
        raise ConfigError(f"{source} is not valid YAML: {_yaml_problem(err)}") from None


def read_yaml(path: str | Path, what: str) -> Any:
    """A YAML file (`what`: "config file", "search space") as Python; None when it is empty."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte {err.start} cannot be decoded)") from None
    return parse_yaml(text, f"{what} {path}")


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None, allow_local_code: bool = False) -> ExperimentConfig:
    """Read YAML (or the defaults when `path` is None), apply dotted overrides, validate. A model
    import path must name an installed package unless `allow_local_code` (`--allow-local-code`)."""
    data: Any = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        data = read_yaml(path, "config file")
        if data is None:
            print(f"w2s-ray: warning: config file {path} is empty; the defaults are used", file=sys.stderr)
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"invalid config ({source}): the top level must be a mapping of sections, got a {type(data).__name__}")
    for dotted, value in (overrides or {}).items():
        set_dotted(data, dotted, value, "override")
    return parse_config(data, source, context={"allow_local_code": allow_local_code}, overrides=overrides)


def with_values(cfg: ExperimentConfig, values: dict[str, Any], source: str) -> ExperimentConfig:
    """A copy of `cfg` with dotted keys set (each must exist), validated like any config."""
    data = copy.deepcopy(cfg.model_dump(mode="json"))
    for dotted, value in values.items():
        set_dotted(data, dotted, value, source, must_exist=True)
    return parse_config(data, source)


def to_yaml(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


CACHE_FORMAT = 4
"""Folded into every cache key (`config_hash`). Raised when what a stage writes, or how its key
is made, changes: every cache then recomputes once, instead of each new config key or file
layout carrying a rule that keeps old caches valid. 2: every config key in its stage's key with
its default, the pinned numerics (`numerics`), students' and teachers' files as this version
writes them. 3: `cnn1d` computed as GEMMs over windows (`models.strided_conv`; other bits).
4: MLP and logistic teachers' weight gradients as one GEMM in the weight's layout
(`packs.chain_backward`; other bits, each teacher's of it trained alone)."""


def config_hash(*parts: Any) -> str:
    """A short stable hash of config parts (pydantic models or plain JSON-able values) and the
    cache format."""

    def plain(p: Any) -> Any:
        return p.model_dump(mode="json") if isinstance(p, BaseModel) else p

    blob = json.dumps([CACHE_FORMAT, *(plain(p) for p in parts)], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def source_fingerprint(path: str | None, pattern: str = "*.parquet") -> list | None:
    """Size and mtime of local user data (or a local model's files), so that an edited file is
    not served from the cache."""
    if not path or "://" in path or not Path(path).exists():
        return None
    p = Path(path)
    files = sorted(p.rglob(pattern)) if p.is_dir() else [p]
    return [(str(f.relative_to(p)) if p.is_dir() else f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]


def _student_part(s: StudentConfig, exclude: frozenset[str]) -> dict:
    out = s.model_dump(mode="json", exclude=exclude)
    if out.get("loss") != "aux_conf":  # read by that loss alone: changing it retrains no other student
        out.pop("aux_target", None)
    if out.get("workers") == 1:  # read across workers alone
        out.pop("input", None)
    if not out.get("pack"):  # one student a task: every key is what it was before packs existed
        out.pop("pack", None)
    out.pop("pack_size", None)  # a packed student's key holds its own pack (`StageKeys._pack`)
    if out.get("weighting") == "none":  # without weights, every key is what it was before they existed
        out.pop("weighting", None)
    if out.get("weighting") != "drop_disputed":
        out.pop("drop_frac", None)
    return out


@dataclass(frozen=True)
class StageKeys:
    """Per-stage cache keys: each covers exactly the config parts its stage reads, never a
    `resources` part nor the run plan."""

    cfg: ExperimentConfig

    @property
    def data(self) -> str:
        d = self.cfg.data
        parts: list[Any] = ["data", d.model_dump(mode="json"), source_fingerprint(d.path) if d.source == "parquet" else None]
        if self.cfg.embed is not None:  # without it, the key is what it always was
            parts.append({role: self.embed(role) for role in self.embed_roles()})
        return config_hash(*parts)

    def embed_roles(self) -> tuple[str, ...]:
        """The views the embed stage makes: the student's, and the teachers' when they have their own."""
        e = self.cfg.embed
        return () if e is None else ("student",) if e.teacher is None else ("student", "teacher")

    def embed(self, role: str) -> str:
        """One encoder's vectors of one text column: the file (path, size, mtime), the column,
        the encoder (and, for a local model directory, its files' names, sizes and mtimes: a
        model saved again at the same path is another encoder), how rows are cut into parts,
        and the pinned numerics. Not `data.missing`: every row with a text is encoded (a null
        text is an error before, or left out), and the data stage keeps the rows it keeps.
        Two views with the same encoder share one directory."""
        d, e = self.cfg.data, self.cfg.embed
        enc = e.student if role == "student" else e.teacher
        model = source_fingerprint(enc.path, "*") if enc.kind == "hf" else None
        return config_hash("embed", d.path, source_fingerprint(d.path), e.column, enc.model_dump(mode="json"), model, e.rows_per_part,
                           numerics.key())

    @property
    def teachers(self) -> str:
        """Teacher t is a pure function of (data, teacher config, t), so K is left out of the key:
        a larger K extends the same directory with the missing teachers. Disjoint subsets
        depend on K, so there K is part of the key."""
        t = self.cfg.teachers.model_dump(mode="json", exclude={"resources"})
        if t["resample"] != "disjoint":
            t.pop("k")
        return config_hash("teachers", self.data, t, numerics.key())

    @property
    def labels(self) -> str:
        # the label table holds the designated single teacher only: the replicates' teachers are
        # read by their student tasks, so `single_teachers` is not part of the labels
        return config_hash("labels", self.teachers, self.cfg.teachers.k, self.cfg.posterior.model_dump(mode="json", exclude={"single_teachers"}))

    def student(self, target: str, seed: int | None = None, teacher: int | None = None) -> str:
        """One student: its target, its seed (default `student.seed`, the first replicate) and,
        for the single target, its teacher (default `posterior.single_teacher`)."""
        s = self.cfg.student
        if seed is not None and seed != s.seed:
            s = s.model_copy(update={"seed": seed})
        who = target if teacher is None or teacher == self.cfg.posterior.single_teacher else f"{target}#{teacher}"
        return config_hash("student", self.labels, _student_part(s, StudentConfig.PLAN_FIELDS), who, *self._pack(s.seed))

    def _pack(self, seed: int) -> tuple:
        """A packed student's bits depend on its pack (how many members, and where it sits in
        it; with its own seed, that names the pack's seeds): with `student.pack` that is in its
        key; without, nothing is added."""
        s = self.cfg.student
        if not s.pack:
            return ()
        start, _ = pack_of(s, seed - s.seed)
        return ({"pack_of": min(s.pack_size, s.seeds - start), "member": seed - s.seed - start},)

    @property
    def report(self) -> str:
        """The whole experiment (not where it runs, nor where it writes): one report per config,
        so two configs sharing `output.name` keep their results apart."""
        s = self.cfg.student
        unread = ({"input"} if s.workers == 1 else set()) | ({"weighting"} if s.weighting == "none" else set()) | ({"pack", "pack_size"} if not s.pack else set()) | (
            {"drop_frac"} if s.weighting != "drop_disputed" else set())  # options at rest leave the key as it was before they existed
        exclude = {"teachers": {"resources"}, "student": {"resources"} | unread, "ray": True, "output": True,
                   "embed": True if self.cfg.embed is None else {"resources"}}  # without embed, the key is what it always was
        return config_hash("report", self.data, self.cfg.model_dump(mode="json", exclude=exclude), numerics.key())

    @property
    def ceiling(self) -> str:
        """Everything about the student except what concerns teacher targets: new training
        options change the ceiling's key by default."""
        return self.ceiling_seed(self.cfg.student.seed)

    def ceiling_seed(self, seed: int) -> str:
        """The ceiling of one replicate: trained without the student's augmentation unless
        `student.ceiling_augment` (configs without augmentation keep their key)."""
        s = self.cfg.student
        update = {"seed": seed} | ({} if s.ceiling_augment else {"augment_shift": 0})
        return config_hash("ceiling", self.data, _student_part(s.model_copy(update=update), StudentConfig.PLAN_FIELDS | StudentConfig.TEACHER_SIDE_FIELDS),
                           numerics.key(), *self._pack(seed))
