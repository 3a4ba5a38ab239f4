"""The README is a contract: every `w2s-ray` command in its code blocks (and the digits recipe),
run as written from a fresh working directory with the default, relative `output.root: runs`,
exits 0 and writes what the README says it writes.

The commands run as real `w2s-ray` processes, each starting its own embedded Ray, as a user's
would. They are shrunk only by `--set` overrides appended to the command (small data, few
teachers and epochs), so the paths, the config files and the search spaces are the README's.
Commands run in three lanes at once, as a user's terminals would: the commands of one run and
config file keep the README's order, and a line that runs no `w2s-ray` (it reads what the
others wrote) runs after them. Measured on 2 cores: 224 s one after another, 166–177 s in two
lanes (one per run), 143 s in three (one per run and config file), in one session. The lanes keep
both cores busy (95% over the test), so what counts is the CPU a command spends, not its wait:
each command's embedded Ray gets one CPU (`ray.num_cpus=1`), which starts half the worker
processes (each imports torch and the package, about 2.5 s of CPU) and one pack actor instead of
two; a shrunk claims study alone costs 25 CPU-seconds instead of 31 at the same wall time, and
the test takes 137 s instead of 164 s (one run each, 2026-12-05).
A relative path that crosses into a Ray worker or a Tune trial (each runs in a working
directory of its own) fails here; tests with absolute tmp roots cannot see it."""

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# what a user's machine would need that this one cannot run (each is tested elsewhere or cannot be)
NOT_HERE = {
    "docker": "builds an image (no Docker here; tests check the Dockerfile agrees with pyproject)",
    "ray": "starts a cloud cluster (`ray job submit` runs for real in test_jobs.py)",
    "kubectl": "needs a Kubernetes cluster",
    "pip": "installs packages",
    "python3": "the install commands: CI runs them (.ci/run)",
    "RAY_ADDRESS=http://127.0.0.1:8265": "ray job submit to a launched cluster (test_jobs.py)",
}

SHRINK = {
    # the built-in MNIST-1D at a small size; the user Parquet config keeps its own data
    "mnist1d": ["data.num_samples=1500", "data.chunk_size=500", "data.n_weak=300", "data.n_transfer=600", "data.n_test=500"],
    # text data (configs/tweets.yaml): every text is still encoded, by narrower encoders, and fewer rows train
    "embed": ["data.n_weak=300", "data.n_transfer=2000", "data.n_test=1000", "embed.student.dim=256"],
    # one CPU for each command's Ray: the lanes already use both cores (see the module's docstring)
    "all": ["ray.num_cpus=1", "teachers.k=10", "teachers.epochs=5", "posterior.n_boot=20", "student.epochs=2", "student.patience=10", "student.seeds=1"],
}


def readme_commands() -> list[str]:
    """Every command line of the README's ```bash blocks, comments removed."""
    text = (REPO / "README.md").read_text()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def runnable(commands: list[str]) -> list[str]:
    out = []
    for line in commands:
        first = line.split()[0]
        if first in NOT_HERE:
            continue
        assert first in ("w2s-ray", "python"), f"a README command this test does not know how to run: {line!r}"
        out.append(line)
    return out


def config_arg(cmd: list[str]) -> str | None:
    """The experiment config a `w2s-ray` command names (not a search space), if any."""
    return next((a for a in cmd[2:] if a.endswith(".yaml") and not a.startswith("tune_spaces/")), None)


def shrunk(cmd: list[str], cwd: Path) -> list[str]:
    """The command with `--set` overrides appended to each `w2s-ray` call (not to `config`,
    which prints the user's config as it is)."""
    if cmd[0] != "w2s-ray" or cmd[1] == "config":
        return cmd
    config = config_arg(cmd)
    text = (cwd / config).read_text() if config is not None else ""
    sets = SHRINK["all"] + ([] if "source: parquet" in text else SHRINK["mnist1d"]) + (SHRINK["embed"] if "\nembed:" in text else [])
    if cmd[1] == "study" and len(cmd) > 2 and cmd[2] == "variance":
        sets = [s for s in sets if not s.startswith("teachers.k=")] + ["teachers.k=16"]
    return cmd + [x for s in sets for x in ("--set", s)]


def run_line(line: str, cwd: Path, env: dict) -> tuple[str, str]:
    """One README line (commands joined by `&&`), each command shrunk, in `cwd`; the last
    command's stdout and stderr."""
    out = ("", "")
    for part in line.split("&&"):
        cmd = shlex.split(part)
        if cmd[0] == "python":
            cmd[0] = sys.executable
        cmd = shrunk(cmd, cwd)
        if cmd[0] == "w2s-ray":
            cmd[0] = str(BIN / "w2s-ray")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{part.strip()!r} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        print(f"{time.perf_counter() - t0:6.1f}s  {part.strip()}", file=sys.stderr)
        out = (proc.stdout, proc.stderr)
    return out


def run_name(line: str, cwd: Path) -> tuple[str, str | None] | None:
    """The run (`output.name`) a README line writes and the config file it names, or None for a
    line that runs no `w2s-ray`."""
    for part in line.split("&&"):
        cmd = shlex.split(part)
        if cmd[0] == "w2s-ray":
            config = config_arg(cmd)
            conf = yaml.safe_load((cwd / config).read_text()) if config else {}
            return ((conf or {}).get("output") or {}).get("name", "default"), config
    return None


def run_in_lanes(lines: list[str], cwd: Path, env: dict, lanes: int = 3) -> dict[str, tuple[str, str]]:
    """The lines of each (run, config file) in README order, the groups spread over `lanes`
    threads (the largest group first), then the lines that run no `w2s-ray`, in order. Two
    configs that write the same run (`w2s-ray run` and `w2s-ray run my.yaml`) are two groups:
    they share the run's data, teachers and labels, and the one that comes second waits for the
    stage the other is writing, as two users' commands would."""
    groups: dict[tuple, list[str]] = {}
    after = []
    for line in lines:
        name = run_name(line, cwd)
        (groups.setdefault(name, []) if name else after).append(line)

    def lane(group: list[str]) -> dict[str, tuple[str, str]]:
        return {line: run_line(line, cwd, env) for line in group}

    out: dict[str, tuple[str, str]] = {}
    with ThreadPoolExecutor(lanes) as pool:
        for done in pool.map(lane, sorted(groups.values(), key=len, reverse=True)):
            out |= done
    return out | lane(after)


MY_YAML = "student:\n  model: {name: mlp, width: 32, depth: 2}\n"
"""`my.yaml` in the README is the user's config; here a small one (an MLP student)."""


@pytest.mark.slow
def test_every_readme_command_runs_as_written(tmp_path):
    commands = runnable(readme_commands())
    assert any(c.startswith("w2s-ray tune") for c in commands) and any("study claims" in c for c in commands)
    cwd = tmp_path / "project"
    cwd.mkdir()
    for folder in ("configs", "tune_spaces"):  # what a fresh clone has beside the code
        shutil.copytree(REPO / folder, cwd / folder)
    (cwd / "my.yaml").write_text(MY_YAML)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["RAY_AUTH_MODE"] = "disabled"
    stdout = run_in_lanes(commands, cwd, env)
    # `w2s-ray run > out.txt` holds the results table alone: progress, Ray's forwarded worker
    # lines and warnings go to stderr, and nothing is coloured
    table, log = stdout["w2s-ray run"]
    assert table.lstrip().startswith("test acc") and "ensemble: dual mean" in table, table
    assert "\x1b[" not in table and "epoch" not in table and "pid=" not in table and "Warning" not in table, table
    assert "student[dual_mean]: epoch" in log and "\x1b[" not in log  # per-epoch lines on stderr, without colour codes
    tuned = stdout["w2s-ray tune --space tune_spaces/grid_capacity_x_rce.yaml"][0]
    assert "Trial status" not in tuned and "chosen by val_teacher_ce" in tuned, tuned  # Tune's tables only with --verbose
    runs = cwd / "runs"  # the default, relative output.root
    assert (runs / "default" / "results.json").is_file()
    for search in ("grid_capacity_x_rce", "capacity_x_rce"):
        trials = pd.read_parquet(runs / "default" / "tune" / search / "trials.parquet")
        assert trials["error"].isna().all(), trials[["trial_id", "error"]]
    for name, kind in (("default", "claims"), ("variance", "variance"), ("theory", "theory"), ("digits_views", "claims")):
        assert (runs / name / "study" / kind / "report.md").is_file(), (name, kind)
    assert (runs / "tweets" / "results.json").is_file() and len(list((runs / "tweets" / "embed").iterdir())) == 2  # text: two encoders
    assert sorted(p.name for p in cwd.iterdir()) == ["configs", "my.yaml", "runs", "tune_spaces"]  # nothing written elsewhere
