import os
import subprocess
import sys

import pytest
import torch

from w2s_ray.config import ModelConfig, check_shapes, load_config, parse_config
from w2s_ray.errors import ConfigError
from w2s_ray.models import CNN1d, build_model, count_params
from w2s_ray.space import load_space


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


@pytest.mark.parametrize("in_dim, width, depth", [(40, 32, 3), (20, 8, 2), (64, 5, 4), (7, 3, 2), (3, 4, 1)])
def test_the_cnn_computes_what_its_conv1d_layers_compute(in_dim, width, depth):
    """`CNN1d` runs its `nn.Conv1d` layers as GEMMs over windows (`models.strided_conv`): the
    same function, its outputs and every gradient equal to nn.Conv1d's in float64."""
    torch.manual_seed(0)
    m = CNN1d(in_dim, 10, width=width, depth=depth).double()
    x = torch.randn(6, in_dim, dtype=torch.float64)

    def reference(x):  # the layers as nn.Conv1d runs them, channels first
        return m.head(m.convs(x.unsqueeze(-2)).flatten(-2))

    outs, grads = [], []
    for f in (m, reference):
        m.zero_grad()
        out = f(x)
        (out * torch.linspace(-1, 1, 10, dtype=torch.float64)).sum().backward()
        outs.append(out.detach())
        grads.append([p.grad.clone() for p in m.parameters()])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


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



def shaped(**sections):
    cfg = parse_config({"teachers": {"k": 8}, **sections}, "x.yaml")
    return check_shapes(cfg, 40, 10)


@pytest.mark.parametrize(
    "sections, needle",
    [
        ({"teachers": {"model": {"name": "mlp", "kwargs": {"bogus": 1}}}}, "teachers.model: 'mlp' (width 32, depth 1, kwargs {'bogus': 1}) cannot be built for 40 features and 10 classes: TypeError"),
        ({"student": {"model": {"name": "custom_model:RaisesInInit"}}}, "student.model: 'custom_model:RaisesInInit' (width 32, depth 1, kwargs {}) cannot be built for 40 features and 10 classes: ValueError: this model refuses to be built"),
        ({"student": {"model": {"name": "custom_model:NoCapacityKnobs"}}}, "student.model: 'custom_model:NoCapacityKnobs'"),
        ({"student": {"model": {"name": "cnn1d", "width": 8, "depth": 10}}}, "student.model: 'cnn1d' (width 8, depth 10, kwargs {}) cannot be built for 40 features and 10 classes: ValueError: depth 10 leaves no positions of 40 input features"),
        ({"student": {"model": {"name": "cnn1d", "width": 1_000_000, "depth": 3}}}, "student.model: 6,000,058,000,010 parameters; training needs about 96,000.9 GB"),
        ({"teachers": {"k": 64, "model": {"name": "mlp", "width": 1_000_000}}}, "teachers.model: 51,000,010 parameters; training a pack of 64 needs"),
        ({"teachers": {"view": {"kind": "window", "start": 30, "length": 20}}}, "teachers.view: the window [30, 50) does not fit in the teachers' 40 features"),
    ],
    ids=["unknown-kwarg", "init-raises", "no-width", "cnn-too-deep", "cnn-too-wide", "teacher-pack-too-big", "view-outside"],
)
def test_configs_that_cannot_run_on_the_data_are_refused(sections, needle):
    with pytest.raises(ConfigError) as err:
        shaped(**sections)
    assert needle in str(err.value), str(err.value)


def test_class_count_too_large_for_memory_and_one_feature_cnn():
    cfg = parse_config({"teachers": {"k": 8}}, "x.yaml")
    with pytest.raises(ConfigError, match="teachers.model: 33,000,001,312 parameters; training a pack of 8 needs"):
        check_shapes(cfg, 40, 10**9)
    with pytest.raises(ConfigError, match="student.model: 'cnn1d' .* 1 features .* depth 3 leaves no positions of 1 input features"):
        check_shapes(cfg, 1, 3)
    params = check_shapes(cfg, 40, 10)  # the default experiment fits
    assert params == {"teachers.model": 1642, "student.model": count_params(build_model(cfg.student.model, 40, 10))}


@pytest.mark.slow  # the CLI gets past validation and imports the pipeline
def test_cli_refuses_a_model_the_data_cannot_feed_before_ray_starts(tmp_path):
    out = subprocess.run([sys.executable, "-m", "w2s_ray.cli", "run", "--set", "student.model.depth=10", "--set", f"output.root={tmp_path}"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "student.model: 'cnn1d'" in out.stderr and "depth 10 leaves no positions" in out.stderr
    assert "Traceback" not in out.stderr and "Started a local Ray" not in out.stderr


def test_a_model_path_outside_installed_packages_needs_allow_local_code(tmp_path):
    """A config's model path is code: a module that merely sits on the path is not imported
    (not even to check it) unless the user passes --allow-local-code."""
    marker = tmp_path / "imported"
    (tmp_path / "localnet.py").write_text(
        f"import pathlib, torch.nn as nn\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "class Net(nn.Module):\n    def __init__(self, in_dim, n_classes, width, depth):\n"
        "        super().__init__(); self.f = nn.Linear(in_dim, n_classes)\n    def forward(self, x):\n        return self.f(x)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}

    def show(*flags):
        return subprocess.run([sys.executable, "-m", "w2s_ray.cli", "config", "--set", "teachers.model.name=localnet:Net", *flags],
                              capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)

    refused = show()
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "teachers.model.name: 'localnet:Net' would import" in refused.stderr and "--allow-local-code" in refused.stderr
    assert str(tmp_path / "localnet.py") in refused.stderr and not marker.exists()
    allowed = show("--allow-local-code")
    assert allowed.returncode == 0, allowed.stderr
    assert "name: localnet:Net" in allowed.stdout and marker.read_text() == "ran"
    # installed packages need no flag
    installed = subprocess.run([sys.executable, "-m", "w2s_ray.cli", "config", "--set", "student.model.name=w2s_ray.models:MLP"],
                               capture_output=True, text=True, timeout=120)
    assert installed.returncode == 0, installed.stderr


def test_a_search_space_cannot_smuggle_local_code(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("search: random\nnum_samples: 1\nparams:\n  student.model.name: {type: choice, values: [mlp, custom_model:TinyNet]}\n")
    with pytest.raises(ConfigError, match="custom_model"):
        load_space(space, load_config(None))
    assert load_space(space, load_config(None), allow_local_code=True).params
