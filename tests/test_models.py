import subprocess
import sys

import pytest
import torch

from w2s_ray.config import ModelConfig, parse_config
from w2s_ray.errors import ConfigError
from w2s_ray.models import CNN1d, build_model, count_params


def test_capacity_knob_grows_the_models():
    for name in ("mlp", "cnn1d"):
        small = count_params(build_model(ModelConfig(name=name, width=4, depth=2), 40, 10))
        big = count_params(build_model(ModelConfig(name=name, width=64, depth=2), 40, 10))
        assert big > 4 * small, name
    assert build_model(ModelConfig(name="cnn1d", width=8, depth=3), 40, 10)(torch.randn(5, 40)).shape == (5, 10)
    assert build_model(ModelConfig(name="logistic"), 40, 10)(torch.randn(5, 40)).shape == (5, 10)


def test_reference_cnn_shape():
    m = CNN1d(40, 10, width=25, depth=3)
    convs = [l for l in m.convs if isinstance(l, torch.nn.Conv1d)]
    assert [c.out_channels for c in convs] == [25, 25, 25] and convs[0].kernel_size == (5,)
    assert m.head.in_features == 25 * 5


def test_user_model_by_import_path():
    m = build_model(ModelConfig(name="custom_model:TinyNet", width=6, kwargs={"scale": 2.0}), 12, 3)
    assert type(m).__name__ == "TinyNet" and m.scale == 2.0
    assert m(torch.randn(4, 12)).shape == (4, 3)


@pytest.mark.parametrize("name, needle", [("resnet", "not one of"), ("no_such_module:X", "could not be imported"), ("custom_model:nn", "not a torch.nn.Module")])
@pytest.mark.parametrize("section", ["teachers", "student"])
def test_bad_model_names_are_config_errors_naming_the_key(section, name, needle):
    with pytest.raises(ConfigError, match=needle) as err:
        parse_config({section: {"model": {"name": name}}}, "x.yaml")
    assert f"{section}.model.name" in str(err.value)


def test_cli_refuses_an_unknown_model_before_ray_starts():
    out = subprocess.run([sys.executable, "-m", "w2s_ray.cli", "run", "--set", "teachers.model.name=resnet"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "teachers.model.name: 'resnet' is not one of" in out.stderr
    assert "Traceback" not in out.stderr and "ray" not in out.stderr.lower().replace("w2s-ray", "")

