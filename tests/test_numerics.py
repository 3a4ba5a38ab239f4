"""Pinned numerics (`w2s_ray.numerics`): every worker starts with them, they are part of the
cache keys, and a run's teachers and students are the same bits on a second x86 CPU (emulated
on this one by capping MKL and oneDNN at AVX2 for the whole run)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import small_config


def test_workers_start_with_the_pins(ray_session):
    import ray

    from w2s_ray import numerics

    @ray.remote
    def seen():
        import torch

        return {k: os.environ.get(k) for k in numerics.PINS}, torch.backends.mkldnn.enabled, torch.backends.cpu.get_cpu_capability()

    env, onednn, capability = ray.get(seen.remote())
    assert onednn is False
    if numerics.has_avx2():
        assert env == numerics.PINS and capability == "AVX2"


def test_the_setup_hook_pins_torch_when_it_is_imported_not_before(ray_session):
    """Most of a job's Ray workers never use torch (the idle ones Ray prestarts, Ray Train's and
    Ray Data's own actors) and an import costs about 2 s of CPU: the hook pins torch's settings
    when torch is imported (`w2s_ray.worker_setup`). A fresh worker (a runtime environment of its
    own, the job's hook inherited) has no torch after the hook ran; in a fresh process, whichever
    of torch's modules comes first, oneDNN is off once it is loaded, and a second call changes nothing."""
    import uuid

    import ray

    @ray.remote
    def loaded():
        return "torch" in sys.modules

    assert ray.get(loaded.options(runtime_env={"env_vars": {"W2S_TEST_FRESH": uuid.uuid4().hex}}).remote()) is False
    code = ("import sys\nfrom w2s_ray import worker_setup\nworker_setup.setup_process(); worker_setup.setup_process()\n"
            "assert 'torch' not in sys.modules\nimport torch.nn.functional\nimport torch\nprint(torch.backends.mkldnn.enabled)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]


def test_the_numerics_are_part_of_every_trained_result_key(tmp_path, monkeypatch):
    from w2s_ray import numerics
    from w2s_ray.config import StageKeys

    keys = StageKeys(small_config(tmp_path))
    before = {k: getattr(keys, k) for k in ("data", "teachers", "labels", "ceiling", "report")} | {"student": keys.student("dual_mean")}
    monkeypatch.setattr(numerics, "VERSION", numerics.VERSION + 1)
    after = {k: getattr(keys, k) for k in ("data", "teachers", "labels", "ceiling", "report")} | {"student": keys.student("dual_mean")}
    assert after["data"] == before["data"]  # no torch in the data stage
    assert all(after[k] != before[k] for k in ("teachers", "labels", "ceiling", "report", "student"))


IN_PROCESS_RUN = """
import sys
from w2s_ray import numerics
numerics.pin_this_process()  # first, as the CLI does: before torch loads
from w2s_ray.config import load_config
from w2s_ray.executor import InProcess
from w2s_ray.pipeline import run_pipeline
run_pipeline(load_config(sys.argv[1]), executor=InProcess())
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="emulates a CPU through the libraries' Linux switches")
def test_a_run_is_the_same_bits_on_a_cpu_without_avx512(tmp_path):
    """The whole pipeline twice, each in a fresh process that pins itself as the CLI does: on
    this CPU, and with MKL and oneDNN capped at AVX2 (a CPU without AVX-512). Without the pins
    the teachers and the CNN student differ between the two (`benchmarks/bench_determinism.py`);
    with them every teacher prediction, the posterior and every student's test predictions are
    equal bytes. The stages run in that process (`executor.InProcess`, 41 → ~15 s): Ray workers
    start with the same pins (`test_workers_start_with_the_pins`) and write the same bits as the
    in-process stages (`test_pipeline.test_the_stages_in_this_process_write_what_ray_writes`)."""
    from w2s_ray import numerics

    if not numerics.has_avx2():
        pytest.skip("no AVX2: the run is not pinned here")
    roots = {}
    for name, extra in (("native", {}), ("avx2", {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"})):
        cfg = small_config(tmp_path / name, student={"model": {"name": "cnn1d", "width": 8, "depth": 2}, "epochs": 2, "seeds": 1,
                                                     "targets": ["dual_mean"]})
        conf = tmp_path / f"{name}.yaml"
        conf.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
        env = {k: v for k, v in os.environ.items() if k not in numerics.PINS} | extra
        out = subprocess.run([sys.executable, "-c", IN_PROCESS_RUN, str(conf)], env=env, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stderr[-3000:]
        roots[name] = Path(cfg.output.root) / cfg.output.name
    patterns = ("teachers/*/preds/*/*.parquet", "teachers/*/sums/*/*.parquet", "labels/*/parts/*.parquet", "labels/*/test_posterior.parquet",
                "student/*/test_logp.parquet", "ceiling/*/test_logp.parquet")
    files = sorted(p.relative_to(roots["native"]) for pattern in patterns for p in roots["native"].glob(pattern))
    assert {f.parts[0] for f in files} == {"teachers", "labels", "student", "ceiling"}, files
    for f in files:
        a, b = (pd.read_parquet(r / f) for r in roots.values())
        for col in a.columns:
            x, y = (np.stack(t[col].to_numpy()) if t[col].dtype == object else t[col].to_numpy() for t in (a, b))
            assert x.tobytes() == y.tobytes(), (str(f), col)
