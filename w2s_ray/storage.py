"""Run directories on any pyarrow filesystem: a local or NFS path, `file://`, `s3://`, `gs://`, `hdfs://`.

`output.root` is the one key. A plain path is used as it is (on a cluster: a filesystem every
node mounts at the same path). For a URI the run lives in the store, and the driver works in a
local copy of it (under `output.cache`).

`RunDir` is the run directory and the one place that talks to its store, with explicit verbs:

- `write_*` / `atomic`: write a file locally under a temporary name, rename it, then `publish`
  it (object stores: one atomic PUT; filesystems: a temporary name, then a move);
- `write_manifest` last, so a stage counts as complete in the store only once all its files are;
- `open_stage`: a stage's directory, with what the store holds of it `fetch`ed first when it is
  not complete locally, so a run resumes on another machine (a teacher stage pack by pack) and a
  finished stage is never recomputed;
- `remote`: the store path of a local one, for Ray Data and Tune, which read and write the store
  directly so that workers on every node see the same files.

A `RunDir` is opened once per run by `run.RunContext` and passed down; there is no registry of
stores. Opening a root pyarrow cannot open is a `ConfigError` naming `output.root`.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Iterator, TypeVar
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from w2s_ray import artifacts
from w2s_ray.errors import ConfigError, MissingArtifact, W2SError

DEFAULT_CACHE = "~/.cache/w2s-ray"
T = TypeVar("T")
OBJECT_STORES = {"s3", "gcs", "abfs"}  # a PUT is atomic; there are no directories to move


def is_uri(root: str) -> bool:
    return "://" in root


def open_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it); pyarrow's errors for an unknown scheme or bad URI pass up."""
    fs, path = pafs.FileSystem.from_uri(uri)
    return fs, path.rstrip("/")


@dataclass(frozen=True)
class Store:
    """The remote counterpart of a run directory."""

    fs: pafs.FileSystem
    base: str

    @property
    def atomic_put(self) -> bool:
        return self.fs.type_name in OBJECT_STORES


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _first_missing(path: Path) -> Path | None:
    """The topmost folder of `path` that does not exist yet (None: all of it exists)."""
    missing = None
    for d in (path, *path.parents):
        if d.exists():
            break
        missing = d
    return missing


def _writable(path: Path, key: str, value: str) -> Path:
    """`path` as a directory this process can write to, or a `ConfigError` naming `key`."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".w2s-write-probe-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except FileExistsError:
        raise ConfigError(f"{key}: {value!r}: {path} or a folder above it is a file, not a directory") from None
    except NotADirectoryError:
        raise ConfigError(f"{key}: {value!r}: a part of {path} is a file, not a directory") from None
    except PermissionError:
        raise ConfigError(f"{key}: {value!r}: no permission to write in {path}") from None
    except OSError as err:
        raise ConfigError(f"{key}: {value!r}: cannot write in {path}: {err.strerror}") from None
    return path


@dataclass(frozen=True)
class RunDir:
    """A run's local working directory and, for a URI root, the store it mirrors."""

    path: Path
    store: Store | None = None
    wait: bool = True  # for a stage another run holds: wait (False: stop with a message)
    created: Path | None = None  # the topmost folder opening it created (`prune_empty` goes up to it)
    LEASE_S: ClassVar[float] = 120.0  # a store lease not renewed for this long is taken over
    LEASE_SETTLE_S: ClassVar[float] = 1.0  # wait before reading a new lease back

    @classmethod
    def open(cls, root: str, name: str, cache: str | None = None, wait: bool = True) -> "RunDir":
        """The run directory, created and checked writable (`ConfigError` naming the key if not)."""
        if not is_uri(root):
            # absolute: every path a stage derives from it crosses into Ray workers and Tune
            # trials, which run in working directories of their own
            path = Path(os.path.abspath(Path(root).expanduser() / name))
            created = _first_missing(path)
            return cls(_writable(path, "output.root", root), wait=wait, created=created)
        parts = urlsplit(root)  # the host, never the credentials a URI may carry
        local = Path(os.path.abspath(Path(cache or DEFAULT_CACHE).expanduser() / parts.scheme / (parts.hostname or "") / parts.path.strip("/") / name))
        try:
            fs, base = open_filesystem(root)
        except Exception as err:  # pyarrow raises several kinds
            raise ConfigError(f"output.root: cannot open {root!r} as a pyarrow filesystem URI: {err}") from None
        created = _first_missing(local)
        return cls(_writable(local, "output.cache", cache or DEFAULT_CACHE), Store(fs, f"{base}/{name}"), wait, created)

    def __truediv__(self, part: str) -> Path:
        return self.path / part

    # --- paths ----------------------------------------------------------------------------

    def stage(self, stage: str, key: str) -> Path:
        return self.path / stage / key

    def open_stage(self, stage: str, key: str) -> Path:
        """A stage's directory; when it is not complete locally, what the store holds is fetched."""
        d = self.stage(stage, key)
        if not (d / artifacts.MANIFEST).is_file():
            self.fetch(d)
        return d

    def remote_path(self, local: Path) -> str:
        rel = Path(os.path.abspath(local)).relative_to(self.path).as_posix()
        return self.store.base if rel == "." else f"{self.store.base}/{rel}"

    def remote(self, local: Path) -> tuple[pafs.FileSystem, str] | None:
        """(filesystem, path) of `local` in the store, for Ray Data and Tune; None for a local run."""
        return (self.store.fs, self.remote_path(local)) if self.store else None

    # --- writing: locally, atomically, then published ------------------------------------

    @contextmanager
    def atomic(self, path: Path) -> Iterator[Path]:
        """A temporary sibling of `path`, renamed onto it and published if the block succeeds."""
        with artifacts.atomic_path(path) as tmp:
            yield tmp
        self.publish(Path(path))

    def write_text(self, path: Path, text: str) -> Path:
        artifacts.write_text(path, text)
        self.publish(path)
        return path

    def write_json(self, path: Path, obj: Any) -> Path:
        artifacts.write_json(path, obj)
        self.publish(path)
        return path

    def write_parquet(self, path: Path, table: pa.Table, row_group_size: int | None = None) -> Path:
        artifacts.write_parquet(path, table, row_group_size)
        self.publish(path)
        return path

    def write_manifest(self, directory: Path, key: str, **extra: Any) -> dict:
        """Last write of a stage: its files' sizes and checksums; marks it complete. A file a
        seal of the stage lists gets the checksum its writer recorded (`artifacts.sealed_files`)."""
        manifest = artifacts.build_manifest(directory, key, known=artifacts.sealed_files(directory), **extra)
        self.write_json(directory / artifacts.MANIFEST, manifest)
        return manifest

    def seal(self, directory: Path, unit: str, files: list[Path]) -> None:
        """Record the sizes and sha256 of a finished unit's files (`artifacts.check_seal`), right
        after writing them: a resume keeps the unit only if its files still match."""
        rel = [Path(f).relative_to(directory).as_posix() for f in files]
        self.write_json(Path(directory) / artifacts.seal_name(unit), artifacts.build_manifest(directory, unit, rel))

    def reset(self, directory: Path) -> Path:
        """Start a stage afresh, here and in the store."""
        self.delete(directory)
        return artifacts.reset_dir(directory)

    def prune_empty(self) -> None:
        """Remove the empty directories of the local run directory, itself and the folders above
        it that opening it created included when they are empty: what a failed command created
        (a stage directory it locked, the run's folder, the root) and never filled. Files are
        never removed."""
        for d in sorted((p for p in self.path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            if (d.parent / f".{d.name}.lock").exists():
                continue  # another run holds it, and may be about to fill it
            with suppress(OSError):
                d.rmdir()  # only succeeds when empty
        top = self.created or self.path
        for d in (self.path, *self.path.parents):
            with suppress(OSError):
                d.rmdir()
            if d == top or d.exists():
                break

    def remove(self, path: Path) -> None:
        """Delete a file here and in the store (a manifest, to mark its stage incomplete)."""
        Path(path).unlink(missing_ok=True)
        self.delete(path)

    @contextmanager
    def claim(self, directory: Path, what: str, complete: Callable[[], T | None]) -> Iterator[T | None]:
        """The one protocol of every stage: yields `complete()` (a stage's manifest) when the
        stage is complete; else takes the lock (`lock`), checks again, and yields None while
        holding it: the caller builds the stage. A run that waited for another to finish the
        stage gets that run's result, never redoes or removes it."""
        done = complete()
        if done is not None:
            yield done
            return
        with self.lock(directory, what):
            yield complete()

    @contextmanager
    def lock(self, directory: Path, what: str) -> Iterator[None]:
        """Hold `directory` for this run while it writes a stage there (`locks` of one)."""
        with self.locks([directory], what):
            yield

    @contextmanager
    def locks(self, directories: Iterable[Path], what: str) -> Iterator[None]:
        """Hold every one of `directories` for this run while it writes there. A second run that
        reaches one waits for the holder, with a line on stderr every `WAIT_LOG_S` (`wait`
        False, `--no-wait`: it stops with a message instead). They are taken in sorted order, so
        two runs that want some of the same cannot deadlock.

        Locally (and on a shared filesystem) a lock is a file created exclusively beside its
        directory; a lock left by a process that died on this host is taken over. With a store,
        a run on another machine (its own cache) is kept out by lease objects in the store too,
        see `_leases`: all of them written, then read back after one settle."""
        dirs = sorted(set(directories))
        with ExitStack() as held:
            locks = [held.enter_context(self._file_lock(d, what)) for d in dirs]
            held.enter_context(self._leases(list(zip(locks, dirs)), what))
            for d in dirs:
                d.mkdir(exist_ok=True)
            yield

    @contextmanager
    def _file_lock(self, directory: Path, what: str) -> Iterator[Path]:
        """The local lock file of `directory`, created exclusively, removed on exit."""
        directory.parent.mkdir(parents=True, exist_ok=True)
        # beside the directory, not in it: a stage may reset its directory while holding the lock
        lock, me = directory.parent / f".{directory.name}.lock", f"{socket.gethostname()} {os.getpid()}"
        waited, t0 = None, time.monotonic()
        while True:
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
                break
            except FileExistsError:
                try:
                    holder = lock.read_text().strip()
                except FileNotFoundError:
                    continue  # released just now
                host, _, pid = holder.partition(" ")
                if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
                    lock.unlink(missing_ok=True)  # its run died: take over
                    continue
                waited = self._wait(waited, t0, f"{what} {directory} is being written by another run ({holder or 'unknown'})",
                                    f"remove {lock} if that run is gone")
        with os.fdopen(fd, "w") as f:
            f.write(me)
        try:
            yield lock
        finally:
            lock.unlink(missing_ok=True)

    WAIT_LOG_S: ClassVar[float] = 30.0
    WAIT_POLL_S: ClassVar[float] = 0.5

    def _wait(self, last: float | None, t0: float, busy: str, gone: str) -> float:
        """Refuse (`wait` False), or sleep once and say so every `WAIT_LOG_S`; returns when it last said so."""
        if not self.wait:
            raise W2SError(f"{busy}; wait for it to finish (without --no-wait a run waits), or {gone}")
        now = time.monotonic()
        if last is None or now - last >= self.WAIT_LOG_S:
            print(f"[w2s-ray] {busy}: waiting for it ({now - t0:.0f}s so far; {gone})", file=sys.stderr, flush=True)
            last = now
        time.sleep(self.WAIT_POLL_S)
        return last

    @contextmanager
    def _leases(self, held: list[tuple[Path, Path]], what: str) -> Iterator[None]:
        """Leases in the store for (lock file, directory) pairs: `{owner, expires}` JSON at each
        lock's store path, renewed every `LEASE_S / 4` seconds by one thread while held, deleted
        on release. Object stores offer no exclusive create, so the leases are written, read back
        after `LEASE_SETTLE_S`, and kept only if all are still ours (of two runs that wrote at
        once, the last writer keeps each; a run that lost any gives back those it won and waits,
        so two runs never each hold a part). One settle for all: the student stage takes a lease
        per student, and a settle each cost a default run 20 s of its 57 on a `file://` store
        (`benchmarks/bench_storage.py`). A lease not renewed for `LEASE_S` (its run died) is
        taken over; clocks must agree to well within that (NTP does)."""
        if self.store is None or not held:
            yield
            return
        fs = self.store.fs
        paths = {self.remote_path(lock): directory for lock, directory in held}
        me = f"{socket.gethostname()} {os.getpid()} {uuid.uuid4().hex[:8]}"

        def read(path: str) -> dict:
            try:
                with fs.open_input_stream(path) as f:
                    return json.loads(f.read() or b"{}")
            except (FileNotFoundError, OSError, ValueError):
                return {}

        def write(path: str) -> None:
            # whole or not at all: a local or NFS stream is truncated on open, and a reader that
            # came between truncate and write would see no lease and take it (object stores put
            # an object whole on close, and the move is a copy)
            tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
            with fs.open_output_stream(tmp) as f:
                f.write(json.dumps({"owner": me, "expires": time.time() + self.LEASE_S}).encode())
            fs.move(tmp, path)

        def refuse(path: str, holder: dict) -> tuple[str, str]:
            return (f"{what} {paths[path]} is being written by another run ({holder.get('owner', 'unknown')}, lease in the store at {path})",
                    f"delete that object if the run is gone (a lease not renewed expires after {self.LEASE_S:g}s)")

        def release(path: str) -> None:
            if read(path).get("owner") == me:
                fs.delete_file(path)

        waited, t0 = None, time.monotonic()
        while True:
            busy = next(((p, h) for p in paths if (h := read(p)).get("owner") not in (None, me) and h.get("expires", 0) > time.time()), None)
            if busy is not None:
                waited = self._wait(waited, t0, *refuse(*busy))
                continue
            for p in paths:
                fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
                write(p)
            time.sleep(self.LEASE_SETTLE_S)
            lost = next(((p, h) for p in paths if (h := read(p)).get("owner") != me), None)
            if lost is None:
                break
            for p in paths:
                release(p)
            waited = self._wait(waited, t0, *refuse(*lost))
        stop = threading.Event()

        def renew() -> None:
            while not stop.wait(self.LEASE_S / 4):
                for p in paths:
                    if read(p).get("owner") == me:
                        write(p)

        thread = threading.Thread(target=renew, name="w2s-lease", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            for p in paths:
                release(p)

    # --- the store ------------------------------------------------------------------------

    def publish(self, path: Path) -> None:
        """Upload one finished local file (nothing to do for a local run)."""
        if self.store is None:
            return
        fs, dst = self.store.fs, self.remote_path(path)
        parent = dst.rsplit("/", 1)[0]
        fs.create_dir(parent, recursive=True)
        tmp = dst if self.store.atomic_put else f"{parent}/.{Path(dst).name}.{uuid.uuid4().hex[:8]}.tmp"
        pafs.copy_files(str(path), tmp, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        if tmp != dst:
            fs.move(tmp, dst)

    def publish_tree(self, directory: Path) -> None:
        """Upload a directory written by a tool that writes its own files (TensorBoard)."""
        if self.store is None:
            return
        for f in sorted(Path(directory).rglob("*")):
            if f.is_file():
                self.publish(f)

    def delete(self, path: Path) -> None:
        """Delete the file or directory at `path` in the store, if there is one."""
        if self.store is None:
            return
        fs, dst = self.store.fs, self.remote_path(path)
        kind = fs.get_file_info(dst).type
        if kind == pafs.FileType.Directory:
            fs.delete_dir(dst)
        elif kind == pafs.FileType.File:
            fs.delete_file(dst)

    def fetch(self, directory: Path, into: Path | None = None) -> bool:
        """Download `directory` from the store into the local copy (or into `into`); files from
        the store win over local ones, local-only files stay. False when the store has nothing."""
        if self.store is None:
            return False
        fs, src = self.store.fs, self.remote_path(directory)
        if fs.get_file_info(src).type != pafs.FileType.Directory:
            return False
        infos = fs.get_file_info(pafs.FileSelector(src, recursive=True))
        files = [i for i in infos if i.type == pafs.FileType.File and not i.base_name.startswith(".")]
        for info in files:
            dst = Path(into or directory) / info.path[len(src) + 1 :]
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:8]}.tmp")
            pafs.copy_files(info.path, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
            os.replace(tmp, dst)
        return bool(files)

    def fetch_file(self, path: Path) -> bool:
        """Download one file from the store unless it is here already (a file a worker on another
        node wrote and published). False when neither has it."""
        if path.is_file():
            return True
        if self.store is None:
            return False
        fs, src = self.store.fs, self.remote_path(path)
        if fs.get_file_info(src).type != pafs.FileType.File:
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        pafs.copy_files(src, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        os.replace(tmp, path)
        return True

    def need(self, path: Path, what: str) -> Path:
        """`path`, fetched from the store when only the store has it (a file a worker on another
        node wrote); a `MissingArtifact` naming `what` (the stage and the file's role) when
        neither has it. Every reader of another stage's file goes through here."""
        if self.fetch_file(path):
            return path
        where = "neither here nor in the run's store" if self.store is not None else "not here, and this run has no store"
        hint = ("; on a cluster, output.root must be a filesystem every node mounts or a URI" if self.store is None
                else "; rerun the stage that writes it")
        raise MissingArtifact(f"{what}: {path} is {where}{hint}")

    def read_table(self, path: Path, what: str, **kwargs: Any) -> pa.Table:
        """A Parquet file of a stage (`need`, then pyarrow's `read_table` with `kwargs`)."""
        return pq.read_table(self.need(path, what), **kwargs)

    def read_json(self, path: Path, what: str) -> Any:
        """A JSON file of a stage (`need`, then parsed)."""
        return json.loads(self.need(path, what).read_text())

    def move_aside(self, directory: Path, new: Path) -> bool:
        """Rename a directory here and in the store (object stores: copy, then delete)."""
        moved = False
        if self.store is not None:
            fs, a, b = self.store.fs, self.remote_path(directory), self.remote_path(new)
            if fs.get_file_info(a).type == pafs.FileType.Directory:
                if self.store.atomic_put:
                    pafs.copy_files(a, b, source_filesystem=fs, destination_filesystem=fs)
                    fs.delete_dir(a)
                else:
                    fs.move(a, b)
                moved = True
        if directory.exists():
            os.replace(directory, new)
            moved = True
        return moved
