"""`spectune bench`: decoding configurations over a prompt set, timed against AR in the same run.

Within every repeat each prompt is decoded by AR and then by each configuration back to back,
so each speedup is a ratio of times taken seconds apart on the same machine state.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from spectune.engine.loop import Decoder, Generation
from spectune.engine.sampling import Sampling
from spectune.methods import METHODS
from spectune.methods.base import draft_modules
from spectune.metrics import step_metrics
from spectune.pair import Pair
from spectune.profiling import ForwardClock, peak_memory_mb
from spectune.prompts import Prompt


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: int = Field(128, ge=1, description="new tokens per prompt")
    temperature: float = Field(0.0, ge=0.0, le=5.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int = 0
    repeats: int = Field(3, ge=1, description="timed passes over the prompt set")
    warmup: int = Field(2, ge=0, description="untimed prompts each configuration decodes first")

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.temperature, self.top_p)


class DecodeConfig(BaseModel):
    """One configuration: a registered method and its knobs (given inline)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    method: str
    name: str | None = None

    @property
    def knobs(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        args = ",".join(f"{k}={v}" for k, v in self.knobs.items())
        return f"{self.method}({args})" if args else self.method

    @model_validator(mode="after")
    def knobs_valid(self) -> "DecodeConfig":
        METHODS.knobs(self.method, self.knobs)  # raises naming the method and field
        return self


class ConfigFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    configs: list[DecodeConfig] = Field(min_length=1)


def load_config_file(path: str) -> list[DecodeConfig]:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
        return ConfigFile.model_validate(data).configs
    except FileNotFoundError:
        raise ValueError(f"config file {path} does not exist") from None
    except yaml.YAMLError as err:
        raise ValueError(f"config file {path} is not valid YAML: {err}") from None
    except ValidationError as err:
        problem = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise ValueError(f"config file {path}: {problem}") from None


class Runner(Protocol):
    def generate(self, prompt: Sequence[int], max_new_tokens: int, sampling: Sampling, seed: int) -> Generation: ...


@dataclass(frozen=True)
class Contender:
    """Something timed against AR: a spectune configuration or a peer implementation."""

    label: str
    method: str
    config: dict[str, Any]
    runner: Runner
    lossy_method: bool = False


@dataclass(frozen=True)
class Pass:
    """One timed pass of one contender over the whole prompt set."""

    generations: list[Generation]
    seconds: list[float]  # per prompt
    target_s: float
    draft_s: float
    target_forwards: int  # prefills included, counted by hooks (peers report no steps)

    @property
    def wall_s(self) -> float:
        return sum(self.seconds)

    @property
    def tokens_per_s(self) -> float:
        return sum(len(g.tokens) for g in self.generations) / self.wall_s


def contender(pair: Pair, config: DecodeConfig) -> Contender:
    method = METHODS.get(config.method)
    drafter = METHODS.build(config.method, config.knobs, pair.runners())
    decoder = Decoder(pair.runners().target, drafter, pair.eos_token_id)
    return Contender(config.label, config.method, config.knobs, decoder, not method.lossless)


def encode_prompts(pair: Pair, prompts: Sequence[Prompt], max_new_tokens: int) -> list[list[int]]:
    encoded = []
    for prompt in prompts:
        tokens = pair.encode(prompt.prompt)
        if not tokens:
            raise ValueError(f"prompt {prompt.id!r} encodes to no tokens")
        if len(tokens) + max_new_tokens > pair.max_positions:
            raise ValueError(
                f"prompt {prompt.id!r} is {len(tokens)} tokens; with max_new_tokens={max_new_tokens} it exceeds "
                f"the target's context of {pair.max_positions}"
            )
        encoded.append(tokens)
    return encoded


def timed_prompt(pair: Pair, runner: Runner, tokens: list[int], index: int, settings: Settings) -> Pass:
    """One prompt decoded once, timed by the wall clock and by forward hooks on the models."""
    target_clock, draft_clock = ForwardClock(), ForwardClock()
    # the drafter model, and what a drafter drafts with besides (the target's exit views: layerskip, del)
    drafting = (pair.drafter, *draft_modules(getattr(runner, "drafter", None)))
    with target_clock.attached(pair.target), draft_clock.attached(*drafting):
        started = time.perf_counter()
        generation = runner.generate(tokens, settings.max_new_tokens, settings.sampling, settings.seed + index)
        seconds = time.perf_counter() - started
    return Pass([generation], [seconds], target_clock.seconds, draft_clock.seconds, target_clock.calls)


def joined(parts: Sequence[Pass]) -> Pass:
    """Per-prompt passes as one pass over the prompt set."""
    return Pass(
        [g for part in parts for g in part.generations],
        [s for part in parts for s in part.seconds],
        sum(part.target_s for part in parts),
        sum(part.draft_s for part in parts),
        sum(part.target_forwards for part in parts),
    )


def timed_pass(pair: Pair, runner: Runner, encoded: Sequence[list[int]], settings: Settings) -> Pass:
    return joined([timed_prompt(pair, runner, tokens, i, settings) for i, tokens in enumerate(encoded)])


@dataclass(frozen=True)
class Baseline:
    """AR passes over a prompt set: the denominator of every speedup, and the greedy reference outputs."""

    passes: list[Pass]
    encoded: list[list[int]]

    @property
    def reference(self) -> list[Generation]:
        return self.passes[0].generations

    @property
    def tokens_per_s(self) -> float:
        return statistics.median(p.tokens_per_s for p in self.passes)


def warm_up(pair: Pair, who: Contender, encoded: Sequence[list[int]], settings: Settings) -> None:
    """Untimed decoding first: allocator, kernels and caches settle."""
    for tokens in encoded[: settings.warmup]:
        who.runner.generate(tokens, min(settings.max_new_tokens, 16), settings.sampling, settings.seed)


def measure_baseline(pair: Pair, prompts: Sequence[Prompt], settings: Settings) -> Baseline:
    """AR alone, `repeats` times (a sweep worker measures this once and reuses it for every trial)."""
    encoded = encode_prompts(pair, prompts, settings.max_new_tokens)
    ar = contender(pair, DecodeConfig(method="ar"))
    warm_up(pair, ar, encoded, settings)
    return Baseline([timed_pass(pair, ar.runner, encoded, settings) for _ in range(settings.repeats)], encoded)


def measure(
    pair: Pair, who: Contender, baseline: Baseline, prompts: Sequence[Prompt], settings: Settings
) -> dict[str, Any]:
    """One contender against a stored baseline: the result row `spectune bench --json` prints."""
    warm_up(pair, who, baseline.encoded, settings)
    runs = [timed_pass(pair, who.runner, baseline.encoded, settings) for _ in range(settings.repeats)]
    return summarise(who, runs, baseline.passes, baseline.reference, prompts, settings, pair)


def run_bench(
    pair: Pair,
    contenders: Sequence[Contender],
    prompts: Sequence[Prompt],
    settings: Settings,
    on_prompt: Callable[[int, int], None] = lambda repeat, prompt: None,
) -> list[dict[str, Any]]:
    """AR and every contender, interleaved prompt by prompt within each repeat.

    Each prompt is decoded by AR and then by every contender back to back, so the machine's
    speed drifting over minutes (shared or virtual CPUs do) hits AR and each contender alike,
    however many contenders there are.
    """
    encoded = encode_prompts(pair, prompts, settings.max_new_tokens)
    ar = contender(pair, DecodeConfig(method="ar"))
    everyone = [ar, *[c for c in contenders if c.label != "ar"]]
    for each in everyone:
        warm_up(pair, each, encoded, settings)
    passes: dict[str, list[Pass]] = {c.label: [] for c in everyone}
    for repeat in range(settings.repeats):
        parts: dict[str, list[Pass]] = {c.label: [] for c in everyone}
        for i, tokens in enumerate(encoded):
            for each in everyone:
                parts[each.label].append(timed_prompt(pair, each.runner, tokens, i, settings))
            on_prompt(repeat, i)
        for each in everyone:
            passes[each.label].append(joined(parts[each.label]))
    reference = passes["ar"][0].generations
    return [summarise(c, passes[c.label], passes["ar"], reference, prompts, settings, pair) for c in everyone]


def summarise(
    who: Contender,
    runs: list[Pass],
    ar_runs: list[Pass],
    reference: list[Generation],
    prompts: Sequence[Prompt],
    settings: Settings,
    pair: Pair,
) -> dict[str, Any]:
    speedups = [run.tokens_per_s / ar.tokens_per_s for run, ar in zip(runs, ar_runs)]  # same-repeat ratios
    first = runs[0]
    matches = [g.tokens == r.tokens for g, r in zip(first.generations, reference)]
    greedy = settings.sampling.greedy
    wall = statistics.median(r.wall_s for r in runs)
    counts = step_metrics(first.generations)
    if not counts["target_calls"]:  # a peer: count its verification forwards from the hooks
        counts["target_calls"] = first.target_forwards - len(prompts)
        counts["mean_accepted_tokens"] = counts["new_tokens"] / max(counts["target_calls"], 1)
    return {
        "method": who.method,
        "label": who.label,
        "config": who.config,
        "n_prompts": len(prompts),
        **counts,
        "wall_s": wall,
        "wall_s_std": _std([r.wall_s for r in runs]),
        "tokens_per_s": statistics.median(r.tokens_per_s for r in runs),
        "ar_tokens_per_s": statistics.median(r.tokens_per_s for r in ar_runs),
        "speedup": statistics.median(speedups),
        "speedup_std": _std(speedups),
        "speedups": speedups,
        "lossless": all(matches) if greedy else None,
        "lossy_method": who.lossy_method,
        "mismatches": matches.count(False) if greedy else None,
        "draft_share": statistics.median(r.draft_s / r.wall_s for r in runs),
        "engine_overhead_share": statistics.median((r.wall_s - r.target_s - r.draft_s) / r.wall_s for r in runs),
        "ms_per_token": 1000.0 / statistics.median(r.tokens_per_s for r in runs),
        "peak_mem_mb": peak_memory_mb(pair.target.device),
        "acceptance_by_exit_layer": exit_layer_acceptance(who.runner),
        "exit_choices": exit_choices(who.runner),
        "temperature": settings.temperature,
        "max_new_tokens": settings.max_new_tokens,
        "per_prompt": [_per_prompt(p, g, s, m if greedy else None) for p, g, s, m in zip(prompts, first.generations, first.seconds, matches)],
    }


def exit_layer_acceptance(runner: Runner) -> dict[str, float] | None:
    """Self-speculative drafters (layerskip, del) report per-token acceptance per exit layer; others None.

    A drafter opts in with an `exit_layer_acceptance() -> {layer: rate}` method; keys become
    strings so the row survives JSON and the store unchanged.
    """
    report = getattr(getattr(runner, "drafter", None), "exit_layer_acceptance", None)
    if report is None:
        return None
    return {str(layer): rate for layer, rate in sorted(report().items())} or None


def exit_choices(runner: Runner) -> dict[str, int] | None:
    """How often a dynamic-exit drafter (del) picked each (exit layer, draft length), as {"l,d": rounds}; else None."""
    report = getattr(getattr(runner, "drafter", None), "exit_choices", None)
    if report is None:
        return None
    return {f"{layer},{length}": rounds for (layer, length), rounds in sorted(report().items())} or None


def _per_prompt(prompt: Prompt, generation: Generation, seconds: float, matches_ar: bool | None) -> dict[str, Any]:
    calls = generation.target_calls
    return {
        "prompt_id": prompt.id,
        "category": prompt.category,
        "new_tokens": len(generation.tokens),
        "target_calls": calls,
        "mean_accepted_tokens": len(generation.tokens) / calls if calls else None,
        "wall_s": seconds,
        "matches_ar": matches_ar,
    }


def _std(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0
