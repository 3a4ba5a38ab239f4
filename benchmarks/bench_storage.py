"""What a store costs: the default pipeline from scratch with `output.root` a local path, a
`file://` URI and an `s3://` bucket on a local S3 server (moto), interleaved, medians of `--reps`.
Also the cost of starting on a machine with an empty local copy (every stage fetched from the store).

    python benchmarks/bench_storage.py [--reps 3] [--config CONFIG] [--smoke]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import common

from w2s_ray.config import load_config
from w2s_ray.pipeline import run_pipeline
from w2s_ray.storage import RunDir


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--config", default=None)
    ap.add_argument("--smoke", action="store_true", help="small data up to the teachers, one rep: checks that it runs")
    a = ap.parse_args()
    until = "report"
    if a.smoke:
        a.reps, until = 1, "teachers"
    from moto.server import ThreadedMotoServer

    import pyarrow.fs as pafs

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    s3 = f"s3://bench:bench@w2s-bench/runs?endpoint_override={host}:{port}&scheme=http&region=us-east-1"
    pafs.FileSystem.from_uri(f"{s3}&allow_bucket_creation=true")[0].create_dir("w2s-bench")
    tmp = Path(tempfile.mkdtemp(prefix="w2s-bench-storage-"))
    roots = {"local path": str(tmp / "local"), "file://": f"file://{tmp / 'store'}", "s3:// (moto)": s3}
    common.start_ray()
    times: dict[str, list[float]] = {k: [] for k in roots}
    fetch: dict[str, list[float]] = {k: [] for k in roots if k != "local path"}
    for rep in range(a.reps):
        for label, root in roots.items():
            over = {"output.root": root, "output.name": f"r{rep}", "output.cache": str(tmp / "cache"), "output.tensorboard": False}
            over |= common.SMOKE_RUN if a.smoke else {}
            cfg = load_config(a.config, over)
            t0 = time.perf_counter()
            run_pipeline(cfg, until=until)
            times[label].append(time.perf_counter() - t0)
            if label in fetch:
                shutil.rmtree(RunDir.open(root, cfg.output.name, cfg.output.cache).path)  # a new machine: every stage comes from the store
                t0 = time.perf_counter()
                run_pipeline(cfg, until=until)
                fetch[label].append(time.perf_counter() - t0)
    base = statistics.median(times["local path"])
    print(f"\nthe default pipeline from scratch{'' if until == 'report' else ' up to ' + until}, medians of {a.reps} (interleaved):")
    for label, ts in times.items():
        print(f"  {label:14s} {statistics.median(ts):6.2f} s  ({statistics.median(ts) / base:.2f}x local)  {common.fmt_times(ts)}")
    print("a rerun with an empty local copy (all stages fetched from the store):")
    for label, ts in fetch.items():
        print(f"  {label:14s} {statistics.median(ts):6.2f} s  {common.fmt_times(ts)}")
    server.stop()
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
