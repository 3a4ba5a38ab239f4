import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from w2s_ray.config import ExperimentConfig, config_hash, load_config, parse_config, to_yaml
from w2s_ray.config import StageKeys as Keys
from w2s_ray.errors import ConfigError


@pytest.mark.parametrize(
    "data, key",
    [
        ({"teachers": {"kk": 3}}, "teachers.kk: unknown key"),
        ({"teachers": {"k": 1}}, "teachers.k"),
        ({"teachers": {"k": "many"}}, "teachers.k"),
        ({"student": {"rce_weight": 1.5}}, "student.rce_weight"),
        ({"student": {"rce_weight": -0.1}}, "student.rce_weight"),
        ({"teachers": {"resources": {"num_gpus_per_actor": 1.5}}}, "teachers.resources.num_gpus_per_actor"),
        ({"student": {"resources": {"num_gpus": 2}}}, "student.resources.num_gpus"),
        ({"teachers": {"num_actors": 2}}, "teachers.num_actors: unknown key (moved to teachers.resources.num_actors)"),
        ({"student": {"num_cpus": 2}}, "student.num_cpus: unknown key (moved to student.resources.num_cpus)"),
        ({"data": {"n_weak": 10000, "n_transfer": 5000}}, "data.n_weak + data.n_transfer + data.n_test"),
        ({"data": {"source": "digits"}}, "1797"),
        ({"data": {"source": "parquet"}}, "data.path"),
        ({"student": {"targets": ["dual_mean", "median"]}}, "student.targets.1"),
        ({"posterior": {"single_teacher": 64}}, "posterior.single_teacher"),
        ({"nonsense": 1}, "nonsense: unknown key"),
        ({"output": {"name": "../escape"}}, "output.name: '../escape' is not a folder name"),
        ({"output": {"name": "a/b"}}, "output.name"),
        ({"teachers": {"k": 10**9}}, "teachers.k: Input should be less than or equal to 100000"),
        ({"teachers": {"k": True}}, "teachers.k: true is a boolean; a number is expected"),
        ({"student": {"lr": False}}, "student.lr: false is a boolean"),
        ({"data": {"source": "parquet", "path": "d.parquet", "feature_columns": ["a", "b", "a"]}}, "data.feature_columns names ['a'] more than once"),
        ({"data": {"source": "parquet", "path": "d.parquet", "feature_columns": ["a", "label"], "label_column": "label"}}, "data.feature_columns includes the label column 'label'"),
        ({"data": {"source": "parquet", "path": "d.parquet", "features": "y"}}, "data.features is the label column 'y'"),
        ({"data": {"source": "parquet", "path": "d.parquet", "teacher_feature_columns": ["y"]}}, "data.teacher_feature_columns includes the label column"),
        ({"ray": {"address": "not-an-address"}}, "ray.address: 'not-an-address' is not a Ray address"),
        ({"data": {"missing": "fill"}}, "data.missing"),
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
    base = load_config(None)
    k = Keys(base)
    student_only = Keys(load_config(None, {"student.rce_weight": 0.5}))
    assert (student_only.teachers, student_only.labels, student_only.ceiling) == (k.teachers, k.labels, k.ceiling)
    assert student_only.student("dual_mean") != k.student("dual_mean")
    lr = Keys(load_config(None, {"student.lr": 0.01}))
    assert lr.ceiling != k.ceiling  # a training option of the student changes the ceiling
    shifted = Keys(load_config(None, {"student.augment_shift": 20}))
    assert shifted.ceiling == k.ceiling  # ... but not the student's augmentation, unless asked
    assert Keys(load_config(None, {"student.augment_shift": 20, "student.ceiling_augment": True})).ceiling != k.ceiling
    # replicates: one key per seed and per single teacher; the first replicate's is the one-seed key
    assert k.student("dual_mean", 0) == k.student("dual_mean") != k.student("dual_mean", 1)
    assert k.student("single", 0, 0) == k.student("single") != k.student("single", 0, 1)
    assert k.ceiling_seed(0) == k.ceiling != k.ceiling_seed(1)
    more = Keys(load_config(None, {"teachers.k": 128}))
    assert more.teachers == k.teachers and more.labels != k.labels  # the ensemble is extended, not retrained
    window = Keys(load_config(None, {"teachers.view": {"kind": "window"}}))
    assert window.teachers != k.teachers and window.ceiling == k.ceiling


SHIPPED_KEYS = {
    "default": {"data": "a65d462961b5", "teachers": "8535278f02f0", "labels": "a826413623cd", "ceiling": "46a41b3f8271", "report": "ef8b034d7218", "student": "e8deabeed245"},
    "w2s_window": {"data": "a65d462961b5", "teachers": "6232c2886392", "labels": "11d9cfabf10e", "ceiling": "46a41b3f8271", "report": "858af08dc652", "student": "dbee386dc8db"},
    "digits_views": {"data": "0aebf9202e67", "teachers": "ef366d97c6cd", "labels": "5ea348a3ca8f", "ceiling": "9531b26b0121", "report": "4d62c29ad17f", "student": "cd103c58c4cb"},
    "variance": {"data": "a65d462961b5", "teachers": "8535278f02f0", "labels": "d515bf84cb54", "ceiling": "46a41b3f8271", "report": "554309c3aebe", "student": "9a76ab06765a"},
    "theory": {"data": "a65d462961b5", "teachers": "8535278f02f0", "labels": "a826413623cd", "ceiling": "46a41b3f8271", "report": "ef8b034d7218", "student": "e8deabeed245"},
    "tweets": {"data": "7920d6f70f0b", "teachers": "b229c0bea258", "labels": "067f56770dc2", "ceiling": "5245e741e85e", "report": "fa8e1dcc325e", "student": "77fc77b36f28",
               "embed.student": "e89d7d43a57c", "embed.teacher": "879ec50ba86b"},
}
"""Every stage key of the shipped configs (pinned numerics; the digits' and tweets' Parquet
files absent, so no fingerprint). A change here recomputes users' caches: make it on purpose, and raise
`config.CACHE_FORMAT` when what a stage writes changes without its config."""


def test_the_shipped_configs_stage_keys_change_only_on_purpose(tmp_path, monkeypatch):
    from w2s_ray import numerics

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(numerics, "pins", lambda: dict(numerics.PINS))
    configs = Path(__file__).resolve().parent.parent / "configs"
    for name, expected in SHIPPED_KEYS.items():
        cfg = load_config(None if name == "default" else configs / f"{name}.yaml")
        k = Keys(cfg)
        keys = {s: getattr(k, s) for s in ("data", "teachers", "labels", "ceiling", "report")} | {"student": k.student(cfg.student.targets[0])}
        keys |= {f"embed.{role}": k.embed(role) for role in k.embed_roles()}
        assert keys == expected, (name, keys)
    assert sorted(SHIPPED_KEYS) == sorted(["default", *(p.stem for p in configs.glob("*.yaml"))])  # every shipped config is here


def test_resources_and_the_run_plan_are_in_no_cache_key():
    k = Keys(load_config(None))
    elsewhere = Keys(load_config(None, {
        "teachers.resources": {"num_actors": 3, "max_pack_size": 7, "num_cpus_per_actor": 2, "num_gpus_per_actor": 0.25, "compile": True, "max_retries": 0},
        "student.resources": {"num_cpus": 4, "num_gpus": 0.5},
        "student.targets": ["single"], "student.ceiling": False, "student.seeds": 2,
    }))
    assert (elsewhere.data, elsewhere.teachers, elsewhere.labels, elsewhere.ceiling) == (k.data, k.teachers, k.labels, k.ceiling)
    assert elsewhere.student("dual_mean") == k.student("dual_mean")


def test_override_into_a_value_that_is_not_a_section(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("teachers: {k: 8}\n")
    with pytest.raises(ConfigError, match="teachers.k.x: k is not a section"):
        load_config(f, {"teachers.k.x": 1})


def test_every_name_the_schema_allows_has_a_registry_entry():
    from typing import get_args

    from w2s_ray import config, data, losses, packs
    from w2s_ray.student import core as training

    assert set(get_args(config.LossName)) == set(losses.LOSSES)
    assert set(get_args(config.TargetName)) == set(training.TARGETS)
    assert set(get_args(config.ResampleName)) == set(packs.RESAMPLERS)
    assert set(get_args(config.SourceName)) == set(data.SOURCES)


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert to_yaml(load_config(None, {})) != to_yaml(cfg)  # each says something of its own


@pytest.mark.parametrize("path", sorted((ROOT / "tune_spaces").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_search_spaces_load(path):
    from w2s_ray.space import load_space

    space = load_space(path, load_config(None))
    assert space.params and space.resources is not None


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "w2s_ray.cli", *args], capture_output=True, text=True, timeout=120)


def one_clean_line(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    return out.stderr.strip()


def test_malformed_yaml_in_an_override_is_one_line_naming_it():
    err = one_clean_line(cli("config", "--set", "teachers.k=[1"))
    assert err.startswith("w2s-ray: error: --set teachers.k=[1 is not valid YAML:") and len(err.splitlines()) == 1, err


@pytest.mark.parametrize(
    "content, needle",
    [
        (b"- a\n- b\n", "the top level must be a mapping of sections, got a list"),
        (b"teachers:\n  k: 4\n  k: 8\n", "duplicate key 'k' (first at line 2) at line 3"),
        (b"teachers: {k: 4, k: 8}\n", "duplicate key 'k'"),
        (b"teachers:\n  k: \xe9\n", "is not UTF-8 text"),
        (b"teachers: [unclosed\n", "is not valid YAML"),
    ],
    ids=["top-level-list", "duplicate-key", "duplicate-flow-key", "latin-1", "unclosed"],
)
def test_bad_config_files_name_the_file_and_the_problem(tmp_path, content, needle):
    f = tmp_path / "c.yaml"
    f.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        load_config(f, {"teachers.epochs": 3})
    assert needle in str(err.value) and str(f) in str(err.value), str(err.value)


def test_a_top_level_list_with_overrides_is_a_clean_cli_error(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("- 1\n")
    assert "top level must be a mapping" in one_clean_line(cli("config", str(f), "--set", "teachers.k=8"))


def test_an_empty_config_file_says_the_defaults_are_used(tmp_path, capsys):
    f = tmp_path / "empty.yaml"
    f.write_text("# nothing yet\n")
    assert load_config(f) == load_config(None)
    assert f"config file {f} is empty; the defaults are used" in capsys.readouterr().err


def test_tuning_the_default_student_keeps_its_family():
    assert load_config(None, {"student.model.depth": 4}).student.model.model_dump() == {"name": "cnn1d", "width": 32, "depth": 4, "kwargs": {}}
    assert load_config(None, {"student.model": {"name": "mlp"}}).student.model.depth == 1  # a named family: its own defaults


def test_numbers_in_overrides_read_as_a_user_means_them(tmp_path):
    from w2s_ray.cli import parse_overrides

    cfg = load_config(None, parse_overrides(["teachers.k=1e3", "student.lr=3e-4"]))
    assert cfg.teachers.k == 1000 and cfg.student.lr == 3e-4
    with pytest.raises(ConfigError, match="teachers.k: Input should be a valid integer, got a number with a fractional part"):
        load_config(None, parse_overrides(["teachers.k=2.5e0"]))


def test_a_bad_override_is_blamed_on_its_set_not_on_the_file(tmp_path):
    from w2s_ray.cli import parse_overrides

    conf = tmp_path / "my.yaml"
    conf.write_text("teachers: {k: 16}\n")
    with pytest.raises(ConfigError) as err:
        load_config(conf, parse_overrides(["teachers.k=1"]))
    assert "teachers.k: Input should be greater than or equal to 2 (from --set teachers.k=1)" in str(err.value)
    conf.write_text("teachers: {k: 1}\n")
    with pytest.raises(ConfigError) as err:
        load_config(conf, parse_overrides(["student.epochs=3"]))
    assert "teachers.k" in str(err.value) and "--set" not in str(err.value)  # the file's own mistake
