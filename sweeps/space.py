"""A sweep spec as Ray Tune sees it: the param_space, the searcher and the trial count.

Tune's three ways of searching a conditional space (a tree shape only for tree methods):

- grid:  `tune.grid_search` over the explicit list of {method, knobs...} configurations
         (times `tune.grid_search` over temperatures);
- random: `tune.choice` over per-method dicts whose knobs are Tune domains
         (Tune resolves domains nested in the chosen dict), sampled with a seeded generator;
- optuna-nsga2: `OptunaSearch` with a define-by-run function that suggests the method,
         then that method's knobs, under NSGA-II (multi-objective, seeded).

Whatever the search, `trial_config` turns the config Tune hands a trial into one
`spectune.config.DecodeConfig` (method, knobs, temperature, the dtype of a `dtypes` axis; backend and concurrency for
serving backends, whose grid runs every configuration's loads one after another so a worker
keeps that configuration's server up across them).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ray import tune
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter, Searcher

from spectune.config import DEFAULT_BACKEND, DecodeConfig
from spectune.sweeps.spec import Range, SweepSpec, grid_configs

OPTUNA_PRIMITIVES = (type(None), bool, int, float, str)  # what optuna's categorical choices may hold


def trial_config(tune_config: Mapping[str, Any]) -> DecodeConfig:
    """Grid and random configs hold {"trial": {method, ...knobs}}; Optuna's hold {method, <method>: {knobs}}."""
    temperature = float(tune_config.get("temperature", 0.0))
    if "trial" in tune_config:
        knobs = dict(tune_config["trial"])
        method = knobs.pop("method")
        backend = knobs.pop("backend", DEFAULT_BACKEND)
        concurrency = knobs.pop("concurrency", tune_config.get("concurrency", 1))
        return DecodeConfig(method, knobs, temperature, backend=backend, concurrency=concurrency,
                            dtype=tune_config.get("dtype"))
    method = tune_config["method"]
    return DecodeConfig(method, dict(tune_config.get(method) or {}), temperature,
                        backend=tune_config.get("backend", DEFAULT_BACKEND), concurrency=tune_config.get("concurrency", 1),
                        dtype=tune_config.get("dtype"))


def _served_points(spec: SweepSpec) -> list[dict[str, Any]]:
    """The grid of a serving backend: each configuration at every load, loads of one configuration adjacent."""
    return [{**config, "backend": spec.backend, "concurrency": load}
            for config in grid_configs(spec.space) for load in spec.load.concurrency]


def param_space(spec: SweepSpec) -> dict[str, Any]:
    """Tune's param_space for grid and random search (Optuna defines its space by run instead)."""
    space = _param_space(spec)
    if spec.dtypes and space:  # the dtype axis: every configuration in each dtype
        space["dtype"] = tune.grid_search(spec.dtypes) if spec.search == "grid" else tune.choice(spec.dtypes)
    return space


def _param_space(spec: SweepSpec) -> dict[str, Any]:
    serving = spec.backend != DEFAULT_BACKEND
    if spec.search == "grid":
        points = _served_points(spec) if serving else grid_configs(spec.space)
        return {"trial": tune.grid_search(points), "temperature": tune.grid_search(spec.temperatures)}
    if spec.search == "random":
        methods = [{"method": m, **{k: _domain(v) for k, v in knobs.items()}} for m, knobs in spec.space.items()]
        if serving:
            methods = [{**m, "backend": spec.backend} for m in methods]
            return {"trial": tune.choice(methods), "temperature": tune.choice(spec.temperatures),
                    "concurrency": tune.choice(spec.load.concurrency)}
        return {"trial": tune.choice(methods), "temperature": tune.choice(spec.temperatures)}
    return {}


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
        decoded: dict[str, Any] = {}
        for knob, values in self.spec.space[method].items():
            name = f"{method}/{knob}"
            if isinstance(values, Range):
                suggest = trial.suggest_int if values.integer else trial.suggest_float
                suggest(name, values.low, values.high, log=values.log)
            elif all(isinstance(v, OPTUNA_PRIMITIVES) for v in values):
                trial.suggest_categorical(name, values)
            else:
                decoded[name] = json.loads(trial.suggest_categorical(name, [json.dumps(v) for v in values]))
        if self.spec.backend != DEFAULT_BACKEND:
            loads = self.spec.load.concurrency
            decoded["backend"] = self.spec.backend
            if len(loads) > 1:
                trial.suggest_categorical("concurrency", loads)
            else:
                decoded["concurrency"] = loads[0]
        if self.spec.dtypes and len(self.spec.dtypes) > 1:
            trial.suggest_categorical("dtype", self.spec.dtypes)
        elif self.spec.dtypes:
            decoded["dtype"] = self.spec.dtypes[0]
        temperatures = self.spec.temperatures
        if len(temperatures) > 1:
            trial.suggest_categorical("temperature", temperatures)
            return decoded
        return {**decoded, "temperature": temperatures[0]}
