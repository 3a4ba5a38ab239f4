import subprocess
import sys


def test_math_modules_import_no_ray_and_nothing_touches_cuda_at_import():
    code = (
        "import sys, torch\n"
        "import w2s_ray.losses, w2s_ray.posterior, w2s_ray.metrics, w2s_ray.packs, w2s_ray.student, w2s_ray.models\n"
        "assert 'ray' not in sys.modules, 'a math module imported ray'\n"
        "import w2s_ray.cli, w2s_ray.pipeline, w2s_ray.teachers, w2s_ray.labels, w2s_ray.students, w2s_ray.tune, w2s_ray.report\n"
        "assert not torch.cuda.is_initialized()\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
