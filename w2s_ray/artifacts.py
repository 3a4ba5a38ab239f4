"""Local files: atomic writes and stage manifests. No store, no Ray.

A stage directory `<run>/<stage>/<hash>/` is complete only when its `manifest.json` exists and
every file it lists has the recorded size and sha256. The manifest is written last, by rename,
so a run killed mid-stage leaves a directory that the next run recognises as incomplete and
rebuilds, never a half file that it trusts.

These functions touch only the local path they are given. Stages write through
`storage.RunDir`, which calls them and then uploads the finished file when the run lives in a
store.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST = "manifest.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def umask() -> int:
    """This process's umask, read without changing it (os.umask would, for every thread)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~umask())  # mkstemp makes 0600: a shared run directory is read by a team
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


ROW_GROUP = 65536
"""Rows per Parquet row group of the per-row files (splits, pack sums and predictions, label
parts): the granularity of a row-range read (`read_rows`)."""


def read_rows(path: str | Path, rows: tuple[int, int] | None = None, columns: list[str] | None = None) -> pa.Table:
    """Rows [r0, r1) of a Parquet file (all without `rows`), reading only the row groups that hold them."""
    if rows is None:
        return pq.read_table(path, columns=columns)
    r0, r1 = rows
    pf = pq.ParquetFile(path)
    groups, start, first = [], 0, 0
    for g in range(pf.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if start < r1 and start + n > r0:
            first = start if not groups else first
            groups.append(g)
        start += n
    if not groups or r1 > start:
        raise ValueError(f"{path}: has {start} rows; rows {r0}..{r1} were asked for")
    return pf.read_row_groups(groups, columns=columns).slice(r0 - first, r1 - r0)


def dictionary_columns(schema: pa.Schema) -> list[str]:
    """The columns worth Parquet's dictionary encoding: strings and bytes (node names, class
    names, paths), not numbers. Floats from a model are all distinct; trying a dictionary on
    them first was most of a pack's write time (32 teachers' log-probs on 6,000 rows, `preds/`:
    84 ms and 9.4 MB with dictionaries, 31 ms and 7.8 MB without). Integer ids are mostly
    distinct too: 128 teachers × 6,000 rows of `teacher_id` and `row` alone wrote in 57 ms and
    1.3 MB with dictionaries, 16 ms and 1.7 MB without (medians of 7, 2026-12-07), and the
    whole prediction file (32 MB) in 177 ms with them."""
    def texty(t: pa.DataType) -> bool:
        return (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t)
                or pa.types.is_dictionary(t))

    return [f.name for f in schema if texty(f.type)]


def write_parquet(path: str | Path, table: pa.Table, row_group_size: int | None = None) -> Path:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=row_group_size, use_dictionary=dictionary_columns(table.schema))
    return Path(path)


def build_manifest(directory: Path, key: str, files: list[str] | None = None, known: dict[str, dict] | None = None,
                   **extra: Any) -> dict:
    """Each file's size and checksum; written last, the manifest's presence marks the stage complete.

    `known` (name → the bytes and sha256 its writer recorded, as `sealed_files` gives them): such
    a file's entry is its writer's record, not hashed again. The manifest then holds what the
    writer wrote, not what is on disk now: a file damaged since (same size or not) fails the
    manifest's next check, and is made again, instead of being signed as good."""
    directory = Path(directory)
    known = known or {}
    if files is None:
        files = sorted(
            str(p.relative_to(directory))
            for p in directory.rglob("*")
            if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")
        )
    entries = {
        f: dict(known[f]) if f in known else {"bytes": (directory / f).stat().st_size, "sha256": sha256_file(directory / f)}
        for f in files
    }
    return {"key": key, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "files": entries, **extra}


def read_manifest(directory: Path, verify: bool = True) -> dict | None:
    """The manifest if the stage is complete and intact, else None."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = read_json(path)
        return None if mismatch(directory, manifest.get("files", {}), verify) else manifest
    except (ValueError, KeyError, TypeError, AttributeError):  # a damaged manifest: not JSON, or not a manifest's shape
        return None


def mismatch(directory: Path, files: dict[str, dict], verify: bool = True) -> str | None:
    """Why the files listed (name → recorded bytes and sha256, as a manifest or a seal lists
    them) are not what was recorded, or None when they are."""
    for name, meta in files.items():
        f = Path(directory) / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != meta["bytes"]:
            return f"{name} has {f.stat().st_size} bytes, its writer recorded {meta['bytes']}"
        if verify and sha256_file(f) != meta["sha256"]:
            return f"{name} does not match the sha256 its writer recorded"
    return None


SEALS = "seals"
"""A stage's seals: one small manifest per unit of work a resume may keep (a teacher pack, a
labels part), written by the worker right after the unit's files, with their sizes and sha256."""


def seal_name(unit: str) -> str:
    return f"{SEALS}/{unit}.json"


def sealed_files(directory: Path) -> dict[str, dict]:
    """name → {bytes, sha256} for every file a seal of `directory` lists, as its writer recorded
    them (a seal that does not parse lists nothing). What `build_manifest` takes as `known`, so
    that a stage's manifest does not hash its units' files a second time. Measured (medians, page
    cache warm): the manifest of the default run's teacher stage (30 MB) 28 ms → 1 ms; of 256
    teachers' predictions on 300,000 rows (3.35 GB) 2.5 s → 1 ms (`benchmarks/bench_scale.py --ks`)."""
    out: dict[str, dict] = {}
    for path in sorted((Path(directory) / SEALS).glob("*.json")):
        try:
            files = {name: {"bytes": int(rec["bytes"]), "sha256": str(rec["sha256"])} for name, rec in read_json(path).get("files", {}).items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
        out |= files
    return out


def check_seal(directory: Path, unit: str, verify: bool = True) -> str | None:
    """None when the unit's seal exists and every file it lists has the size and sha256 its
    writer recorded; else why not. A file that parses is not thereby good: a same-size damaged
    file reads as valid Parquet, only its checksum tells. `verify=False` checks the sizes only:
    for a unit its writer sealed moments ago in this run, whose checksums the stage's manifest
    takes from the seal (`sealed_files`), so that its next check still reads every byte."""
    directory = Path(directory)
    path = directory / seal_name(unit)
    if not path.is_file():
        return "no seal (written before its files were complete, or by an older version)"
    try:
        return mismatch(directory, read_json(path).get("files", {}), verify)
    except (ValueError, KeyError, TypeError, AttributeError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return f"its seal {path.name} is damaged"


def reset_dir(directory: Path) -> Path:
    """An empty directory: what an interrupted run left there is discarded."""
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    return directory


def replace_dir(src: Path, dst: Path) -> None:
    """Move a fully written directory into place, replacing (never merging with) what was there."""
    dst = Path(dst)
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)


# --- Arrow <-> numpy ---------------------------------------------------------------------------


def fixed_list(a: np.ndarray) -> pa.FixedSizeListArray:
    """`[rows, size]` as a fixed-size-list column of float32 (how every matrix is stored)."""
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(a, np.float32).reshape(-1)), a.shape[1])


def matrix(col: Any, copy: bool = False) -> np.ndarray:
    """A fixed-size-list column as `[rows, size]`: zero-copy and read-only (Arrow's buffer),
    or a writable copy."""
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    out = col.flatten().to_numpy().reshape(len(col), col.type.list_size)
    return out.copy() if copy else out
