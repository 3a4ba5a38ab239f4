import subprocess
import sys

import pytest
import yaml

from w2s_ray.config import ExperimentConfig, config_hash, load_config, parse_config, to_yaml
from w2s_ray.errors import ConfigError


@pytest.mark.parametrize(
    "data, key",
    [
        ({"teachers": {"kk": 3}}, "teachers.kk: unknown key"),
        ({"teachers": {"k": 1}}, "teachers.k"),
        ({"teachers": {"k": "many"}}, "teachers.k"),
        ({"student": {"rce_weight": 1.5}}, "student.rce_weight"),
        ({"student": {"rce_weight": -0.1}}, "student.rce_weight"),
        ({"teachers": {"num_gpus_per_actor": 1.5}}, "teachers.num_gpus_per_actor"),
        ({"student": {"num_gpus": 2}}, "student.num_gpus"),
        ({"data": {"n_weak": 10000, "n_transfer": 5000}}, "data.n_weak + data.n_transfer + data.n_test"),
        ({"data": {"source": "digits"}}, "1797"),
        ({"data": {"source": "parquet"}}, "data.path"),
        ({"student": {"targets": ["dual_mean", "median"]}}, "student.targets.1"),
        ({"posterior": {"single_teacher": 64}}, "posterior.single_teacher"),
        ({"nonsense": 1}, "nonsense: unknown key"),
    ],
)
def test_bad_configs_name_the_key(data, key):
    with pytest.raises(ConfigError) as err:
        parse_config(data, "x.yaml")
    assert key in str(err.value)
    assert "x.yaml" in str(err.value)


def test_defaults_and_yaml_round_trip(tmp_path):
    cfg = load_config(None)
    assert cfg.teachers.k == 64 and cfg.student.targets[0] == "dual_mean"
    p = tmp_path / "c.yaml"
    p.write_text(to_yaml(cfg))
    again = load_config(p)
    assert again == cfg
    assert set(yaml.safe_load(p.read_text())) == set(ExperimentConfig.model_fields)


def test_overrides_and_hash_sensitivity(tmp_path):
    cfg = load_config(None, {"teachers.k": 128, "student.rce_weight": 0.5})
    assert cfg.teachers.k == 128 and cfg.student.rce_weight == 0.5
    assert config_hash(cfg.teachers) != config_hash(load_config(None).teachers)
    assert config_hash(cfg.data) == config_hash(load_config(None).data)


def test_missing_and_invalid_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("teachers: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_cli_reports_a_wrong_key_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("teachers:\n  k: 8\n  widht: 3\n")
    out = subprocess.run([sys.executable, "-m", "w2s_ray.cli", "run", str(bad)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "teachers.widht: unknown key" in out.stderr
    assert "Traceback" not in out.stderr and "ray" not in out.stderr.lower().replace("w2s-ray", "")


def test_stage_keys_depend_on_what_each_stage_reads():
    from w2s_ray.pipeline import Keys

    base = load_config(None)
    k = Keys(base)
    student_only = Keys(load_config(None, {"student.rce_weight": 0.5}))
    assert (student_only.teachers, student_only.labels, student_only.ceiling) == (k.teachers, k.labels, k.ceiling)
    assert student_only.student("dual_mean") != k.student("dual_mean")
    shifted = Keys(load_config(None, {"student.augment_shift": 20}))
    assert shifted.ceiling != k.ceiling  # a training option of the student changes the ceiling
    more = Keys(load_config(None, {"teachers.k": 128}))
    assert more.teachers == k.teachers and more.labels != k.labels  # the ensemble is extended, not retrained
    window = Keys(load_config(None, {"teachers.view": {"kind": "window"}}))
    assert window.teachers != k.teachers and window.ceiling == k.ceiling
