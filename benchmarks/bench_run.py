"""A run from nothing, as a user starts it: `w2s-ray run` (or `w2s-ray study claims`) in a new,
empty directory, its own embedded Ray on every core, timed from the command's start to its exit,
with the time of each stage read from the progress lines on stderr, and the CPU-seconds the
whole machine spent meanwhile (`/proc/stat`, Linux; the command's Ray processes included, which
a child's rusage misses once Ray's daemons are reparented): on 2 cores a run's wall hides work
its start-up overlaps, the CPU-seconds do not. Run it on an otherwise idle machine.

`--baseline DIR` runs another checkout of w2s-ray (e.g. a `git worktree` of an earlier commit)
the same way, with `PYTHONPATH=DIR` for the command and its Ray workers, interleaved with this
checkout rep by rep, so the ratio is measured side by side on the same machine state. Each
printed run names the checkout that ran it and its first student row, so a baseline that
silently ran this checkout's code would show.

    .venv/bin/python benchmarks/bench_run.py --baseline /tmp/old            # the default run, median of 3
    .venv/bin/python benchmarks/bench_run.py --study claims --reps 1 --baseline /tmp/old
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import common  # sets the environment for a local Ray

REPO = Path(__file__).resolve().parents[1]
STAGES = ("data", "teachers", "labels", "students")


def timed_run(argv: list[str], checkout: Path, sets: dict, keep: Path | None = None) -> dict:
    """One command from nothing in a new directory (`keep`, left in place, if given): wall time,
    the seconds between the stage progress lines, and the first student row of the result."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["PYTHONPATH"] = str(checkout)
    cmd = [sys.executable, "-m", "w2s_ray.cli", *argv] + [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]
    with tempfile.TemporaryDirectory(prefix="bench_run_") as tmp:
        cwd = tmp if keep is None else keep
        if keep is not None:
            keep.mkdir(parents=True)
        cpu0, t0 = common.machine_cpu_s(), time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        marks: dict[str, float] = {}
        err: list[str] = []

        def read_stderr() -> None:
            for line in proc.stderr:
                now = time.perf_counter() - t0
                err.append(line)
                if line.startswith("[w2s-ray] "):
                    marks.setdefault("first line", now)
                    word = line[len("[w2s-ray] "):].split(":", 1)[0].split(" ", 1)[0]
                    if word in STAGES:
                        marks.setdefault(word, now)
                    if word == "done":
                        marks["done"] = now

        reader = threading.Thread(target=read_stderr)
        reader.start()
        out = proc.stdout.read()
        proc.wait()
        reader.join()
        wall, cpu1 = time.perf_counter() - t0, common.machine_cpu_s()
    if proc.returncode != 0:
        sys.exit(f"{' '.join(argv)} in {checkout} exited {proc.returncode}:\n{''.join(err)[-3000:]}")
    points = [("start", 0.0)] + sorted(((k, v) for k, v in marks.items() if k in STAGES), key=lambda kv: kv[1])
    points.append(("done", marks.get("done", wall)))
    parts = {"start-up": points[1][1] if len(points) > 2 else 0.0}
    for (name, at), (_, nxt) in zip(points[1:-1], points[2:]):
        parts[name] = nxt - at
    parts["exit"] = wall - points[-1][1]
    rows = [ln.strip() for ln in out.splitlines() if ln.strip()]
    first = next((ln for ln in rows if ln.startswith("student")), rows[0] if rows else "")
    return {"wall": wall, "cpu": None if cpu0 is None else cpu1 - cpu0, "parts": parts, "first": first}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", choices=["claims"], help="time `w2s-ray study KIND` instead of `w2s-ray run`")
    ap.add_argument("--config", help="an experiment config (default: the default experiment)")
    ap.add_argument("--baseline", type=Path, help="another checkout of w2s-ray to run the same way, interleaved")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--keep", type=Path, help="a new directory where this checkout's last rep runs and stays (its runs/ for a report)")
    ap.add_argument("--smoke", action="store_true", help="the tests' small data, one rep: checks that the script runs")
    args = ap.parse_args()
    argv = (["study", args.study] if args.study else ["run"]) + ([args.config] if args.config else [])
    sets = common.SMOKE_RUN if args.smoke else {}
    reps = 1 if args.smoke else args.reps
    checkouts = {"this checkout": REPO} | ({"baseline": args.baseline.resolve()} if args.baseline else {})
    print(f"w2s-ray {' '.join(argv)} from nothing, in a new directory each time, one process with its own embedded Ray on "
          f"{os.cpu_count()} CPUs; {reps} rep(s), the checkouts interleaved" + (" (smoke: small data)" if args.smoke else ""))
    runs: dict[str, list[dict]] = {name: [] for name in checkouts}
    for rep in range(reps):
        for name, path in checkouts.items():
            keep = args.keep if name == "this checkout" and rep == reps - 1 else None
            r = timed_run(argv, path, sets, keep)
            runs[name].append(r)
            parts = ", ".join(f"{k} {v:.1f}" for k, v in r["parts"].items())
            cpu = "" if r["cpu"] is None else f", {r['cpu']:.1f} CPU-s"
            print(f"  rep {rep + 1} {name} ({path}): {r['wall']:.1f} s{cpu}  [{parts}]  first student row: {r['first'][:90]}", flush=True)
    med = {name: statistics.median(r["wall"] for r in rs) for name, rs in runs.items()}
    for name, rs in runs.items():
        keys = list(rs[0]["parts"])
        parts = ", ".join(f"{k} {statistics.median(r['parts'].get(k, 0.0) for r in rs):.1f}" for k in keys)
        cpu = "" if rs[0]["cpu"] is None else f", median machine CPU {statistics.median(r['cpu'] for r in rs):.1f} CPU-s"
        print(f"{name}: median wall {med[name]:.1f} s{cpu} over {len(rs)} rep(s); median seconds per part: {parts}")
    if args.baseline:
        print(f"ratio baseline / this checkout (median walls): {med['baseline'] / med['this checkout']:.2f}x")
        if runs["baseline"][0]["cpu"] is not None:
            cpus = {name: statistics.median(r["cpu"] for r in rs) for name, rs in runs.items()}
            print(f"ratio baseline / this checkout (median machine CPU-seconds): {cpus['baseline'] / cpus['this checkout']:.2f}x")


if __name__ == "__main__":
    main()
