"""The YAML sweep spec: what to sweep, on which pair and prompts, toward which objectives.

    name: quick
    pair: {dir: ~/.cache/spectune/pairs/tiny-seed0}      # or tiny, {preset, seed}, {target, drafter} (spectune.pair_ref)
    prompts: {set: default, limit: 12}
    max_new_tokens: 64
    temperatures: [0.0]
    dtypes: [float32, bfloat16]                            # optional: a dtype axis (default: pair.dtype)
    space:                                                 # method -> knob -> choices or range
      sps:  {draft_len: [2, 4, 6], schedule: [fixed, heuristic]}
      tree: {branching: [[2, 2, 1], [4, 2, 1]]}
      pld:  {}
    objectives: [{metric: speedup, mode: max}, {metric: tree_tokens_per_step, mode: min}]
    search: grid                                           # grid | random | optuna-nsga2
    resources: {cpus: 1, gpus: 0}

A vLLM sweep (`backend: vllm`) keys its space by vLLM's speculative methods (`ar` = none) and
measures every configuration at each load of `load.concurrency` (one trial per point);
`vllm:` says how its servers run (spectune.backends.vllm.VllmServerSettings):

    backend: vllm
    space:
      ar:    {}
      ngram: {num_speculative_tokens: [3, 5], prompt_lookup_max: [3], max_num_seqs: [16]}
    load: {concurrency: [1, 4, 16]}
    vllm: {max_model_len: 1024, kv_cache_gb: 1}

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

from spectune.backends import BACKENDS
from spectune.backends.vllm import VllmServerSettings
from spectune.config import DEFAULT_BACKEND, MaxNewTokens, Repeats, Settings, TopP, Warmup, check_temperature
from spectune.pair_ref import PairRef
from spectune.validation import one_line

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


class LoadSpec(BaseModel):
    """The load a serving backend is measured under: requests in flight at once, one trial per value."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    concurrency: list[int] = Field([1], min_length=1, description="requests in flight at once, e.g. [1, 4, 16]")

    @field_validator("concurrency")
    @classmethod
    def positive_distinct(cls, values: list[int]) -> list[int]:
        if any(v < 1 for v in values) or len(set(values)) != len(values):
            raise ValueError(f"give distinct request counts >= 1, got {values}")
        return values


class SweepSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="names the sweep in the store and its Tune folder")
    pair: PairRef
    prompts: PromptsSpec = PromptsSpec()
    max_new_tokens: MaxNewTokens = 64
    temperatures: list[float] = Field([0.0], min_length=1)
    dtypes: list[Literal["float32", "bfloat16", "float16"]] | None = Field(
        None, min_length=1, description="a dtype axis: every configuration in each of these (default: pair.dtype only)")
    top_p: TopP = 1.0
    seed: int = 0
    space: dict[str, dict[str, Any]] = Field(min_length=1, description="method -> knob -> choices or range")
    objectives: list[Objective] = Field(default_factory=lambda: [
        Objective(metric="speedup", mode="max"), Objective(metric="tree_tokens_per_step", mode="min")], min_length=1)
    search: Literal["grid", "random", "optuna-nsga2"] = "grid"
    num_samples: int | None = Field(None, ge=1, description="trials for random / optuna-nsga2 (default 10)")
    repeats: Repeats = 1  # per trial
    warmup: Warmup = 1
    concurrency: int = Field(1, ge=1, description="trials at once (one worker per trial slot)")
    resources: Resources = Resources()
    backend: str = Field(DEFAULT_BACKEND, description="whose engine decodes: spectune (its own) or vllm")
    load: LoadSpec = Field(LoadSpec(), description="serving backends: the load axis (concurrency: [1, 4, 16])")
    vllm: VllmServerSettings = Field(VllmServerSettings(), description="backend vllm: how its servers run")

    @field_validator("backend")
    @classmethod
    def known_backend(cls, value: str) -> str:
        BACKENDS.get(value)  # ValueError naming the known ones
        return value

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
            check_temperature(value)
        if len(set(values)) != len(values):
            raise ValueError(f"temperatures repeat a value: {values}")
        return values

    @field_validator("dtypes")
    @classmethod
    def dtypes_once(cls, values: list[str] | None) -> list[str] | None:
        if values is not None and len(set(values)) != len(values):
            raise ValueError(f"dtypes repeat a value: {values}")
        return values

    @field_validator("space")
    @classmethod
    def knob_values(cls, space: dict[str, dict[str, Any]]) -> dict[str, dict[str, KnobValues]]:
        return {method: {knob: _knob_values(f"space.{method}.{knob}", v) for knob, v in (knobs or {}).items()}
                for method, knobs in space.items()}

    @model_validator(mode="after")
    def consistent(self) -> SweepSpec:
        self._check_backend_sections()
        for method, knobs in self.space.items():
            check_method(method, knobs, self.pair, self.search, self.backend)
        if self.search == "grid":
            if self.num_samples not in (None, 1):
                raise ValueError("num_samples: grid runs every combination once; num_samples is for random and optuna-nsga2")
            count = self.trials
            if count > MAX_GRID:
                raise ValueError(f"space: the grid has {count} configurations (limit {MAX_GRID}); use search: random or optuna-nsga2")
        if self.pair.device.startswith("cuda") and self.resources.gpus <= 0:
            raise ValueError(f"resources.gpus: pair.device is {self.pair.device}, so each trial needs gpus > 0")
        if self.pair.device.startswith("cuda:"):
            raise ValueError(f"pair.device: use cuda, not {self.pair.device}: Ray gives each worker its own GPU(s)")
        if self.dtypes and not BACKENDS.get(self.backend).dtype_axis:
            takers = " or ".join(BACKENDS.names_where(lambda backend: backend.dtype_axis))
            raise ValueError(f"dtypes: backend {self.backend} takes pair.dtype only; a dtype axis needs backend: {takers}")
        return self

    def _check_backend_sections(self) -> None:
        """The load axis and the settings sections (each under its backend's name) fit the chosen backend."""
        backend = BACKENDS.get(self.backend)
        most = backend.max_concurrency
        if most is not None and max(self.load.concurrency) > most:
            under_load = " or ".join(BACKENDS.names_where(lambda other: other.max_concurrency is None))
            raise ValueError(f"load.concurrency: backend {self.backend} decodes {most} request(s) at a time; "
                             f"a load axis needs backend: {under_load}")
        for section in BACKENDS.names_where(lambda other: other.settings is not None):
            if section in self.model_fields_set and section != self.backend:
                raise ValueError(f"{section}: settings for backend {section}, but backend is {self.backend} "
                                 f"(set backend: {section})")

    def settings(self) -> Settings:
        """How every trial is measured (the driver makes it once; trials carry it as is)."""
        return Settings(max_new_tokens=self.max_new_tokens, top_p=self.top_p, seed=self.seed, repeats=self.repeats,
                        warmup=self.warmup)

    @property
    def trials(self) -> int:
        """How many trials the sweep runs (a grid: every configuration at every temperature and load)."""
        if self.search == "grid":
            return len(grid_configs(self.space)) * len(self.temperatures) * len(self.load.concurrency) * len(self.dtypes or [0])
        return self.num_samples or 10


def _knob_values(where: str, values: Any) -> KnobValues:
    if isinstance(values, list):
        return values
    if isinstance(values, Mapping):
        try:
            return Range.model_validate(dict(values))
        except ValidationError as err:
            raise ValueError(f"{where}: bad range: {one_line(err)}") from None
    raise ValueError(f"{where}: give a list of choices (e.g. [{values!r}]) or a range {{low, high[, log]}}")


def check_method(method: str, knobs: Mapping[str, KnobValues], pair: PairRef, search: str,
                 backend: str = DEFAULT_BACKEND) -> None:
    engine = BACKENDS.get(backend)  # spectune's methods import torch only when asked: trial processes need none
    try:
        registered = engine.method(method)
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
                _check_choice(registered, knob, bound, where)
        elif not values:
            raise ValueError(f"{where}: give at least one choice")
        else:
            for choice in values:
                _check_choice(registered, knob, choice, where)
    if search == "grid":  # every combination must hold together too (e.g. min_ngram <= max_ngram)
        for config in grid_configs({method: dict(knobs)}):
            _check_combination(registered, {k: v for k, v in config.items() if k != "method"})
    if engine.check_pair is not None:  # what the pair must offer (a drafter, trained heads)
        combos = grid_configs({method: dict(knobs)}) if search == "grid" else [{}]
        try:
            for config in combos:
                engine.check_pair(method, {k: v for k, v in config.items() if k != "method"}, pair)
        except ValueError as err:
            raise ValueError(f"space.{method}: {err}") from None


def _check_choice(registered: Any, knob: str, value: Any, where: str) -> None:
    """The value alone; rules across knobs are checked on whole combinations."""
    try:
        registered.knobs.model_validate({knob: value})
    except ValidationError as err:
        own = [e for e in err.errors() if tuple(e["loc"][:1]) == (knob,)]
        if own:
            hint = ""
            if any(e["type"] == "list_type" for e in own):
                hint = " (each choice is one value: a list-valued knob takes a list of lists, e.g. [[2, 2, 1]])"
            raise ValueError(f"{where}: {value!r} is not allowed: {one_line(own, locations=False)}{hint}") from None


def _check_combination(registered: Any, values: dict[str, Any]) -> None:
    try:
        registered.knobs.model_validate(values)
    except ValidationError as err:
        raise ValueError(f"space.{registered.name}: the combination {values} is not allowed: {one_line(err, locations=False)}") from None


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
        raise SpecError(f"{source}: {one_line(err)}") from None
