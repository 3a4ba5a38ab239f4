"""Issue 12's scale benchmark: driver memory and wall time as the transfer split N and the
ensemble K grow, end to end.

`--ns` (end to end, data → teachers → labels → students → report): the built-in `synthetic`
source (MNIST-1D's shape, generated 200× faster; see `w2s_ray/synthetic.py`) with N transfer
rows, a fixed 2,000-row weak split and 4,000-row test split, K teachers with
`keep_predictions: none`, one MLP student on the dual mean. Each N runs in a fresh child
process with its own embedded Ray, stage after stage (`run_pipeline(until=...)` on the cached
earlier stages), and reports the wall time per stage, the driver's peak RSS (the child's own,
not its workers'), the object store's peak use per stage (every node's plasma bytes, sampled
twice a second; the sum over the run of what was created in it, and what was spilled) and the
bytes each stage wrote.

`--ks` (teacher and labels stages on the default data): driver memory vs K, what each
`keep_predictions` setting writes, and the driver's checks as the teacher stage ends, timed both
ways on the stage just written (page cache warm, medians of 3): every pack's files hashed again
(before 2026-12-07) against sizes only for the packs the stage's workers had just sealed
(`teachers.read_finished_pack`), and the manifest hashing every file against taking a sealed
file's checksum from its seal (`artifacts.sealed_files`).

    python benchmarks/bench_scale.py --ns 100000 1000000 [--k 256] [--run-root DIR]
    python benchmarks/bench_scale.py --ks 64 256 1024 [--keep all none]
    python benchmarks/bench_scale.py --smoke     # both, tiny: checks that it runs
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import shutil
import tempfile
import threading
import time
from pathlib import Path

import common

STAGES = ("data", "teachers", "labels", "student", "report")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def du(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20


class WorkerPeaks:
    """Peak RSS of every Ray worker process of this driver's embedded Ray (its descendants whose
    title starts with `ray::`), from /proc/<pid>/status VmHWM: the kernel's own high-water mark
    of each process, read while it lives. A worker's kind is the last title seen (`ray::PackTrainer`
    for a pack actor; tasks' workers show their task or `ray::IDLE`)."""

    def __init__(self) -> None:
        import psutil  # Ray's own dependency

        self._me = psutil.Process()
        self.peak_mb: dict[int, float] = {}
        self.kind: dict[int, str] = {}

    def sample(self) -> None:
        for proc in self._me.children(recursive=True):
            try:
                title = " ".join(proc.cmdline())
                if not title.startswith("ray::"):
                    continue
                hwm = next(int(line.split()[1]) for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines() if line.startswith("VmHWM:"))
            except Exception:  # the process ended between the listing and the read
                continue
            self.peak_mb[proc.pid] = max(self.peak_mb.get(proc.pid, 0.0), hwm / 1024)
            if "PackTrainer" in title or proc.pid not in self.kind:
                self.kind[proc.pid] = "pack actor" if "PackTrainer" in title else "other worker"

    def summary(self) -> dict[str, float]:
        """The largest peak RSS (MB) of any pack actor and of any other worker."""
        out = {"pack actor": 0.0, "other worker": 0.0}
        for pid, mb in self.peak_mb.items():
            out[self.kind[pid]] = max(out[self.kind[pid]], mb)
        return out


class StoreUse(threading.Thread):
    """The object store's use, sampled twice a second from the raylets (`store_stats`, summed
    over nodes): the peak of `object_store_bytes_used` since the last `reset()`."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        import ray
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        self._stats = lambda: get_memory_info_reply(get_state_from_address(ray.get_runtime_context().gcs_address)).store_stats
        self.peak, self.last, self._halt = 0, None, threading.Event()
        self.workers = WorkerPeaks()

    def sample(self) -> None:
        self.workers.sample()
        self.last = self._stats()
        self.peak = max(self.peak, self.last.object_store_bytes_used)

    def reset(self) -> None:
        self.peak = 0

    def run(self) -> None:
        while not self._halt.wait(0.5):
            try:
                self.sample()
            except Exception:  # a sample missed while Ray is busy; the next one counts
                pass

    def stop(self) -> dict[str, float]:
        self._halt.set()
        self.join()
        self.sample()
        return {"created_mb": self.last.cumulative_created_bytes / 2**20, "spilled_mb": self.last.spilled_bytes_total / 2**20,
                **{f"{kind} peak RSS MB": mb for kind, mb in self.workers.summary().items()}}


def end_to_end(args: tuple[str, int, int, int, int], queue) -> None:
    from w2s_ray.config import load_config
    from w2s_ray.pipeline import run_pipeline
    from w2s_ray.raytools import init_ray

    root, n, k, pack, epochs = args
    cfg = load_config(None, {
        "output.root": root, "output.name": f"n{n}",
        "data.source": "synthetic", "data.num_samples": n + 6000, "data.n_weak": 2000, "data.n_transfer": n, "data.n_test": 4000,
        "data.chunk_size": 100_000,
        "teachers.k": k, "teachers.keep_predictions": "none", "teachers.epochs": 10, "teachers.resources.max_pack_size": pack,
        "labels.rows_per_file": 100_000,
        "student.model.name": "mlp", "student.model.width": 64, "student.model.depth": 2, "student.epochs": epochs,
        "student.targets": ["dual_mean"], "student.ceiling": False, "output.tensorboard": False,
    })
    walls, rss, store = {}, {}, {}
    init_ray(cfg.ray)  # the pipeline joins this Ray; started here so the store can be sampled from the start
    use = StoreUse()
    use.start()
    for stage in STAGES:
        use.reset()
        t0 = time.perf_counter()
        st = run_pipeline(cfg, until=stage)
        walls[stage], rss[stage] = time.perf_counter() - t0, peak_mb()
        use.sample()
        store[stage] = use.peak / 2**20
    totals = use.stop()
    run = Path(root) / f"n{n}"
    written = {s: du(run / s) for s in ("data", "teachers", "labels", "student")}
    read = sorted(st.data.splits.loaded())
    queue.put((n, k, walls, rss, store, totals, written, read))


def driver_checks(run, stage: Path, keep: str, reps: int = 3) -> dict[str, float]:
    """Milliseconds (medians of `reps`) of the driver's work as a finished teacher stage ends,
    the former way and the present way, on the same files."""
    import statistics

    from w2s_ray import artifacts
    from w2s_ray.teachers import finished_packs

    fresh = frozenset(int(p.stem.split("-")[1]) for p in (stage / "packs").glob("pack-*.parquet"))
    ways = {
        "packs rehashed": lambda: finished_packs(run, stage, keep=keep),
        "packs sized": lambda: finished_packs(run, stage, keep=keep, fresh=fresh),
        "manifest rehashed": lambda: artifacts.build_manifest(stage, "k"),
        "manifest from seals": lambda: artifacts.build_manifest(stage, "k", known=artifacts.sealed_files(stage)),
    }
    out: dict[str, list[float]] = {w: [] for w in ways}
    for _ in range(reps):
        for w, fn in ways.items():
            t0 = time.perf_counter()
            fn()
            out[w].append(1000 * (time.perf_counter() - t0))
    return {w: statistics.median(ts) for w, ts in out.items()}


def teachers_and_labels(args: tuple[str, int, str, dict], queue) -> None:
    from w2s_ray.config import load_config
    from w2s_ray.pipeline import run_pipeline
    from w2s_ray.storage import RunDir

    root, k, keep, extra = args
    t0 = time.perf_counter()
    values = {"output.root": root, "output.name": "scale", "teachers.k": max(k, 2), "teachers.keep_predictions": keep} | extra
    st = run_pipeline(load_config(None, values), until="data" if k == 0 else "labels")
    if k == 0:
        queue.put(None)
        return
    wall, rss = time.perf_counter() - t0, peak_mb()
    checks = driver_checks(RunDir.open(root, "scale"), st.teachers.dir, keep)
    queue.put((k, keep, wall, rss, du(st.teachers.dir), checks))


def child(fn, args, ctx, queue):
    p = ctx.Process(target=fn, args=(args, queue))
    p.start()
    p.join()
    if p.exitcode != 0:
        raise SystemExit(f"{fn.__name__}{args}: the child exited with {p.exitcode}")
    return queue.get()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ns", type=int, nargs="*", default=[])
    ap.add_argument("--k", type=int, default=256)
    ap.add_argument("--pack", type=int, default=64, help="teachers.resources.max_pack_size (an actor's memory is pack × N × C × 4 bytes)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--ks", type=int, nargs="*", default=[])
    ap.add_argument("--keep", nargs="+", default=["all", "none"])
    ap.add_argument("--run-root", default=None)
    ap.add_argument("--keep-runs", action="store_true", help="keep the run directories (default: removed after each N)")
    ap.add_argument("--smoke", action="store_true", help="N 3,000 with K 4, and K 4 on small data: checks that it runs")
    a = ap.parse_args()
    extra = {}
    if a.smoke:
        a.ns, a.k, a.pack, a.epochs, a.ks, a.keep = [3000], 4, 2, 1, [4], ["none"]
        extra = {**common.SMOKE_DATA, "teachers.epochs": 2, "posterior.n_boot": 10}
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    root = a.run_root or tempfile.mkdtemp(prefix="w2s-scale-")
    if a.ns:
        print(f"{'N':>9} {'K':>5} | wall s: " + " ".join(f"{s:>8}" for s in STAGES) + f" {'total':>7} | driver peak RSS MB after: "
              + " ".join(f"{s:>8}" for s in STAGES) + " | MB written: data teachers labels student | splits read by driver")
        for n in a.ns:
            n_, k, walls, rss, store, totals, written, read = child(end_to_end, (root, n, a.k, a.pack, a.epochs), ctx, queue)
            print(f"{n_:>9,} {k:>5} | " + " ".join(f"{walls[s]:>8.1f}" for s in STAGES) + f" {sum(walls.values()):>7.1f} | "
                  + " ".join(f"{rss[s]:>8,.0f}" for s in STAGES) + " | " + " ".join(f"{written[s]:,.0f}" for s in written) + f" | {read}", flush=True)
            print(f"{'':>15} object store peak MB per stage: " + " ".join(f"{s} {store[s]:,.1f}" for s in STAGES)
                  + f"; created over the run {totals['created_mb']:,.1f} MB, spilled {totals['spilled_mb']:,.1f} MB", flush=True)
            print(f"{'':>15} worker peak RSS MB (VmHWM): pack actor {totals['pack actor peak RSS MB']:,.0f}, "
                  f"other worker {totals['other worker peak RSS MB']:,.0f}", flush=True)
            if not a.keep_runs:
                shutil.rmtree(Path(root) / f"n{n}", ignore_errors=True)
    if a.ks:
        if not a.smoke:  # the data, cached for the others (in smoke mode the first K builds it: a Ray start less)
            child(teachers_and_labels, (root, 0, "all", extra), ctx, queue)
        print(f"{'K':>6} {'keep':>7} {'wall s':>8} {'driver peak RSS MB':>19} {'teacher stage MB':>17} | the driver's end-of-stage checks, "
              "ms: packs rehashed / sized; manifest rehashed / from seals")
        for k in a.ks:
            for keep in a.keep:
                k_, keep_, wall, rss, mb, ms = child(teachers_and_labels, (root, k, keep, extra), ctx, queue)
                print(f"{k_:>6} {keep_:>7} {wall:>8.1f} {rss:>19,.0f} {mb:>17,.1f} | {ms['packs rehashed']:,.1f} / {ms['packs sized']:,.1f}; "
                      f"{ms['manifest rehashed']:,.1f} / {ms['manifest from seals']:,.1f}", flush=True)


if __name__ == "__main__":
    main()
