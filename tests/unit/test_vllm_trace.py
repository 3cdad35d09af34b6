"""The mixed-load trace's pure parts: phases, per-phase requests, summaries against no speculation, the verdict."""

import pytest

from spectune.workers.vllm.load import cycled

from spectune.workers.vllm.load import PassRecord, RequestRecord
from spectune.workers.vllm.trace import (
    NO_SPECULATION, TraceRun, judge, outputs_of, parse_phases, summarise,
)


def run(label: str, repeat: int, walls: list[float], tokens: int = 10) -> TraceRun:
    """A contestant's trace whose every phase decoded `tokens` tokens for prompt p0 in `walls[i]` seconds."""
    passes = tuple(PassRecord(1, wall, (RequestRecord("p0", tuple(range(tokens)), 0.1, wall),)) for wall in walls)
    return TraceRun(label, repeat, passes)


def test_phases_parse_and_bad_ones_say_what_is_expected():
    assert parse_phases("1,4,16,4,1") == (1, 4, 16, 4, 1)
    with pytest.raises(ValueError, match="expected concurrencies separated by commas"):
        parse_phases("1;4")
    with pytest.raises(ValueError, match="two phases at least"):
        parse_phases("4")
    with pytest.raises(ValueError, match="concurrency >= 1"):
        parse_phases("0,4")


def test_a_phase_holds_whole_batches_and_every_prompt_rounds_times_at_least():
    prompts = ["a", "b", "c"]
    assert cycled(prompts, 4, 2) == ["a", "b", "c", "a", "b", "c", "a", "b"]
    assert cycled(prompts, 1, 1) == ["a", "b", "c"]
    assert cycled(prompts, 2, 1) == ["a", "b", "c", "a"]


def test_ratios_pair_each_repeat_with_no_speculation_of_the_same_repeat():
    runs = [run("schedule", 0, [1.0, 2.0]), run(NO_SPECULATION, 0, [2.0, 2.0]),
            run(NO_SPECULATION, 1, [1.0, 4.0]), run("schedule", 1, [1.0, 2.0])]
    summary = {s.label: s for s in summarise(runs, (1, 16))}
    assert summary["schedule"].phases[0].vs_no_speculation == (2.0, 1.0)
    assert summary["schedule"].phases[1].vs_no_speculation == (1.0, 2.0)
    assert summary["schedule"].vs_no_speculation == pytest.approx((4 / 3, 5 / 3))  # whole trace: 20 tokens in 3 s vs 4 s, 5 s
    assert summary[NO_SPECULATION].phases[0].tokens_per_s == 7.5  # median of 5 and 10 tokens/s


def test_the_verdict_names_phases_surely_slower_and_the_best_fixed_configuration():
    runs = [run("schedule", r, [1.0, 3.0]) for r in (0, 1)] + [run(NO_SPECULATION, r, [2.0, 2.0]) for r in (0, 1)]
    runs += [run("ngram k=2", r, [1.5, 2.0]) for r in (0, 1)] + [run("ngram k=5", r, [1.0, 4.0]) for r in (0, 1)]
    verdict = judge(summarise(runs, (1, 16)), "schedule", ["ngram k=2", "ngram k=5"])
    assert verdict.slower_phases == (1,)  # at c=16 the schedule took 3 s to no speculation's 2, in both repeats
    assert verdict.best_fixed == "ngram k=2" and verdict.over_best_fixed == pytest.approx((20 / 4) / (20 / 3.5))


def test_outputs_are_gathered_per_prompt_over_every_phase_and_repeat():
    runs = [run("schedule", 0, [1.0, 1.0], tokens=3), run("schedule", 1, [1.0], tokens=2), run(NO_SPECULATION, 0, [1.0])]
    assert outputs_of(runs, "schedule", ["p0"]) == [[(0, 1, 2), (0, 1, 2), (0, 1)]]
