"""One measured result of one configuration, as bench prints it, a trial reports it and the store keeps it.

Torch-free, like `spectune.config`: the sweep driver, the store, the dashboard and the endpoint
read it without the engine. `as_dict()` is the row `spectune bench --json` prints (and what
Tune's result file and the store's `extra` column hold); `from_dict` reads it back.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from spectune.config import DecodeConfig
from spectune.lossless import LosslessStatus


@dataclass(frozen=True)
class StepCounts:
    """Counts over every step of a pass (metric names as vLLM and Spec-Bench use them)."""

    new_tokens: int = 0
    target_calls: int = 0
    draft_calls: int = 0
    mean_accepted_tokens: float | None = None  # tau: tokens per target forward, bonus included (AR = 1.0)
    acceptance_rate: float | None = None  # accepted draft tokens / drafted tokens
    acceptance_by_position: tuple[float, ...] = ()  # entry i: steps that drafted i+1 deep and accepted that deep
    tree_tokens_per_step: float | None = None
    draft_calls_per_step: float | None = None


@dataclass(frozen=True)
class PromptStats:
    prompt_id: str
    category: str | None = None
    new_tokens: int | None = None
    target_calls: int | None = None
    mean_accepted_tokens: float | None = None
    wall_s: float | None = None
    matches_ar: bool | None = None  # greedy only; None when sampling


@dataclass(frozen=True)
class DecodeResult:
    """A configuration measured against AR in the same run."""

    config: DecodeConfig
    n_prompts: int
    counts: StepCounts
    wall_s: float | None = None  # the speed fields: medians and spreads over repeats (RepeatStats, every backend)
    wall_s_std: float | None = None
    tokens_per_s: float | None = None
    ar_tokens_per_s: float | None = None
    speedup: float | None = None  # median of same-repeat ratios to AR
    speedup_std: float | None = None
    speedups: tuple[float, ...] = ()  # every repeat's ratio
    speedup_ci_low: float | None = None  # confidence interval of the speedup (bootstrap over prompts)
    speedup_ci_high: float | None = None
    lossless: bool | None = None  # the stored flag of lossless_status (LosslessStatus.flag); None when unchecked
    lossless_status: LosslessStatus | None = None  # spectune.lossless decides it (None: rows from before it)
    exact_match_rate: float | None = None  # share of prompts whose output is identical to the reference's
    worst_margin: float | None = None  # greedy certificate: the largest (argmax logit - emitted token's logit)
    lossy_method: bool = False  # the method does not claim to be lossless
    mismatches: int | None = None
    draft_share: float | None = None
    engine_overhead_share: float | None = None
    ms_per_token: float | None = None
    peak_mem_mb: float | None = None
    acceptance_by_exit_layer: Mapping[str, float] | None = None  # self-speculative drafters
    exit_choices: Mapping[str, int] | None = None  # del: rounds per "layer,length"
    max_new_tokens: int | None = None
    by_category: Mapping[str, Mapping[str, Any]] | None = None  # {category: {n_prompts, speedup, ...}}
    ttft_s: float | None = None  # served engines (vLLM): time to first token, mean over requests
    tpot_s: float | None = None  # time per output token after the first, mean over requests
    p50_latency_s: float | None = None  # request latency percentiles
    p95_latency_s: float | None = None
    per_prompt: tuple[PromptStats, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)  # what the run adds (a trial: decode_s, worker, ...)

    def __post_init__(self) -> None:
        if self.lossless_status is not None:  # typed, whether made here or read back from a row
            object.__setattr__(self, "lossless_status", LosslessStatus(self.lossless_status))

    @property
    def method(self) -> str:
        return self.config.method

    @property
    def label(self) -> str:
        return self.config.label()

    def as_dict(self) -> dict[str, Any]:
        """The flat JSON row: method, label, config, counts and timings, per_prompt, then the extra keys."""
        row: dict[str, Any] = {"method": self.method, "label": self.label, "config": self.config.as_dict(),
                               "n_prompts": self.n_prompts}
        row.update({f.name: _plain(getattr(self.counts, f.name)) for f in fields(StepCounts)})
        for f in fields(self):
            if f.name not in ("config", "n_prompts", "counts", "per_prompt", "extra"):
                row[f.name] = _plain(getattr(self, f.name))
        row["temperature"] = self.config.temperature
        row["per_prompt"] = [{f.name: getattr(p, f.name) for f in fields(PromptStats)} for p in self.per_prompt]
        return {**row, **self.extra}

    @classmethod
    def from_dict(cls, row: Mapping[str, Any], config: DecodeConfig | None = None) -> DecodeResult:
        """Read a row back; `config` (e.g. the store's typed one) wins over the row's own."""
        rest = dict(row)
        for derived in ("method", "label", "temperature"):
            rest.pop(derived, None)
        flat = rest.pop("config", None) or {"method": row.get("method"), "temperature": row.get("temperature")}
        config = config or DecodeConfig.from_dict(flat)
        counts = StepCounts(**{f.name: _tuple_if_list(rest.pop(f.name, f.default)) for f in fields(StepCounts)})
        per_prompt = tuple(_prompt(p) for p in rest.pop("per_prompt", None) or ())
        own = {f.name: _tuple_if_list(rest.pop(f.name)) for f in fields(cls)
               if f.name in rest and f.name not in ("config", "counts", "per_prompt", "extra")}
        extra = {**dict(rest.pop("extra", None) or {}), **rest}
        return cls(config=config, counts=counts, per_prompt=per_prompt, extra=extra,
                   n_prompts=own.pop("n_prompts", len(per_prompt)), **own)

    def with_extra(self, **extra: Any) -> DecodeResult:
        return replace(self, extra={**self.extra, **extra})


@dataclass(frozen=True)
class RepeatStats:
    """DecodeResult's speed fields from per-repeat measurements: the one statistics rule of every backend.

    Each value is the median over repeats (a speedup: of the same-repeat ratios of the configuration's
    tokens/s to its baseline's); a spread is the sample standard deviation over repeats, and None for
    one repeat (a single pass measures no spread; 0.0 would read as perfectly repeatable).
    """

    wall_s: float
    wall_s_std: float | None
    tokens_per_s: float
    ar_tokens_per_s: float
    speedup: float
    speedup_std: float | None
    speedups: tuple[float, ...]  # every repeat's ratio, in order

    @classmethod
    def of(cls, wall_s: Sequence[float], tokens_per_s: Sequence[float],
           ar_tokens_per_s: Sequence[float]) -> RepeatStats:
        """Per repeat: the configuration's seconds over the prompt set and tokens/s, and its baseline's tokens/s."""
        counts = (len(wall_s), len(tokens_per_s), len(ar_tokens_per_s))
        if not wall_s or len(set(counts)) != 1:
            raise ValueError(f"one value per repeat for each, got {counts}")
        ratios = tuple(rate / ar for rate, ar in zip(tokens_per_s, ar_tokens_per_s))
        return cls(statistics.median(wall_s), spread(wall_s), statistics.median(tokens_per_s),
                   statistics.median(ar_tokens_per_s), statistics.median(ratios), spread(ratios), ratios)

    def fields(self) -> dict[str, Any]:
        """As DecodeResult's keyword arguments."""
        return asdict(self)


def spread(values: Sequence[float]) -> float | None:
    """The sample standard deviation over repeats; None for a single repeat."""
    return statistics.stdev(values) if len(values) > 1 else None


@dataclass(frozen=True)
class BaselineResult:
    """A worker's AR speed over a prompt set: the denominator of every speedup it reports."""

    pair_id: str
    prompt_set_hash: str
    max_new_tokens: int
    temperature: float
    ar_tokens_per_s: float
    target_path: str
    drafter_path: str | None
    measured_s: float  # seconds the measurement took (kept in the store's extra)


def _prompt(entry: Mapping[str, Any]) -> PromptStats:
    known = {f.name for f in fields(PromptStats)}
    return PromptStats(**{key: value for key, value in entry.items() if key in known})


def _tuple_if_list(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _plain(value: Any) -> Any:
    """JSON-ready: tuples as lists, mappings as dicts."""
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, LosslessStatus):
        return value.value
    if isinstance(value, Mapping):
        return dict(value)
    return value
