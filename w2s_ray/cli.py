"""`w2s-ray`: parses arguments and calls the pipeline; nothing else.

    w2s-ray run [CONFIG.yaml] [--set key=value ...]
    w2s-ray embed|data|teachers|labels|student|report CONFIG.yaml   (one stage; earlier stages from cache)
    w2s-ray tune [CONFIG.yaml] --space SPACE.yaml [--resume]  (Ray Tune search over the student)
    w2s-ray study variance|theory|claims|weighting [CONFIG.yaml]   (a study with report.md)
    w2s-ray study suite [CONFIG.yaml] [--quick] [--tasks a,b] [--parallel N]  (every task of the registry; CONFIG: where and how it runs)
    w2s-ray config [CONFIG.yaml]                              (print the resolved config)
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from w2s_ray import numerics

numerics.pin_this_process()  # before the config's model registry imports torch: the driver computes too

from w2s_ray.config import STAGES, load_config, parse_yaml, to_yaml  # noqa: E402
from w2s_ray.errors import W2SError  # noqa: E402
from w2s_ray.space import load_space  # noqa: E402

STUDY_KINDS = ("variance", "theory", "claims", "weighting", "suite")
RUN_SECTIONS = ("output.", "ray.", "teachers.resources.", "student.resources.")
"""What the suite reads from its own config and --set values: where and how it runs."""
SEARCH_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # the keys of studies.STUDIES (a test checks they agree)


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise W2SError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key] = parse_yaml(value, f"--set {item}")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="w2s-ray", description="Weak-to-strong generalization experiments on Ray.")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the whole pipeline (default experiment without CONFIG)")
    run.add_argument("config", nargs="?")
    for name in STAGES:
        s = sub.add_parser(name, help=f"run the {name} stage (earlier stages are reused from cache or run)")
        s.add_argument("config", nargs="?")
    tune = sub.add_parser("tune", help="Ray Tune search over the student, reusing the cached teachers and labels")
    tune.add_argument("config", nargs="?")
    tune.add_argument("--space", required=True, help="search space YAML, e.g. tune_spaces/capacity_x_rce.yaml")
    tune.add_argument("--name", help="search name (default: the space file's stem)")
    tune.add_argument("--resume", action="store_true", help="continue an interrupted search; finished trials are not rerun")
    tune.add_argument("--verbose", action="store_true", help="Tune's own trial tables (default: one line per finished trial on stderr)")
    study = sub.add_parser("study", help="a study with a Markdown report: variance (ensemble scaling), theory (squared-loss example), claims (the paper's claims over seeds, with CIs and verdicts), weighting (variance-aware students against the plain dual-mean student, paired over seeds) or suite (every task of the registry, one table, teacher-count scaling)")
    study.add_argument("kind", choices=STUDY_KINDS)
    study.add_argument("config", nargs="?", help="for suite: only output, ray and the stages' resources are read from it; each task has its own config, and --set values apply to every task")
    study.add_argument("--quick", action="store_true", help="suite only: teacher-count scaling up to K = 64 (default 1024)")
    study.add_argument("--tasks", help="suite only: comma-separated task names (default: every task)")
    study.add_argument("--parallel", type=int, help="suite only: tasks side by side (default: one per 16 CPUs of the cluster, at least one)")
    show = sub.add_parser("config", help="print the resolved config")
    show.add_argument("config", nargs="?")
    for s in sub.choices.values():
        s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. teachers.k=128")
        s.add_argument("--no-wait", action="store_true", help="when another run is writing a stage this one needs, stop with a message instead of waiting (output.wait: false)")
        s.add_argument(
            "--allow-local-code", action="store_true",
            help="allow model import paths (package.module:Class) that are not installed packages, e.g. a module in the working directory; a config's model path is code",
        )
    return p


def study_options(args: argparse.Namespace) -> dict:
    """The suite's own options; refused for the other studies, which have none."""
    if args.kind != "suite":
        if args.quick or args.tasks or args.parallel is not None:
            raise W2SError(f"--quick, --tasks and --parallel are options of study suite, not of study {args.kind}")
        return {}
    if args.parallel is not None and args.parallel < 1:
        raise W2SError(f"--parallel {args.parallel}: at least 1")
    return {"quick": args.quick, "tasks": [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None,
            "values": parse_overrides(args.overrides), "parallel": args.parallel}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        overrides = parse_overrides(args.overrides)
        if args.no_wait:
            overrides["output.wait"] = False
        suite = args.command == "study" and args.kind == "suite"
        # the suite's tasks take every --set value (`study_options`); its own config only where and how it runs
        cfg = load_config(args.config, {k: v for k, v in overrides.items() if k.startswith(RUN_SECTIONS)} if suite else overrides,
                          allow_local_code=args.allow_local_code)
        if args.command == "config":
            print(to_yaml(cfg), end="")
            return 0
        options = study_options(args) if args.command == "study" else {}
        space = load_space(args.space, cfg, allow_local_code=args.allow_local_code) if args.command == "tune" else None
        if space is not None:
            name = args.name or Path(args.space).stem
            if not SEARCH_NAME.fullmatch(name):
                raise W2SError(f"--name {name!r}: a search name is letters, digits, '.', '_' and '-' (it names a directory under tune/)")
        # imported once the input is valid: a bad config or space answers in seconds, without
        # waiting for Ray, Tune and the dataset packages to import
        from w2s_ray import pipeline

        if space is not None:
            pipeline.run_tune(cfg, space, name, resume=args.resume, verbose=args.verbose)
        elif args.command == "study":
            pipeline.run_study(args.kind, cfg, **options)
        else:
            pipeline.run_pipeline(cfg, until="report" if args.command == "run" else args.command)
        return 0
    except W2SError as err:
        print(f"w2s-ray: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("w2s-ray: interrupted; finished stages and packs are kept, and a rerun resumes from them", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
