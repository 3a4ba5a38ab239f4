"""The stages in the order data flows, each skipped when its cached artifact is complete.

    data → teachers → labels (posterior + pseudo-labels) → students → report

Each stage lives in `<run>/<stage>/<hash>/`, where the hash covers only the config parts the
stage depends on: changing the student never retrains teachers, and the gold-label ceiling
does not depend on the teachers at all. A stage is complete when its manifest verifies; an
interrupted stage is redone (the teacher stage resumes pack by pack).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from w2s_ray import artifacts, storage
from w2s_ray.config import ExperimentConfig, config_hash, to_yaml
from w2s_ray.data import SPLITS, Split, load_source, make_splits, n_classes_of, read_split, split_table
from w2s_ray.raytools import init_ray

STAGES = ("data", "teachers", "labels", "student", "report")


def log(msg: str) -> None:
    print(f"[w2s-ray] {msg}", file=sys.stderr, flush=True)


def warn_if_unshared(cfg: ExperimentConfig) -> None:
    """Ray Data writes and reads the pseudo-labels on any node: a local run directory must be
    one every node mounts at the same path. We cannot see whether it is; say what is needed."""
    from w2s_ray.raytools import alive_nodes

    nodes = alive_nodes()
    if nodes > 1 and not storage.is_uri(cfg.output.root):
        log(f"warning: the cluster has {nodes} nodes and output.root={cfg.output.root!r} is a local path; "
            "it must be a filesystem every node mounts at the same path (NFS), or use a URI such as s3://bucket/prefix")


def source_fingerprint(path: str | None) -> list | None:
    """Size and mtime of local user data, so that an edited file is not served from the cache."""
    if not path or storage.is_uri(path) or not Path(path).exists():
        return None
    p = Path(path)
    files = sorted(p.rglob("*.parquet")) if p.is_dir() else [p]
    return [(str(f.relative_to(p)) if p.is_dir() else f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]


@dataclass
class Keys:
    """Per-stage cache keys: each covers exactly the config parts its stage reads."""

    cfg: ExperimentConfig

    @property
    def data(self) -> str:
        return config_hash("data", self.cfg.data, source_fingerprint(self.cfg.data.path) if self.cfg.data.source == "parquet" else None)

    @property
    def teachers(self) -> str:
        """Teacher t is a pure function of (data, teacher config, t), so K is left out of the key:
        a larger K extends the same directory with the missing teachers. Disjoint subsets
        depend on K, so there K is part of the key."""
        t = self.cfg.teachers.model_dump(mode="json")
        for scheduling_only in ("num_actors", "max_pack_size", "num_cpus_per_actor", "num_gpus_per_actor", "compile", "max_retries"):
            t.pop(scheduling_only)
        if t["resample"] != "disjoint":
            t.pop("k")
        return config_hash("teachers", self.data, t)

    @property
    def labels(self) -> str:
        return config_hash("labels", self.teachers, self.cfg.teachers.k, self.cfg.posterior)

    def student(self, target: str) -> str:
        s = self.cfg.student.model_dump(mode="json")
        for not_training in ("targets", "ceiling", "num_cpus", "num_gpus"):
            s.pop(not_training)
        return config_hash("student", self.labels, s, target)

    @property
    def ceiling(self) -> str:
        """Everything about the student except what concerns teacher targets: new training
        options change the ceiling's key by default."""
        s = self.cfg.student.model_dump(mode="json")
        for teacher_side in ("targets", "loss", "rce_weight", "sym_alpha", "sym_beta", "adaptive_threshold", "adaptive_quantile", "aux_alpha", "aux_warmup", "log_floor", "ceiling", "num_cpus", "num_gpus"):
            s.pop(teacher_side)
        return config_hash("ceiling", self.data, s)


@dataclass
class DataStage:
    dir: Path
    splits: dict[str, Split]
    n_classes: int
    in_dim: int


@dataclass
class RunState:
    cfg: ExperimentConfig
    keys: Keys = field(init=False)
    data: DataStage | None = None
    teachers_dir: Path | None = None
    labels_dir: Path | None = None
    students: dict[str, dict] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.keys = Keys(self.cfg)

    @property
    def run_dir(self) -> Path:
        return self.cfg.run_dir


# --- stages --------------------------------------------------------------------------------


def stage_data(st: RunState) -> DataStage:
    cfg = st.cfg
    d = artifacts.stage_dir(st.run_dir, "data", st.keys.data)
    manifest = artifacts.read_manifest(d)
    if manifest is None:
        log(f"data: building {cfg.data.source} splits → {d}")
        if cfg.data.source == "parquet":
            x, y = load_source(cfg.data)  # validated before Ray starts
            init_ray(cfg.ray)
        else:
            init_ray(cfg.ray)
            from w2s_ray.raytools import parallel_map

            x, y = load_source(cfg.data, map_fn=lambda fn, items: parallel_map(fn, list(items)))
        splits = make_splits(x, y, cfg.data, cfg.data.path or cfg.data.source)
        artifacts.reset_dir(d)
        for name, s in splits.items():
            artifacts.write_parquet(d / f"{name}.parquet", split_table(s))
        n_classes = n_classes_of(cfg.data, y)
        manifest = artifacts.write_manifest(d, st.keys.data, n_classes=n_classes, in_dim=int(x.shape[1]), sizes={k: len(s.y) for k, s in splits.items()})
    else:
        log(f"data: cached {d}")
    splits = {name: read_split(d / f"{name}.parquet") for name in SPLITS}
    st.data = DataStage(d, splits, manifest["n_classes"], manifest["in_dim"])
    return st.data


def stage_teachers(st: RunState) -> Path:
    from w2s_ray.teachers import POOL, train_teachers

    data = st.data or stage_data(st)
    d = artifacts.stage_dir(st.run_dir, "teachers", st.keys.teachers)
    k = st.cfg.teachers.k
    manifest = artifacts.read_manifest(d)
    if manifest is None or manifest["k"] < k:
        init_ray(st.cfg.ray)
        have = f" (extending the {manifest['k']} on disk)" if manifest else ""
        log(f"teachers: training K={k} {st.cfg.teachers.model.name} teachers{have} → {d}")
        d.mkdir(parents=True, exist_ok=True)
        artifacts.remove(d / artifacts.MANIFEST)
        try:
            table = train_teachers(st.cfg, data.splits, data.n_classes, d)
        finally:
            POOL.release()  # actors hold CPUs/GPUs the student stage needs
        artifacts.write_parquet(d / "teachers.parquet", table)
        acc = table["acc_test"].to_numpy()
        artifacts.write_manifest(d, st.keys.teachers, k=table.num_rows, packs=sorted(set(table["pack"].to_pylist())), acc_mean=float(acc.mean()), acc_sd=float(acc.std(ddof=1)))
    else:
        log(f"teachers: cached {d} (using {k} of {manifest['k']})")
    st.teachers_dir = d
    return d


def stage_labels(st: RunState) -> Path:
    from w2s_ray.labels import build_posterior, labels_table, test_table, write_labels

    data = st.data or stage_data(st)
    tdir = st.teachers_dir or stage_teachers(st)
    d = artifacts.stage_dir(st.run_dir, "labels", st.keys.labels)
    if artifacts.read_manifest(d) is None:
        init_ray(st.cfg.ray)
        warn_if_unshared(st.cfg)
        log(f"labels: posterior over teachers, pseudo-labels via Ray Data → {d}")
        artifacts.reset_dir(d)
        tmanifest = artifacts.read_manifest(tdir, verify=False)
        sizes = {s: len(data.splits[s].y) for s in SPLITS}
        post = build_posterior(st.cfg, tdir, tmanifest["packs"], sizes, data.n_classes, data.splits["test"].y)
        summary = posterior_summary(post, data.splits["test"].y)
        tr, te = data.splits["transfer"], data.splits["test"]
        write_labels(d, labels_table(tr.ids, tr.x, post["transfer"]), test_table(te.ids, post["test"]), summary, st.keys.labels, st.cfg.labels.rows_per_file)
    else:
        log(f"labels: cached {d}")
    st.labels_dir = d
    return d


def posterior_summary(post: dict, y_test: np.ndarray) -> dict[str, Any]:
    import torch

    from w2s_ray.metrics import accuracy

    y = torch.from_numpy(y_test)
    te, tr = post["test"], post["transfer"]
    return {
        "k": post["k"],
        "test_acc_dual": accuracy(te["dual_log"], y),
        "test_acc_arith": accuracy(te["arith"], y),
        "test_acc_single": accuracy(te["single_log"], y),
        "ci_dual": post["ci"].get("dual"),
        "ci_arith": post["ci"].get("arith"),
        "variance_test": float(te["variance"].mean()),
        "variance_transfer": float(tr["variance"].mean()),
        "mutual_info_test": float(te["mutual_info"].mean()),
        "pred_entropy_test": float(te["pred_entropy"].mean()),
        "expected_entropy_test": float(te["expected_entropy"].mean()),
    }


def stage_students(st: RunState) -> dict[str, dict]:
    from w2s_ray.students import run_students

    data = st.data or stage_data(st)
    ldir = st.labels_dir or stage_labels(st)
    st.students = run_students(st, data, ldir)
    return st.students


def stage_report(st: RunState) -> dict[str, Any]:
    from w2s_ray.report import write_report
    from w2s_ray.teachers import read_teacher_table

    if not st.students:
        stage_students(st)
    tdir = st.teachers_dir
    teachers = read_teacher_table(tdir, st.cfg.teachers.k).to_pandas()
    posterior = artifacts.read_json(st.labels_dir / "posterior.json")
    return write_report(st.cfg, st.run_dir, teachers, posterior, st.students)


def run_pipeline(cfg: ExperimentConfig, until: str = "report") -> RunState:
    """Run every stage up to and including `until`, reusing what is cached."""
    if until not in STAGES:
        raise ValueError(f"unknown stage {until!r}; stages: {STAGES}")
    st = RunState(cfg)
    st.run_dir.mkdir(parents=True, exist_ok=True)
    artifacts.write_text(st.run_dir / "config.yaml", to_yaml(cfg))
    t0 = time.perf_counter()
    steps = {"data": stage_data, "teachers": stage_teachers, "labels": stage_labels, "student": stage_students, "report": stage_report}
    for name in STAGES[: STAGES.index(until) + 1]:
        steps[name](st)
    log(f"done in {time.perf_counter() - t0:.1f}s; outputs in {st.run_dir}")
    return st
