"""Studies: experiments with a Markdown report, each a module with two functions.

- `needs(cfg) -> list[StageRequest]`: the runs of the pipeline it reads (configs and how far);
  `pipeline.run_study` runs them first, from the cache where it can.
- `run(ctx, done, out) -> Path`: the experiment on those stage results (`done[name]`), writing
  `out/report.md`, its figures, and the Parquet table behind every figure.

- optionally `prepare(ctx, **options)`: files the runs read (the suite's tables), written first.

`options` are the study's own command-line options (the suite's `--quick` and `--tasks`),
passed to each of the three. `STUDIES` maps the CLI's `w2s-ray study KIND` to the module.
"""

from w2s_ray.studies import claims, suite, theory, variance, weighting

STUDIES = {"variance": variance, "theory": theory, "claims": claims, "weighting": weighting, "suite": suite}
