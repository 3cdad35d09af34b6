"""The YAML sweep spec: what to sweep, on which pair and prompts, toward which objectives.

    name: quick
    pair: {dir: ~/.cache/spectune/pairs/tiny-seed0}      # or tiny, {preset, seed}, {target, drafter} (spectune.pair_ref)
    prompts: {set: default, limit: 12}
    max_new_tokens: 64
    temperatures: [0.0]
    space:                                                 # method -> knob -> choices or range
      sps:  {draft_len: [2, 4, 6], schedule: [fixed, heuristic]}
      tree: {branching: [[2, 2, 1], [4, 2, 1]]}
      pld:  {}
    objectives: [{metric: speedup, mode: max}, {metric: tree_tokens_per_step, mode: min}]
    search: grid                                           # grid | random | optuna-nsga2
    resources: {cpus: 1, gpus: 0}

Every knob name and value is checked against the method registry before anything
starts, and every error names the field and what is allowed.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from spectune.pair_ref import PairRef

SEARCHES = ("grid", "random", "optuna-nsga2")
MAX_GRID = 10_000  # beyond this a grid is a mistake: use random or optuna-nsga2
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


class SpecError(ValueError):
    """A sweep spec that cannot run, with the field and what is allowed in one line."""


class Range(BaseModel):
    """A numeric knob sampled between low and high (inclusive), optionally on a log scale."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    low: int | float
    high: int | float
    log: bool = False

    @model_validator(mode="after")
    def ordered(self) -> Range:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, got {self.low}")
        return self

    @property
    def integer(self) -> bool:
        return isinstance(self.low, int) and isinstance(self.high, int)


KnobValues = list[Any] | Range  # a list of choices, or a numeric range


class PromptsSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    set: str = Field("default", description="`default` (shipped) or a JSONL file path")
    limit: int | None = Field(None, ge=1, description="use only the first N prompts")

    @field_validator("set")
    @classmethod
    def expand_home(cls, value: str) -> str:
        return str(Path(value).expanduser()) if value.startswith("~") else value


class Objective(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    metric: str
    mode: Literal["max", "min"] = "max"

    @field_validator("metric")
    @classmethod
    def stored_metric(cls, value: str) -> str:
        from spectune.store import NUMERIC_METRICS

        if value not in NUMERIC_METRICS:
            raise ValueError(f"unknown metric {value!r}; allowed: {', '.join(NUMERIC_METRICS)}")
        return value


class Resources(BaseModel):
    """What one trial gets: the worker running it holds these CPUs and GPUs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cpus: float = Field(1.0, ge=0.01, description="CPUs per trial (torch threads = max(1, round(cpus)))")
    gpus: float = Field(0.0, ge=0.0, description="GPUs per trial, fractions allowed; 0 on CPU machines")


class SweepSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="names the sweep in the store and its Tune folder")
    pair: PairRef
    prompts: PromptsSpec = PromptsSpec()
    max_new_tokens: int = Field(64, ge=1)
    temperatures: list[float] = Field([0.0], min_length=1)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int = 0
    space: dict[str, dict[str, Any]] = Field(min_length=1, description="method -> knob -> choices or range")
    objectives: list[Objective] = Field(default_factory=lambda: [
        Objective(metric="speedup", mode="max"), Objective(metric="tree_tokens_per_step", mode="min")], min_length=1)
    search: Literal["grid", "random", "optuna-nsga2"] = "grid"
    num_samples: int | None = Field(None, ge=1, description="trials for random / optuna-nsga2 (default 10)")
    repeats: int = Field(1, ge=1, description="timed passes per trial (and for the AR baseline)")
    warmup: int = Field(1, ge=0, description="untimed warm-up prompts per configuration")
    concurrency: int = Field(1, ge=1, description="trials at once (one worker per trial slot)")
    resources: Resources = Resources()

    @field_validator("name")
    @classmethod
    def folder_name(cls, value: str) -> str:
        if not NAME_PATTERN.match(value):
            raise ValueError(f"use letters, digits and _ . - (at most 100, it names a folder), got {value!r}")
        return value

    @field_validator("temperatures")
    @classmethod
    def temperatures_in_range(cls, values: list[float]) -> list[float]:
        for value in values:
            if not 0.0 <= value <= 5.0:
                raise ValueError(f"each temperature must be within 0..5 (0 = greedy), got {value}")
        if len(set(values)) != len(values):
            raise ValueError(f"temperatures repeat a value: {values}")
        return values

    @field_validator("space")
    @classmethod
    def knob_values(cls, space: dict[str, dict[str, Any]]) -> dict[str, dict[str, KnobValues]]:
        return {method: {knob: _knob_values(f"space.{method}.{knob}", v) for knob, v in (knobs or {}).items()}
                for method, knobs in space.items()}

    @model_validator(mode="after")
    def consistent(self) -> SweepSpec:
        for method, knobs in self.space.items():
            check_method(method, knobs, self.pair, self.search)
        if self.search == "grid":
            if self.num_samples not in (None, 1):
                raise ValueError("num_samples: grid runs every combination once; num_samples is for random and optuna-nsga2")
            count = len(grid_configs(self.space)) * len(self.temperatures)
            if count > MAX_GRID:
                raise ValueError(f"space: the grid has {count} configurations (limit {MAX_GRID}); use search: random or optuna-nsga2")
        if self.pair.device.startswith("cuda") and self.resources.gpus <= 0:
            raise ValueError(f"resources.gpus: pair.device is {self.pair.device}, so each trial needs gpus > 0")
        if self.pair.device.startswith("cuda:"):
            raise ValueError(f"pair.device: use cuda, not {self.pair.device}: Ray gives each worker its own GPU(s)")
        return self

    @property
    def trials(self) -> int:
        """How many trials the sweep runs."""
        if self.search == "grid":
            return len(grid_configs(self.space)) * len(self.temperatures)
        return self.num_samples or 10


def _knob_values(where: str, values: Any) -> KnobValues:
    if isinstance(values, list):
        return values
    if isinstance(values, Mapping):
        try:
            return Range.model_validate(dict(values))
        except ValidationError as err:
            raise ValueError(f"{where}: bad range: {describe(err)}") from None
    raise ValueError(f"{where}: give a list of choices (e.g. [{values!r}]) or a range {{low, high[, log]}}")


def check_method(method: str, knobs: Mapping[str, KnobValues], pair: PairRef, search: str) -> None:
    from spectune.methods import METHODS  # imported here: trial processes read specs' types but need no torch

    try:
        registered = METHODS.get(method)
    except ValueError as err:
        raise ValueError(f"space.{method}: {err}") from None
    if registered.needs_drafter and not pair.drafter:
        raise ValueError(f"space.{method}: method {method} drafts with a drafter model; set pair.drafter (or pair.dir)")
    allowed = registered.knobs.model_fields
    for knob, values in knobs.items():
        where = f"space.{method}.{knob}"
        if knob not in allowed:
            raise ValueError(f"{where}: unknown knob for {method}; its knobs: {', '.join(allowed) or 'none'}")
        if isinstance(values, Range):
            if search == "grid":
                raise ValueError(f"{where}: a range {{low, high}} needs search random or optuna-nsga2; grid takes a list of choices")
            for bound in (values.low, values.high):
                _check_choice(method, knob, bound, where)
        elif not values:
            raise ValueError(f"{where}: give at least one choice")
        else:
            for choice in values:
                _check_choice(method, knob, choice, where)
    if search == "grid":  # every combination must hold together too (e.g. min_ngram <= max_ngram)
        for config in grid_configs({method: dict(knobs)}):
            _check_combination(method, {k: v for k, v in config.items() if k != "method"})


def _check_choice(method: str, knob: str, value: Any, where: str) -> None:
    """The value alone; rules across knobs are checked on whole combinations."""
    from spectune.methods import METHODS

    try:
        METHODS.get(method).knobs.model_validate({knob: value})
    except ValidationError as err:
        own = [e for e in err.errors() if tuple(e["loc"][:1]) == (knob,)]
        if own:
            hint = ""
            if any(e["type"] == "list_type" for e in own):
                hint = " (each choice is one value: a list-valued knob takes a list of lists, e.g. [[2, 2, 1]])"
            raise ValueError(f"{where}: {value!r} is not allowed: {_messages(own)}{hint}") from None


def _check_combination(method: str, values: dict[str, Any]) -> None:
    from spectune.methods import METHODS

    try:
        METHODS.get(method).knobs.model_validate(values)
    except ValidationError as err:
        raise ValueError(f"space.{method}: the combination {values} is not allowed: {_messages(err.errors())}") from None


def _messages(errors: list[Any]) -> str:
    return "; ".join(e["msg"].removeprefix("Value error, ") for e in errors)


def grid_configs(space: Mapping[str, Mapping[str, KnobValues]]) -> list[dict[str, Any]]:
    """Every {method, knob: value, ...} combination of a space made of choice lists."""
    configs = []
    for method, knobs in space.items():
        names = list(knobs)
        choices = [values for values in knobs.values() if isinstance(values, list)]
        if len(choices) != len(names):
            continue  # ranges: reported by check_method
        for combo in itertools.product(*choices):
            configs.append({"method": method, **dict(zip(names, combo, strict=True))})
    return configs


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a spec file; SpecError names the file, the field and what is allowed."""
    file = Path(path)
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError(f"sweep spec {file} does not exist") from None
    except yaml.YAMLError as err:
        raise SpecError(f"sweep spec {file} is not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(data, dict):
        raise SpecError(f"sweep spec {file}: expected a mapping with name, pair, space, ...")
    return parse_spec(data, source=str(file))


def parse_spec(data: Mapping[str, Any], source: str = "sweep spec") -> SweepSpec:
    try:
        return SweepSpec.model_validate(dict(data))
    except ValidationError as err:
        raise SpecError(f"{source}: {describe(err)}") from None


def describe(err: ValidationError) -> str:
    """One line: `field.path: problem` for each problem pydantic found."""
    problems = []
    for e in err.errors():
        where = ".".join(str(part) for part in e["loc"])
        message = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            message = "unknown field"
        problems.append(f"{where}: {message}" if where and not message.startswith(f"{where}") else message)
    return "; ".join(dict.fromkeys(problems))
