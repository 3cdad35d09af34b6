"""Which configuration the endpoint serves, and from where it came.

Four ways to choose, in this order of precedence:

    --config FILE                  a YAML file: pair + method + knobs
    --trial ID                     a trial in the store (its sweep's spec names the pair)
    --sweep NAME --objective F     the best lossless finished trial of a sweep by F
    (nothing)                      the trial the dashboard marked "serve this config"

Everything resolves, in the driver, to one `ServedConfig` with absolute model paths, so a
replica on another node only loads what it is told.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from spectune.backends import BACKENDS
from spectune.config import DEFAULT_BACKEND, DecodeConfig
from spectune.pair_ref import PairRef
from spectune.validation import dotted, one_line

ENV_API_KEY = "SPECTUNE_API_KEY"


class ServeConfigError(ValueError):
    """The configuration to serve cannot be chosen or is invalid; the message says why."""


class ServedSource(BaseModel):
    """Where the served configuration came from (shown by GET /config)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["config_file", "trial", "best_of_sweep", "schedule_of_sweep", "marked_in_dashboard"]
    path: str | None = None
    db: str | None = None  # password masked
    trial_id: int | None = None
    sweep: str | None = None
    objective: str | None = None
    mode: Literal["max", "min"] | None = None
    concurrency: int | None = None  # the load the best trial was picked at
    trials: tuple[int, ...] = ()  # schedule_of_sweep: the trials its bands rest on


class ServedConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    pair: PairRef
    method: str
    knobs: dict[str, Any] = Field(default_factory=dict)
    model_id: str
    source: ServedSource
    trial_metrics: dict[str, Any] | None = None  # what the sweep measured for this trial
    backend: str = DEFAULT_BACKEND  # whose engine serves: spectune's, or vllm (a vLLM server per replica)
    concurrency: int = 1  # the load the configuration was chosen for
    server: dict[str, Any] = Field(default_factory=dict)  # the backend's settings section (vllm: VllmServerSettings)

    @model_validator(mode="after")
    def method_fits_pair(self) -> ServedConfig:
        self.config()  # ValueError naming the method and the field
        if BACKENDS.get(self.backend).method(self.method).needs_drafter and not self.pair.drafter:
            raise ValueError(f"method {self.method!r} needs a drafter model, but the pair names none")
        return self

    def config(self) -> DecodeConfig:
        """The served configuration (requests choose their own temperature)."""
        return BACKENDS.get(self.backend).config(self.method, self.knobs, concurrency=self.concurrency)


class Limits(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens_limit: int = Field(512, ge=1, description="largest max_tokens a request may ask for")
    decode_threads: int = Field(2, ge=1, description="requests one replica decodes at once; the rest queue")


class ServeArgs(BaseModel):
    """What `spectune serve` and a Serve config file's `args:` say to serve (see workers/serve/serve_config.yaml)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    config: str | None = None
    trial: int | None = None
    sweep: str | None = None
    objective: str = "speedup"
    mode: Literal["max", "min"] | None = None
    include_unchecked: bool = False  # with sweep: sampling trials (lossless by rule, unchecked) may win too
    concurrency: int | None = Field(None, ge=1, description="with sweep: the best trial measured at this load")
    schedule: bool = Field(False, description="with sweep (a vLLM load sweep): its per-load schedule of k "
                                              "(`spectune vllm schedule`), not one trial")
    min_speedup: float = Field(1.0, ge=0.0, description="with schedule: what a k's speedup interval must clear")
    db: str | None = None
    device: str | None = None
    max_tokens_limit: int = Field(512, ge=1)
    decode_threads: int = Field(2, ge=1)
    api_key: str | None = None

    @model_validator(mode="after")
    def one_choice(self) -> ServeArgs:
        given = [flag for flag, value in (("config", self.config), ("trial", self.trial), ("sweep", self.sweep))
                 if value is not None]
        if len(given) > 1:
            raise ValueError(f"choose one of config, trial or sweep, not {' and '.join(given)}")
        if self.concurrency is not None and self.sweep is None:
            raise ValueError("concurrency picks the best of a sweep's trials at that load: give it with sweep")
        if self.schedule and (self.sweep is None or self.concurrency is not None):
            raise ValueError("schedule serves a load sweep's per-load schedule: give it with sweep, without concurrency")
        return self

    @property
    def limits(self) -> Limits:
        return Limits(max_tokens_limit=self.max_tokens_limit, decode_threads=self.decode_threads)

    @property
    def resolved_api_key(self) -> str | None:
        return self.api_key or os.environ.get(ENV_API_KEY) or None


def choose(args: ServeArgs) -> ServedConfig:
    """The configuration `args` point at (a file or the store)."""
    if args.config is not None:
        served = from_config_file(args.config)
    else:
        served = from_store(args)
    if args.device is not None:
        served = served.model_copy(update={"pair": served.pair.model_copy(update={"device": args.device})})
    return served


# --- a YAML file --------------------------------------------------------------------------


class ConfigFile(BaseModel):
    """`--config FILE`: pair: micro | PAIR_DIR | {target, drafter, device, dtype}; method; knobs; name;
    and the backend's settings section under its name where it has one (`vllm: {max_model_len: 1024}`)."""

    model_config = ConfigDict(extra="forbid")

    pair: str | dict[str, Any]  # any form `spectune.pair_ref.PairRef` reads
    backend: str = DEFAULT_BACKEND  # vllm: method is vLLM's speculative method (ar = none)
    method: str
    knobs: dict[str, Any] = Field(default_factory=dict)
    name: str | None = Field(None, description="the model id clients see; default: pair/method(knobs)")


def from_config_file(path: str) -> ServedConfig:
    file = Path(path).expanduser()
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ServeConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as err:
        raise ServeConfigError(f"config file {path} is not valid YAML: {' '.join(str(err).split())}") from None
    try:
        data, sections = _backend_sections(data)
        parsed = ConfigFile.model_validate(data)
        server = _section_of(sections, parsed.backend)
        source = ServedSource(kind="config_file", path=str(file.resolve()))
        pair = PairRef.model_validate(parsed.pair)
        if "device" not in pair.model_fields_set:
            pair = pair.model_copy(update={"device": "auto"})  # a replica uses its GPU when it has one
        config = BACKENDS.get(parsed.backend).config(parsed.method, parsed.knobs)
        return _served(pair.absolute(), config, source, name=parsed.name, server=server)
    except (ValidationError, ValueError) as err:
        raise ServeConfigError(f"config file {path}: {_reason(err)}") from None


def _backend_sections(data: Any) -> tuple[Any, dict[str, Any]]:
    """The file without its backends' settings sections (keys named after a backend that declares settings), and those."""
    if not isinstance(data, Mapping):
        return data, {}
    named = set(BACKENDS.names_where(lambda backend: backend.settings is not None)) & set(data)
    return {key: value for key, value in data.items() if key not in named}, {key: data[key] for key in named}


def _section_of(sections: Mapping[str, Any], backend: str) -> dict[str, Any]:
    """`backend`'s own section, checked by its settings model; another backend's is a mistake (as in a sweep spec)."""
    for section in sections:
        if section != backend:
            raise ValueError(f"{section}: settings for backend {section}, but backend is {backend} "
                             f"(set backend: {section})")
    given = sections.get(backend) or {}
    settings = BACKENDS.get(backend).settings
    if settings is not None:  # a bad setting fails here, not in every replica
        try:
            settings.model_validate(given)
        except ValidationError as err:
            raise ValueError(one_line(err, verbatim=True, label=lambda loc: dotted((backend, *loc)))) from None
    return dict(given)


# --- the store ----------------------------------------------------------------------------


def from_store(args: ServeArgs) -> ServedConfig:
    if args.schedule:
        return from_schedule(args)
    from spectune.store.db import connect
    from spectune.store.errors import StoreError

    try:
        with connect(args.db) as store:
            trial_id, source = _pick_trial(store, args)
            detail = store.trial_detail(trial_id)
            sweep = store.get_sweep(detail["sweep"])
            stored = store.trial_config(trial_id)
    except StoreError as err:
        raise ServeConfigError(str(err)) from None
    where = f"trial {trial_id} of sweep {detail['sweep']!r}"
    try:
        pair = PairRef.model_validate(_pair_of_spec(sweep.spec if sweep else {}))
        config = BACKENDS.config(stored.with_temperature(0.0))
        if config.dtype:  # a trial of a dtype axis: serve it in the dtype it was measured in
            pair = pair.model_copy(update={"dtype": config.dtype})
        server = _settings_of_spec(sweep.spec if sweep else {}, config.backend)
        return _served(pair.absolute(), config, source, trial_metrics=_metric_summary(detail["metrics"]), server=server)
    except (ValidationError, ValueError) as err:
        raise ServeConfigError(f"{where}: {_reason(err)}") from None


def from_schedule(args: ServeArgs) -> ServedConfig:
    """A vLLM load sweep's schedule (`spectune.backends.vllm_schedule`) as the vLLM backend's configuration."""
    from spectune.backends.vllm_schedule import BACKEND, derive
    from spectune.store.db import connect
    from spectune.store.errors import StoreError

    try:
        with connect(args.db) as store:
            sweep = store.get_sweep(args.sweep)
            if sweep is None:
                raise ServeConfigError(f"no sweep named {args.sweep!r} in {store.url} (see `spectune sweeps list`)")
            chosen = derive(store.trials_frame(args.sweep), args.sweep, min_speedup=args.min_speedup)
            db = store.url
    except StoreError as err:
        raise ServeConfigError(str(err)) from None
    except ValueError as err:
        raise ServeConfigError(f"sweep {args.sweep!r}: {err}") from None
    source = ServedSource(kind="schedule_of_sweep", db=db, sweep=args.sweep, trials=chosen.trials)
    try:
        pair = PairRef.model_validate(_pair_of_spec(sweep.spec))
        config = BACKENDS.get(BACKEND).config(chosen.method, chosen.served_knobs())
        return _served(pair.absolute(), config, source, name=f"{pair.name}/vllm:{chosen.method}(schedule)",
                       server=_settings_of_spec(sweep.spec, BACKEND))
    except (ValidationError, ValueError) as err:
        raise ServeConfigError(f"the schedule of sweep {args.sweep!r}: {_reason(err)}") from None


def _pick_trial(store: Any, args: ServeArgs) -> tuple[int, ServedSource]:
    db = store.url
    if args.trial is not None:
        return args.trial, ServedSource(kind="trial", db=db, trial_id=args.trial)
    if args.sweep is not None:
        sweep = store.get_sweep(args.sweep)
        if sweep is None:
            raise ServeConfigError(f"no sweep named {args.sweep!r} in {db} (see `spectune sweeps list`)")
        mode = args.mode or _objective_mode(sweep.spec, args.objective)
        try:
            best = store.best_trial(args.sweep, args.objective, mode=mode, lossless_only=True,
                                    include_unchecked=args.include_unchecked, concurrency=args.concurrency)
            unchecked = None if best is not None or args.include_unchecked else store.best_trial(
                args.sweep, args.objective, mode=mode, include_unchecked=True, concurrency=args.concurrency)
        except ValueError as err:
            raise ServeConfigError(str(err)) from None
        if best is None:
            hint = (" (its sampling trials are lossless by rule but unchecked: --include-unchecked serves them)"
                    if unchecked is not None else "")
            load = f" at concurrency {args.concurrency}" if args.concurrency is not None else ""
            raise ServeConfigError(
                f"sweep {args.sweep!r} has no finished lossless trial{load} with a {args.objective} value to serve{hint}"
            )
        return best, ServedSource(kind="best_of_sweep", db=db, trial_id=best, sweep=args.sweep,
                                  objective=args.objective, mode=mode, concurrency=args.concurrency)
    marked = store.served_trial()
    if marked is None:
        raise ServeConfigError(
            f"nothing to serve: pass --config FILE, --trial ID or --sweep NAME --objective FIELD, "
            f"or mark a trial 'serve this config' in the dashboard (store: {db})"
        )
    return marked, ServedSource(kind="marked_in_dashboard", db=db, trial_id=marked)


def _objective_mode(spec: Mapping[str, Any], objective: str) -> Literal["max", "min"]:
    """The sweep spec's own mode for this objective when it lists it; else max."""
    for entry in spec.get("objectives") or []:
        if isinstance(entry, Mapping) and entry.get("metric") == objective and entry.get("mode") in ("max", "min"):
            return entry["mode"]
    return "max"


def _settings_of_spec(spec: Mapping[str, Any], backend: str) -> dict[str, Any]:
    """The sweep spec's section of `backend` (e.g. its `vllm:` server settings); {} where it has none."""
    if BACKENDS.get(backend).settings is None:
        return {}
    return dict((spec or {}).get(backend) or {})


def _pair_of_spec(spec: Mapping[str, Any]) -> str | Mapping[str, Any]:
    if spec.get("pair") is not None:
        return spec["pair"]
    if spec.get("target") is not None:  # target/drafter at the top level
        return {key: spec[key] for key in ("target", "drafter", "device", "dtype") if spec.get(key) is not None}
    raise ValueError("its sweep spec names no model pair (expected `pair:`)")


_SUMMARY_METRICS = ("speedup", "tokens_per_s", "ar_tokens_per_s", "mean_accepted_tokens", "acceptance_rate",
                    "lossless", "temperature", "max_new_tokens", "n_prompts", "p95_latency_s", "ttft_s",
                    "exact_match_rate", "lossless_status", "worst_margin")


def _metric_summary(metrics: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if metrics is None:
        return None
    return {key: metrics[key] for key in _SUMMARY_METRICS if key in metrics}


# --- shared -------------------------------------------------------------------------------


def _served(pair: PairRef, config: DecodeConfig, source: ServedSource, *, name: str | None = None,
            trial_metrics: dict[str, Any] | None = None, server: Mapping[str, Any] | None = None) -> ServedConfig:
    return ServedConfig(pair=pair, method=config.method, knobs=dict(config.knobs),
                        model_id=name or f"{pair.name}/{config.label()}", source=source, trial_metrics=trial_metrics,
                        backend=config.backend, concurrency=config.concurrency, server=dict(server or {}))


def _reason(err: Exception) -> str:
    return one_line(err, verbatim=True) if isinstance(err, ValidationError) else str(err)
