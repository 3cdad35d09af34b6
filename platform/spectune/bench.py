"""`spectune bench`: decoding configurations over a prompt set, timed against AR in the same run.

Within every repeat each prompt is decoded by AR and then by each configuration back to back,
so each speedup is a ratio of times taken seconds apart on the same machine state.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from spectune.certificate import Certificate, certify
from spectune.config import DecodeConfig, Settings
from spectune.engine.budget import ContextOverflow, check_fits
from spectune.engine.drafter import Drafter
from spectune.engine.loop import Decoder, Generation
from spectune.engine.runner import CausalLM
from spectune.engine.sampling import Sampling
from spectune.intervals import BOOTSTRAP_SAMPLES, CI_LEVEL, percentile_interval
from spectune.lossless import decide
from spectune.methods import METHODS
from spectune.metrics import step_metrics
from spectune.pair import Pair
from spectune.profiling import ForwardClock, peak_memory_mb
from spectune.prompts import Prompt
from spectune.results import DecodeResult, PromptStats, RepeatStats, StepCounts
from spectune.validation import one_line


class ConfigEntry(BaseModel):
    """One configuration of a YAML config file: a registered method and its knobs, given inline."""

    model_config = ConfigDict(extra="allow", frozen=True)

    method: str
    name: str | None = None

    @model_validator(mode="after")
    def knobs_valid(self) -> "ConfigEntry":
        self.config()  # raises naming the method and field
        return self

    def config(self) -> DecodeConfig:
        return METHODS.config(self.method, dict(self.model_extra or {}), name=self.name)


class ConfigFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    configs: list[ConfigEntry] = Field(min_length=1)


def load_config_file(path: str) -> list[DecodeConfig]:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
        return [entry.config() for entry in ConfigFile.model_validate(data).configs]
    except FileNotFoundError:
        raise ValueError(f"config file {path} does not exist") from None
    except yaml.YAMLError as err:
        raise ValueError(f"config file {path} is not valid YAML: {err}") from None
    except ValidationError as err:
        problem = one_line(err)
        raise ValueError(f"config file {path}: {problem}") from None


class Runner(Protocol):
    def generate(self, prompt: Sequence[int], max_new_tokens: int, sampling: Sampling, seed: int) -> Generation: ...


@dataclass(frozen=True)
class Contender:
    """Something timed against AR: a spectune configuration (with its drafter) or a peer implementation."""

    config: DecodeConfig
    runner: Runner
    drafter: Drafter | None = None  # None for peers: nothing to report, no draft tree of ours
    lossy_method: bool = False

    @property
    def tree_size(self) -> int:
        return self.drafter.max_tree_size if self.drafter is not None else 0


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
    """A configuration ready to decode on `pair`, at its own temperature."""
    if config.dtype not in (None, pair.ref.dtype):  # a dtype axis loads the pair in each dtype (pair_worker)
        raise ValueError(f"{config.label()} decodes in {config.dtype}, but the pair is loaded in {pair.ref.dtype}")
    models = pair.runners()
    drafter = METHODS.build(config.method, config.knobs, models)
    decoder = Decoder(models.target, drafter, pair.eos_token_id)
    return Contender(config, decoder, drafter, not METHODS.get(config.method).lossless)


def encode_prompts(pair: Pair, prompts: Sequence[Prompt], max_new_tokens: int, tree_size: int = 0) -> list[list[int]]:
    """Token ids of every prompt; each must fit the context with max_new_tokens and the largest draft tree."""
    encoded = []
    for prompt in prompts:
        tokens = pair.encode_prompt(prompt)
        if not tokens:
            raise ValueError(f"prompt {prompt.id!r} encodes to no tokens")
        try:
            check_fits(len(tokens), max_new_tokens, tree_size, pair.max_positions)
        except ContextOverflow as err:
            raise ValueError(f"prompt {prompt.id!r} is {len(tokens)} tokens: {err}") from None
        encoded.append(tokens)
    return encoded


def sampling(config: DecodeConfig, settings: Settings) -> Sampling:
    """The one place a configuration's sampling is made: its temperature, the run's top_p."""
    return Sampling(config.temperature, settings.top_p)


def timed_prompt(pair: Pair, who: Contender, tokens: list[int], index: int, settings: Settings) -> Pass:
    """One prompt decoded once, timed by the wall clock and by forward hooks on the models."""
    target_clock, draft_clock = ForwardClock(), ForwardClock()
    # the drafter model, and what a drafter drafts with besides (the target's exit views: layerskip, del)
    drafting = (pair.drafter, *(who.drafter.draft_modules() if who.drafter is not None else ()))
    with target_clock.attached(pair.target), draft_clock.attached(*drafting):
        started = time.perf_counter()
        generation = who.runner.generate(tokens, settings.max_new_tokens, sampling(who.config, settings),
                                         settings.seed + index)
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


def timed_pass(pair: Pair, who: Contender, encoded: Sequence[list[int]], settings: Settings) -> Pass:
    return joined([timed_prompt(pair, who, tokens, i, settings) for i, tokens in enumerate(encoded)])


def warm_up(who: Contender, encoded: Sequence[list[int]], settings: Settings) -> None:
    """Untimed decoding first: allocator, kernels and caches settle."""
    for tokens in encoded[: settings.warmup]:
        who.runner.generate(tokens, min(settings.max_new_tokens, 16), sampling(who.config, settings), settings.seed)


def ar_contender(pair: Pair, temperature: float) -> Contender:
    return contender(pair, METHODS.config("ar", {}, temperature))


def settle(pair: Pair, prompts: Sequence[Prompt], settings: Settings, temperature: float = 0.0) -> None:
    """One untimed AR pass over every prompt at full length: a fresh process decodes its first pass
    measurably slower (allocator, kernel caches for every new cache length), and in an interleaved
    pass AR would pay for that alone (a sweep worker calls this once per prompt set)."""
    encoded = encode_prompts(pair, prompts, settings.max_new_tokens)
    timed_pass(pair, ar_contender(pair, temperature), encoded, settings.model_copy(update={"warmup": 0}))


def measure(pair: Pair, who: Contender, prompts: Sequence[Prompt], settings: Settings) -> DecodeResult:
    """One contender paired with AR prompt by prompt within each repeat (what a sweep trial runs)."""
    return run_bench(pair, [who], prompts, settings)[-1]  # [AR, who]; just [AR] when who is AR


def run_bench(
    pair: Pair,
    contenders: Sequence[Contender],
    prompts: Sequence[Prompt],
    settings: Settings,
    on_prompt: Callable[[int, int], None] = lambda repeat, prompt: None,
) -> list[DecodeResult]:
    """AR and every contender, interleaved prompt by prompt within each repeat.

    Each prompt is decoded by AR and then by every contender back to back, so the machine's
    speed drifting over minutes (shared or virtual CPUs do) hits AR and each contender alike,
    however many contenders there are.
    """
    everyone = ar_first(pair, contenders)
    encoded = encode_prompts(pair, prompts, settings.max_new_tokens, max(c.tree_size for c in everyone))
    for each in everyone:
        warm_up(each, encoded, settings)
    passes: list[list[Pass]] = [[] for _ in everyone]
    for repeat in range(settings.repeats):
        parts: list[list[Pass]] = [[] for _ in everyone]
        for i, tokens in enumerate(encoded):
            for who, done in zip(everyone, parts):
                done.append(timed_prompt(pair, who, tokens, i, settings))
            on_prompt(repeat, i)
        for who_passes, done in zip(passes, parts):
            who_passes.append(joined(done))
    return [summarise(who, runs, passes[0], prompts, settings, pair) for who, runs in zip(everyone, passes)]


def ar_first(pair: Pair, contenders: Sequence[Contender]) -> list[Contender]:
    """AR at the run's temperature (every speedup's baseline, always measured), then each contender that is not AR."""
    ar = ar_contender(pair, one_temperature(contenders))
    return [ar, *[c for c in contenders if c.config.method != ar.config.method]]


def one_temperature(contenders: Sequence[Contender]) -> float:
    """The temperature a run decodes at (AR, the baseline of every contender, decodes at it too)."""
    temperatures = sorted({c.config.temperature for c in contenders})
    if len(temperatures) > 1:
        raise ValueError(f"one run decodes at one temperature (AR's is every speedup's baseline), got {temperatures}")
    return temperatures[0] if temperatures else 0.0


def repeat_stats(runs: Sequence[Pass], ar_runs: Sequence[Pass]) -> RepeatStats:
    """The speed fields of a contender's passes, paired repeat by repeat with AR's (`RepeatStats`' rule)."""
    return RepeatStats.of([r.wall_s for r in runs], [r.tokens_per_s for r in runs], [r.tokens_per_s for r in ar_runs])


def summarise(who: Contender, runs: list[Pass], ar_runs: list[Pass], prompts: Sequence[Prompt],
              settings: Settings, pair: Pair) -> DecodeResult:
    first, reference = runs[0], ar_runs[0].generations
    greedy = sampling(who.config, settings).greedy
    # every repeat, not just the first: stateful drafters (recycling's hot start, ngram's kept table,
    # del's window) decode later repeats from what earlier ones left behind
    matches = [all(run.generations[i].tokens == r.tokens for run in runs) for i, r in enumerate(reference)]
    ci_low, ci_high = speedup_interval(runs, ar_runs)
    speed = repeat_stats(runs, ar_runs)
    checked = certify_runs(pair, runs, reference, settings) if greedy else None
    status = checked.status if checked else decide(greedy=False, identical=None)  # sampled: unchecked
    return DecodeResult(
        config=who.config,
        n_prompts=len(prompts),
        counts=_counts(first, len(prompts)),
        **speed.fields(),
        speedup_ci_low=ci_low,
        speedup_ci_high=ci_high,
        lossless=status.flag,
        lossless_status=status,
        exact_match_rate=checked.exact_match_rate if checked else None,
        worst_margin=checked.worst_margin if checked else None,
        lossy_method=who.lossy_method,
        mismatches=matches.count(False) if greedy else None,
        draft_share=statistics.median(r.draft_s / r.wall_s for r in runs),
        engine_overhead_share=statistics.median((r.wall_s - r.target_s - r.draft_s) / r.wall_s for r in runs),
        ms_per_token=1000.0 / speed.tokens_per_s,
        peak_mem_mb=peak_memory_mb(pair.target.device),
        acceptance_by_exit_layer=exit_layer_acceptance(who.drafter),
        exit_choices=exit_choices(who.drafter),
        max_new_tokens=settings.max_new_tokens,
        by_category=by_category(prompts, runs, ar_runs),
        per_prompt=tuple(_per_prompt(p, g, s, m if greedy else None)
                         for p, g, s, m in zip(prompts, first.generations, first.seconds, matches)),
        extra=failed_tokens(checked, prompts) if checked and checked.failures else {},
    )


def failed_tokens(checked: Certificate, prompts: Sequence[Prompt]) -> dict[str, list[dict]]:
    """Where a lossy certificate failed (its first token per prompt), so a row says which token to look at."""
    return {"certificate_failures": [
        {"prompt_id": prompts[f.prompt_index].id, "position": f.position, "token": f.token, "argmax": f.argmax,
         "margin": round(f.margin, 6), "tolerance": round(f.tolerance, 6)} for f in checked.failures]}


def speedup_interval(runs: Sequence[Pass], ar_runs: Sequence[Pass], samples: int = BOOTSTRAP_SAMPLES,
                     level: float = CI_LEVEL, seed: int = 0) -> tuple[float | None, float | None]:
    """A bootstrap confidence interval of the speedup over prompts (None, None below two prompts).

    Each resample draws the prompt set with replacement and computes the speedup as the summary
    does: per repeat, tokens/s of the contender over tokens/s of AR on the same prompts, then the
    median over repeats. Seeded, so a row's interval is reproducible from its timings.
    """
    if len(runs[0].seconds) < 2:
        return None, None
    tokens, seconds = _per_prompt_arrays(runs)  # [R, P] each
    ar_tokens, ar_seconds = _per_prompt_arrays(ar_runs)
    picks = np.random.default_rng(seed).integers(0, tokens.shape[1], size=(samples, tokens.shape[1]))  # [B, P]
    rate = tokens[:, picks].sum(axis=2) / seconds[:, picks].sum(axis=2)  # [R, B]
    ar_rate = ar_tokens[:, picks].sum(axis=2) / ar_seconds[:, picks].sum(axis=2)  # [R, B]
    return percentile_interval(np.median(rate / ar_rate, axis=0), level)  # speedups: [B]


def _per_prompt_arrays(runs: Sequence[Pass]) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.array([[len(g.tokens) for g in run.generations] for run in runs], dtype=float)  # [R, P]
    return tokens, np.array([run.seconds for run in runs], dtype=float)


def certify_runs(pair: Pair, runs: Sequence[Pass], reference: Sequence[Generation], settings: Settings) -> Certificate:
    """The greedy certificate over every repeat: exact (identical to AR), within the dtype's tolerance, or lossy."""
    outputs = [[run.generations[i].tokens for run in runs] for i in range(len(reference))]
    return certify(CausalLM(pair.target), [r.prompt for r in reference], outputs, [r.tokens for r in reference],
                   settings.tolerance_ulps)


def by_category(prompts: Sequence[Prompt], runs: Sequence[Pass], ar_runs: Sequence[Pass]) -> dict[str, dict] | None:
    """{category: {n_prompts, speedup, mean_accepted_tokens, acceptance_rate}}, each from that category's prompts
    alone: speedup the median over repeats of its same-repeat tokens/s ratio to AR, counts from the first pass."""
    groups: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(prompt.category, []).append(i)
    if len(groups) < 2:
        return None  # one category: the row itself
    return {category: _category_row(members, runs, ar_runs) for category, members in sorted(groups.items())}


def _category_row(members: list[int], runs: Sequence[Pass], ar_runs: Sequence[Pass]) -> dict:
    def rate(run: Pass) -> float:
        return sum(len(run.generations[i].tokens) for i in members) / sum(run.seconds[i] for i in members)

    counts = step_metrics([runs[0].generations[i] for i in members])
    return {"n_prompts": len(members),
            "speedup": statistics.median(rate(run) / rate(ar) for run, ar in zip(runs, ar_runs)),
            "mean_accepted_tokens": counts.mean_accepted_tokens, "acceptance_rate": counts.acceptance_rate}


def _counts(first: Pass, n_prompts: int) -> StepCounts:
    counts = step_metrics(first.generations)
    if counts.target_calls:
        return counts
    # a peer reports no steps: count its verification forwards from the hooks (prefills excluded)
    target_calls = first.target_forwards - n_prompts
    return StepCounts(new_tokens=counts.new_tokens, target_calls=target_calls,
                      mean_accepted_tokens=counts.new_tokens / max(target_calls, 1))


def exit_layer_acceptance(drafter: Drafter | None) -> dict[str, float] | None:
    """Per-token acceptance per exit layer (layerskip, del); keys as strings so the row survives JSON."""
    report = drafter.exit_layer_acceptance() if drafter is not None else {}
    return {str(layer): rate for layer, rate in sorted(report.items())} or None


def exit_choices(drafter: Drafter | None) -> dict[str, int] | None:
    """How often a dynamic-exit drafter (del) picked each (exit layer, draft length), as {"l,d": rounds}."""
    report = drafter.exit_choices() if drafter is not None else {}
    return {f"{layer},{length}": rounds for (layer, length), rounds in sorted(report.items())} or None


def _per_prompt(prompt: Prompt, generation: Generation, seconds: float, matches_ar: bool | None) -> PromptStats:
    calls = generation.target_calls
    return PromptStats(prompt.id, prompt.category, len(generation.tokens), calls,
                       len(generation.tokens) / calls if calls else None, seconds, matches_ar)


__all__ = ["ConfigEntry", "Contender", "Pass", "Settings", "contender", "encode_prompts", "load_config_file",
           "measure", "repeat_stats", "run_bench", "sampling", "settle", "speedup_interval", "summarise", "timed_pass"]
