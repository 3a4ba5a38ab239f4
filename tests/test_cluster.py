"""The cluster/ files parse, carry the keys they need, and agree with pyproject (versions, entry point)."""

import re
from pathlib import Path

import yaml

from w2s_ray.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"

try:
    import tomllib
except ImportError:  # Python 3.10
    from pip._vendor import tomli as tomllib


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def ray_minor() -> str:
    ray_dep = next(d for d in pyproject()["project"]["dependencies"] if d.startswith("ray"))
    return re.search(r">=\s*(\d+\.\d+)", ray_dep).group(1)


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def name_of(req: str) -> str:
    return re.split(r"[\[<>=!~ ]", req, maxsplit=1)[0].lower()


def test_every_yaml_parses():
    files = sorted(CLUSTER.glob("*.yaml"))
    assert {f.name for f in files} >= {"ray-cluster.yaml", "kuberay-raycluster.yaml", "kuberay-rayjob.yaml", "runtime_env.yaml"}
    for f in files:
        assert isinstance(yaml.safe_load(f.read_text()), dict), f


def test_launcher_config_has_a_cpu_head_and_autoscaling_gpu_workers():
    c = load("ray-cluster.yaml")
    types = c["available_node_types"]
    assert c["head_node_type"] in types
    gpu = types["worker_gpu"]
    assert gpu["resources"]["GPU"] >= 1 and 0 <= gpu["min_workers"] <= gpu["max_workers"] <= c["max_workers"]
    assert "GPU" not in types[c["head_node_type"]]["resources"]
    assert any("--dashboard-host=127.0.0.1" in cmd for cmd in c["head_start_ray_commands"])


def test_kuberay_manifests_match_the_ray_version_and_entry_point():
    minor = ray_minor()
    cluster, job = load("kuberay-raycluster.yaml"), load("kuberay-rayjob.yaml")
    assert cluster["kind"] == "RayCluster" and job["kind"] == "RayJob"
    assert cluster["spec"]["rayVersion"].startswith(minor + ".")
    assert job["spec"]["rayClusterSpec"]["rayVersion"].startswith(minor + ".")
    for spec in (cluster["spec"], job["spec"]["rayClusterSpec"]):
        assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"
        assert spec["workerGroupSpecs"][0]["minReplicas"] <= spec["workerGroupSpecs"][0]["maxReplicas"]
    assert "w2s-ray" in pyproject()["project"]["scripts"]
    prog, *args = job["spec"]["entrypoint"].split()
    assert prog == "w2s-ray"
    assert build_parser().parse_args(args).command == "run"
    gpu = cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == "1"


def test_runtime_env_pins_the_projects_dependencies():
    env = load("runtime_env.yaml")
    deps = {name_of(d) for d in pyproject()["project"]["dependencies"]}
    assert {name_of(p) for p in env["pip"]} == deps
    ray_pin = next(p for p in env["pip"] if name_of(p) == "ray")
    assert f"=={ray_minor()}." in ray_pin
    assert env["working_dir"] == "." and env["env_vars"]["RAY_DATA_USE_DATASOURCE_V2"] == "0"


def test_dockerfile_builds_on_the_matching_ray_image():
    text = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"ARG BASE=(\S+)", text).group(1)
    assert base.startswith(f"rayproject/ray:{ray_minor()}.")
    assert re.search(rf'ray\[[^\]]*default[^\]]*\]=={re.escape(ray_minor())}\.', text)
    for path in ("pyproject.toml", "w2s_ray", "tune_spaces", "configs"):
        assert path in text and (ROOT / path).exists()
