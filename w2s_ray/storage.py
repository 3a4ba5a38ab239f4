"""Run directories on any pyarrow filesystem: a local or NFS path, `file://`, `s3://`, `gs://`, `hdfs://`.

`output.root` is the one key. A plain path is used as it is (on a cluster: a filesystem every
node mounts at the same path). For a URI the run lives in the store, and the driver works in a
local copy of it (under `output.cache`):

- every file an artifact writer finishes is uploaded at once, object stores by one atomic PUT,
  filesystems under a temporary name then moved; a stage's manifest is written last, so a
  stage counts as complete in the store only once all its files are there;
- a stage missing locally is downloaded from the store before it is checked, so a run resumes
  on another machine (a teacher stage pack by pack) and a finished one is never recomputed;
- pseudo-labels are written and read by Ray Data directly in the store, and Tune keeps its
  experiment state and checkpoints there, so workers on every node see the same files.

Everything else keeps working on local paths; the stores are found by the local path a
writer was given.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.fs as pafs

DEFAULT_CACHE = "~/.cache/w2s-ray"
OBJECT_STORES = {"s3", "gcs", "abfs"}  # a PUT is atomic; there are no directories to move


def is_uri(root: str) -> bool:
    return "://" in root


def open_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it); pyarrow's errors for an unknown scheme or bad URI pass up."""
    fs, path = pafs.FileSystem.from_uri(uri)
    return fs, path.rstrip("/")


@dataclass(frozen=True)
class Store:
    """A run directory in a filesystem, and the local copy the driver works in."""

    fs: pafs.FileSystem
    base: str
    local: Path

    def path_of(self, local: Path) -> str:
        rel = Path(os.path.abspath(local)).relative_to(self.local).as_posix()
        return self.base if rel == "." else f"{self.base}/{rel}"

    @property
    def atomic_put(self) -> bool:
        return self.fs.type_name in OBJECT_STORES


_STORES: dict[Path, Store] = {}


def run_dir(root: str, name: str, cache: str | None = None) -> Path:
    """The local directory a run's stages work in; for a URI root, its store is registered
    (once: opening an object store may cost a network round trip)."""
    if not is_uri(root):
        return Path(root) / name
    parts = urlsplit(root)  # the host, never the credentials a URI may carry
    local = Path(os.path.abspath(Path(cache or DEFAULT_CACHE).expanduser() / parts.scheme / (parts.hostname or "") / parts.path.strip("/") / name))
    if local not in _STORES:
        fs, base = open_filesystem(root)
        _STORES[local] = Store(fs, f"{base}/{name}", local)
    return local


def store_of(path: Path) -> Store | None:
    """The store whose local copy holds `path`, if any."""
    if not _STORES:
        return None
    p = Path(os.path.abspath(path))
    for local, store in _STORES.items():
        if p == local or local in p.parents:
            return store
    return None


def remote(path: Path) -> tuple[pafs.FileSystem, str] | None:
    """(filesystem, path) of `path` in its store, for Ray Data and Tune; None for a local run."""
    store = store_of(path)
    return (store.fs, store.path_of(path)) if store else None


# --- keeping the store in step with the local copy ----------------------------------------


def push(path: Path) -> None:
    """Upload one finished local file."""
    store = store_of(path)
    if store is None:
        return
    dst = store.path_of(path)
    parent = dst.rsplit("/", 1)[0]
    store.fs.create_dir(parent, recursive=True)
    tmp = dst if store.atomic_put else f"{parent}/.{Path(dst).name}.{uuid.uuid4().hex[:8]}.tmp"
    pafs.copy_files(str(path), tmp, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=store.fs)
    if tmp != dst:
        store.fs.move(tmp, dst)


def push_tree(directory: Path) -> None:
    """Upload a directory written by a tool that writes its own files (TensorBoard)."""
    if store_of(directory) is None:
        return
    for f in sorted(Path(directory).rglob("*")):
        if f.is_file():
            push(f)


def delete(path: Path) -> None:
    """Delete the file or directory at `path` in the store, if there is one."""
    store = store_of(path)
    if store is None:
        return
    dst = store.path_of(path)
    kind = store.fs.get_file_info(dst).type
    if kind == pafs.FileType.Directory:
        store.fs.delete_dir(dst)
    elif kind == pafs.FileType.File:
        store.fs.delete_file(dst)


def pull(directory: Path) -> bool:
    """Download a directory from the store into the local copy (files there win over local
    ones, local-only files stay); False when the store has nothing there."""
    return pull_into(directory, directory)


def pull_into(directory: Path, local: Path) -> bool:
    """Download `directory`'s counterpart in the store into the local directory `local`."""
    store = store_of(directory)
    if store is None:
        return False
    src = store.path_of(directory)
    if store.fs.get_file_info(src).type != pafs.FileType.Directory:
        return False
    infos = store.fs.get_file_info(pafs.FileSelector(src, recursive=True))
    files = [i for i in infos if i.type == pafs.FileType.File and not i.base_name.startswith(".")]
    for info in files:
        dst = Path(local) / info.path[len(src) + 1 :]
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:8]}.tmp")
        pafs.copy_files(info.path, str(tmp), source_filesystem=store.fs, destination_filesystem=pafs.LocalFileSystem())
        os.replace(tmp, dst)
    return bool(files)


def move_tree(src: Path, dst: Path) -> None:
    """Rename a directory in the store too (object stores: copy, then delete)."""
    store = store_of(src)
    if store is None:
        return
    a, b = store.path_of(src), store.path_of(dst)
    if store.fs.get_file_info(a).type != pafs.FileType.Directory:
        return
    if store.atomic_put:
        pafs.copy_files(a, b, source_filesystem=store.fs, destination_filesystem=store.fs)
        store.fs.delete_dir(a)
    else:
        store.fs.move(a, b)
