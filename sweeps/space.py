"""A sweep spec as Ray Tune sees it: the param_space, the searcher and the trial count.

Tune's three ways of searching a conditional space (a tree shape only for tree methods):

- grid:  `tune.grid_search` over every configuration at every load, temperature and dtype;
- random: `tune.choice` over per-method dicts whose knobs are Tune domains
         (Tune resolves domains nested in the chosen dict), sampled with a seeded generator;
- optuna-nsga2: `OptunaSearch` with a define-by-run function that suggests the method,
         then that method's knobs, under NSGA-II (multi-objective, seeded).

Whatever the search, Tune hands a trial one shape: `DecodeConfig.as_dict()`'s flat form (method,
knobs, temperature, the dtype of a `dtypes` axis; backend and concurrency for serving backends,
whose grid runs every configuration's loads one after another so a worker keeps that
configuration's server up across them) under the key `trial`, which `trial_config` reads back.
The driver validated the spec once; nothing downstream validates the configuration again.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ray import tune
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter, Searcher

from spectune.backends import BACKENDS
from spectune.config import DecodeConfig
from spectune.sweeps.spec import Range, SweepSpec, grid_configs

OPTUNA_PRIMITIVES = (type(None), bool, int, float, str)  # what optuna's categorical choices may hold


TRIAL = "trial"  # the key of Tune's config that holds the trial's configuration, in its flat form


def trial_config(tune_config: Mapping[str, Any]) -> DecodeConfig:
    """The configuration Tune hands a trial: every search puts `DecodeConfig.as_dict()`'s flat form under
    TRIAL (decided by the driver; read back here, not validated again)."""
    return DecodeConfig.from_dict(tune_config[TRIAL])


def grid(spec: SweepSpec) -> list[DecodeConfig]:
    """Every trial of a grid, in the order it runs: each configuration at every load (a serving backend
    keeps one configuration's server up across its loads), then every temperature, then every dtype."""
    backend = BACKENDS.get(spec.backend)
    loads = spec.load.concurrency if _serving(spec) else [1]
    return [DecodeConfig(point["method"], {k: v for k, v in point.items() if k != "method"}, temperature,
                         backend=backend.name, concurrency=load, dtype=dtype)
            for point in grid_configs(spec.space) for load in loads
            for temperature in spec.temperatures for dtype in (spec.dtypes or [None])]


def param_space(spec: SweepSpec) -> dict[str, Any]:
    """Tune's param_space for grid and random search (Optuna defines its space by run instead)."""
    if spec.search == "grid":
        return {TRIAL: tune.grid_search([config.as_dict() for config in grid(spec)])}
    if spec.search == "random":
        return {TRIAL: tune.choice([_random_method(spec, method, knobs) for method, knobs in spec.space.items()])}
    return {}


def _random_method(spec: SweepSpec, method: str, knobs: Mapping[str, Any]) -> dict[str, Any]:
    """One method's flat form with Tune domains for values (Tune resolves domains nested in the chosen dict)."""
    flat = {"method": method, **{k: _domain(v) for k, v in knobs.items()},
            "temperature": tune.choice(spec.temperatures)}
    if _serving(spec):
        flat.update(backend=spec.backend, concurrency=tune.choice(spec.load.concurrency))
    if spec.dtypes:
        flat["dtype"] = tune.choice(spec.dtypes)
    return flat


def _serving(spec: SweepSpec) -> bool:
    """A backend measured under load (several requests in flight): its trials carry backend and concurrency."""
    return BACKENDS.get(spec.backend).under_load


def _domain(values: list[Any] | Range) -> Any:
    if isinstance(values, list):
        return tune.choice(values)
    if values.integer:  # Tune's integer upper bounds are exclusive; the spec's are inclusive
        return tune.lograndint(values.low, values.high + 1) if values.log else tune.randint(values.low, values.high + 1)
    return tune.loguniform(values.low, values.high) if values.log else tune.uniform(values.low, values.high)


def searcher(spec: SweepSpec, slots: int) -> Searcher | BasicVariantGenerator:
    """At most `slots` trials at once (one per worker); Tune takes that limit from the search algorithm."""
    if spec.search == "optuna-nsga2":
        return ConcurrencyLimiter(optuna_searcher(spec), max_concurrent=slots)
    return BasicVariantGenerator(random_state=spec.seed, max_concurrent=slots)


def num_samples(spec: SweepSpec) -> int:
    """Tune's num_samples: a grid runs once over its combinations; the others draw `trials` samples."""
    return 1 if spec.search == "grid" else spec.trials


def optuna_searcher(spec: SweepSpec) -> Searcher:
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our progress lines say what each trial did
    # NSGA-II draws a random first generation of population_size trials, then evolves it:
    # a small sweep gets smaller generations than Optuna's 50, so that some of it evolves
    population = min(50, max(4, spec.trials // 2))
    sampler = optuna.samplers.NSGAIISampler(seed=spec.seed, population_size=population)
    return OptunaSearch(
        space=DefineByRun(spec),
        metric=[o.metric for o in spec.objectives],
        mode=[o.mode for o in spec.objectives],
        sampler=sampler,
    )


@dataclass(frozen=True)
class DefineByRun:
    """Optuna's conditional space: the method first, then only that method's knobs.

    Knob parameters are named `<method>/<knob>` (one distribution per name, as Optuna
    requires); choices Optuna cannot hold (lists, e.g. tree shapes) are suggested as
    JSON text and handed to Tune decoded.
    """

    spec: SweepSpec

    def __call__(self, trial: Any) -> dict[str, Any]:
        method = trial.suggest_categorical("method", list(self.spec.space))
        flat: dict[str, Any] = {"method": method}
        for knob, values in self.spec.space[method].items():
            flat[knob] = self._suggest(trial, f"{method}/{knob}", values)
        if _serving(self.spec):
            flat.update(backend=self.spec.backend, concurrency=_pick(trial, "concurrency", self.spec.load.concurrency))
        if self.spec.dtypes:
            flat["dtype"] = _pick(trial, "dtype", self.spec.dtypes)
        flat["temperature"] = _pick(trial, "temperature", self.spec.temperatures)
        return {TRIAL: flat}

    @staticmethod
    def _suggest(trial: Any, name: str, values: list[Any] | Range) -> Any:
        if isinstance(values, Range):
            suggest = trial.suggest_int if values.integer else trial.suggest_float
            return suggest(name, values.low, values.high, log=values.log)
        if all(isinstance(v, OPTUNA_PRIMITIVES) for v in values):
            return trial.suggest_categorical(name, values)
        return json.loads(trial.suggest_categorical(name, [json.dumps(v) for v in values]))


def _pick(trial: Any, name: str, values: list[Any]) -> Any:
    """An axis Optuna suggests only when there is a choice to make."""
    return trial.suggest_categorical(name, values) if len(values) > 1 else values[0]
