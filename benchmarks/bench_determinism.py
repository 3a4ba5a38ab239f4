"""(g) Is a student, or a teacher, the same bits on another x86 CPU? The default CNN student
and a pack of 16 MLP teachers trained in fresh processes that each see a different CPU,
emulated on this one, on the default path and on candidate CPU-independent paths; with their
cost.

    python benchmarks/bench_determinism.py [--rows 4000] [--epochs 3] [--reps 3] [--smoke]

A "CPU" here is what the libraries dispatch on, pinned by their own switches before torch
loads: `ATEN_CPU_CAPABILITY` (torch's vectorized kernels: reductions, softmax), oneDNN's
`ONEDNN_MAX_CPU_ISA` (convolutions) and MKL's `MKL_ENABLE_INSTRUCTIONS` (GEMM). "avx2 CPU"
caps all three at AVX2, as a CPU without AVX-512 would; "native" leaves them to the machine.
This emulates the kernel choice, not the hardware: another CPU model with the same ISA can
still differ (cache-size blocking, thread count), which this machine cannot show.

Student paths:
- default: the project's path (oneDNN convolutions, each library's own dispatch);
- oneDNN off: the switch alone;
- pinned: oneDNN off for the student (`torch.backends.mkldnn` disabled: conv1d runs as im2col +
  GEMM), torch's kernels pinned to AVX2 (`ATEN_CPU_CAPABILITY=avx2`), MKL's results pinned with
  its conditional numerical reproducibility switch (`MKL_CBWR=AVX2`).
Teacher paths (a pack of 16 MLP-32 teachers, `workers.train_pack_local`): default, and
`MKL_CBWR=AVX2` alone (the pack's matmuls are MKL's; it has no convolution).

Prints, per path and CPU, a hash of the trained student's test log-probabilities, whether the
two CPUs agree bitwise, the largest difference, and the median training time per path.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

CPUS = {"native": {}, "avx2 CPU": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}}
PATHS = {"default": {}, "oneDNN off": {"W2S_BENCH_MKLDNN": "0"}, "pinned": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "W2S_BENCH_MKLDNN": "0"}}
TEACHER_PATHS = {"default": {}, "MKL_CBWR": {"MKL_CBWR": "AVX2"}}


def child_teachers(rows: int, epochs: int, threads: int) -> None:
    """Train a pack of 16 MLP teachers on seeded data in this process; print its hash and time."""
    import numpy as np
    import torch

    from w2s_ray.config import TeachersConfig
    from w2s_ray.workers import train_pack_local

    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, 40)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0)
    data = {f"x_{s}": x for s in ("weak", "transfer", "test")} | {f"y_{s}": y for s in ("weak", "transfer", "test")}
    cfg = TeachersConfig(k=16, epochs=epochs, batch_size=128, model={"name": "mlp", "width": 32})
    t0 = time.perf_counter()
    out = train_pack_local(data, cfg, 3, list(range(16)))["logp_test"][:, :200]
    seconds = time.perf_counter() - t0
    print(json.dumps({"sha": hashlib.sha256(out.tobytes()).hexdigest()[:16], "seconds": seconds, "logp": out[0].tolist()}))


def child(rows: int, epochs: int, threads: int) -> None:
    """Train the default student on seeded data in this process; print its hash and time."""
    import numpy as np
    import torch

    from w2s_ray.config import StudentConfig
    from w2s_ray.student.core import train_student

    torch.set_num_threads(threads)
    torch.backends.mkldnn.enabled = os.environ.get("W2S_BENCH_MKLDNN", "1") == "1"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 40, generator=g)
    logits = x[:, :10] * 2 + torch.randn(rows, 10, generator=g)
    log_t = torch.log_softmax(logits, -1)
    cfg = StudentConfig(epochs=epochs, patience=epochs)
    t0 = time.perf_counter()
    res = train_student(cfg, x, log_t.exp(), log_t, 10)
    seconds = time.perf_counter() - t0
    from w2s_ray.models import build_model

    model = build_model(cfg.model, 40, 10)
    model.load_state_dict(res.state_dict)
    with torch.no_grad():
        out = torch.log_softmax(model.eval()(x[: min(rows, 1000)]), -1).numpy().astype(np.float32)
    print(json.dumps({"sha": hashlib.sha256(out.tobytes()).hexdigest()[:16], "seconds": seconds, "logp": out[:200].tolist()}))


def run(env: dict, rows: int, epochs: int, threads: int, what: str) -> dict:
    full = {**os.environ, **env}
    out = subprocess.run([sys.executable, __file__, "--child", what, "--rows", str(rows), "--epochs", str(epochs), "--threads", str(threads)],
                         env=full, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=4000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, one rep: checks that it runs")
    ap.add_argument("--child", choices=["student", "teachers"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.smoke:
        a.rows, a.epochs, a.reps = 300, 1, 1
    if a.child:
        (child if a.child == "student" else child_teachers)(a.rows, a.epochs, a.threads)
        return
    import numpy as np

    print(f"default CNN student, {a.rows} rows, {a.epochs} epochs, {a.threads} thread(s), {a.reps} rep(s) per cell; "
          f"CPUs emulated: {json.dumps(CPUS)}; paths: {json.dumps(PATHS)}")
    # the path's pins win over the emulated CPU's caps where both set a variable
    envs = {"student": PATHS, "teachers": TEACHER_PATHS}
    cells = [(what, path, cpu, rep) for what, paths in envs.items() for path in paths for cpu in CPUS for rep in range(a.reps)]
    # timed runs one at a time; the smoke run (no timing read) two at a time
    with ThreadPoolExecutor(2 if a.smoke else 1) as pool:
        done = dict(zip(cells, pool.map(lambda c: run({**CPUS[c[2]], **envs[c[0]][c[1]]}, a.rows, a.epochs, a.threads, c[0]), cells)))
    for what, paths in envs.items():
        times: dict[str, list[float]] = {p: [] for p in paths}
        for path in paths:
            results = {}
            for cpu in CPUS:
                outs = [done[(what, path, cpu, rep)] for rep in range(a.reps)]
                times[path] += [o["seconds"] for o in outs]
                assert len({o["sha"] for o in outs}) == 1, f"{what} {path}/{cpu}: not even the same bits run to run"
                results[cpu] = outs[0]
                print(f"{what:8s} {path:10s} {cpu:9s} sha {outs[0]['sha']}  train {np.median([o['seconds'] for o in outs]):.2f} s (median)")
            a_, b_ = (np.asarray(r["logp"]) for r in results.values())
            same = len({r["sha"] for r in results.values()}) == 1
            print(f"{what:8s} {path:10s} native vs avx2 CPU: {'bitwise identical' if same else 'DIFFER'}, max |Δ log p| {np.abs(a_ - b_).max():.2e}")
        med = {p: float(np.median(t)) for p, t in times.items()}
        last = list(paths)[-1]
        print(f"{what:8s} cost: {last} / default training time = {med[last] / med['default']:.2f}x "
              f"(medians {med[last]:.2f} s / {med['default']:.2f} s)")


if __name__ == "__main__":
    main()
