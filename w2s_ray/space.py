"""Search-space files (`tune_spaces/*.yaml`): schema, validation, and applying a point to a config.

A space names student keys of the experiment config by their dotted path (`student.rce_weight`,
`student.model.width`, ...) plus `student.target`, which picks the one target a trial trains
on. Only student keys can be searched: the teachers and pseudo-labels are computed once, from
the cache, for the whole search. Every name is checked against the experiment schema, and
every range for emptiness, before Ray starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from w2s_ray.config import ExperimentConfig, Strict, _format_errors, read_yaml, with_values
from w2s_ray.errors import ConfigError
from w2s_ray.models import check_installed

TARGET_PARAM = "student.target"


class Param(Strict):
    type: Literal["uniform", "loguniform", "int", "logint", "choice", "grid"]
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None

    @model_validator(mode="after")
    def _range_not_empty(self) -> "Param":
        if self.type in ("choice", "grid"):
            if not self.values:
                raise ValueError(f"a {self.type} parameter needs a non-empty 'values' list")
        else:
            if self.low is None or self.high is None:
                raise ValueError(f"a {self.type} parameter needs 'low' and 'high'")
            if not self.low < self.high:
                raise ValueError(f"empty range: low={self.low} is not below high={self.high}")
            if self.type.startswith("log") and self.low <= 0:
                raise ValueError(f"a {self.type} parameter needs low > 0, got {self.low}")
        return self

    def candidates(self) -> list[Any]:
        """Values used to check the name against the schema."""
        if self.values:
            return list(self.values)
        cast = int if self.type in ("int", "logint") else float
        return [cast(self.low), cast(self.high)]


class Scheduler(Strict):
    type: Literal["asha", "none"] = "asha"
    grace_period: int = Field(3, ge=1)
    reduction_factor: float = Field(2.0, gt=1)


class Resources(Strict):
    """A trial's resources; `load_space` fills them from `student.resources` when the space
    file leaves them out."""

    cpu: float = Field(1.0, gt=0)
    gpu: float = Field(0.0, ge=0, description="fractions share a GPU between trials")


class SearchSpace(Strict):
    search: Literal["optuna", "grid", "random"] = "optuna"
    num_samples: int | None = Field(None, ge=1, description="trials (optuna/random; default 16) or repeats of the grid (default 1)")
    max_concurrent: int | None = Field(None, ge=1, description="default: as many as the resources allow")
    seed: int = 0
    scheduler: Scheduler = Field(default_factory=Scheduler)
    resources: Resources | None = Field(None, description="per trial (per Ray Train worker with student.workers > 1); default: the config's student.resources")
    max_failures: int = Field(2, ge=0)
    baseline: dict[str, Any] = Field(
        default_factory=lambda: {"student.rce_weight": 0.0},
        description="optuna: evaluated first (the forward-CE baseline)",
    )
    params: dict[str, Param] = Field(min_length=1)
    confirm_seeds: int = Field(
        5, ge=0, description="after the search, train the chosen point and the baseline with this many fresh seeds "
        "(seed + 1000, + 1001, ...) and report both with 95% CIs and their paired difference; 0: skip",
    )

    @model_validator(mode="after")
    def _grid_is_discrete(self) -> "SearchSpace":
        if self.num_samples is None:
            self.num_samples = 1 if self.search == "grid" else 16
        if self.search == "grid":
            bad = [k for k, p in self.params.items() if p.type not in ("grid", "choice")]
            if bad:
                raise ValueError(f"search: grid needs 'grid' or 'choice' parameters; not: {bad}")
        if self.search == "optuna":
            bad = [k for k, p in self.params.items() if p.type == "grid"]
            if bad:
                raise ValueError(f"search: optuna samples its points and cannot take 'grid' parameters ({bad}); use type: choice, or search: grid")
        return self


def apply_params(base: ExperimentConfig, point: dict[str, Any], source: str = "search space") -> ExperimentConfig:
    """The experiment config with a search point's values set (validated like any config)."""
    values = dict(point)
    if TARGET_PARAM in values:
        values["student.targets"] = [values.pop(TARGET_PARAM)]
    return with_values(base, values, source)


def load_space(path: str | Path, base: ExperimentConfig, allow_local_code: bool = False) -> SearchSpace:
    """Read and check a search space against the base config: every point it can produce (and
    its baseline) must validate, and model import paths follow the config's rule on local code."""
    path = Path(path)
    raw = read_yaml(path, "search space")
    if not isinstance(raw, dict):
        raise ConfigError(f"search space {path}: the top level must be a mapping, got {type(raw).__name__}")
    try:
        space = SearchSpace.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, str(path))) from None
    for name, param in space.params.items():
        if not name.startswith("student."):
            raise ConfigError(
                f"{path}: parameter {name!r}: only student.* keys can be searched "
                "(teachers and pseudo-labels are computed once for the whole search)"
            )
        if name in ("student.workers", "student.resources.num_cpus", "student.resources.num_gpus"):
            raise ConfigError(f"{path}: parameter {name!r} cannot be searched: every trial of a search holds the same "
                              "resources (the space's `resources` per worker, times the base config's student.workers)")
        for value in param.candidates():
            if not allow_local_code:
                _check_code(name, value, f"{path}: parameter {name!r}")
            apply_params(base, {name: value}, f"{path}: parameter {name!r} = {value!r}")
    for name in raw.get("baseline") or {}:
        if not name.startswith("student."):
            raise ConfigError(f"{path}: baseline {name!r}: only student.* keys can be searched, so only they can have a baseline")
        if space.search == "optuna" and name not in space.params:
            raise ConfigError(f"{path}: baseline {name!r} is not one of the searched params {sorted(space.params)} (Optuna's first point sets searched params only)")
    for name, value in space.baseline.items():
        if not allow_local_code:
            _check_code(name, value, f"{path}: baseline {name!r}")
        apply_params(base, {name: value}, f"{path}: baseline {name!r}")
    if space.resources is None:
        space.resources = Resources(cpu=base.student.resources.num_cpus, gpu=base.student.resources.num_gpus)
    return space



def _check_code(name: str, value: Any, where: str) -> None:
    if name.endswith(".model.name") and isinstance(value, str):
        try:
            check_installed(value)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None


def current_value(cfg: ExperimentConfig, dotted: str) -> Any:
    if dotted == TARGET_PARAM:
        return cfg.student.targets[0]
    node: Any = cfg
    for part in dotted.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node


def baseline_point(space: SearchSpace, base: ExperimentConfig) -> dict[str, Any]:
    """The baseline as a full point (Optuna needs every parameter): keys it leaves out take the
    experiment config's value, brought into the parameter's range."""
    point = {}
    for name, p in space.params.items():
        v = space.baseline.get(name, current_value(base, name))
        if p.values:
            v = v if v in p.values else p.values[0]
        else:
            v = min(max(v, p.low), p.high)
            v = int(v) if p.type in ("int", "logint") else float(v)
        point[name] = v
    return point
