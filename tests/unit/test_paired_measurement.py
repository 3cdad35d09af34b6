"""Paired measurement: every trial times AR and its configuration prompt by prompt, checks every
repeat's greedy outputs, and reports a bootstrap interval of its speedup; the front marks points
whose difference is within that noise."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import pandas as pd
import pytest

from spectune.bench import Contender, Pass, contender, measure, speedup_interval
from spectune.config import DecodeConfig, Settings
from spectune.engine.loop import Generation
from spectune.methods import METHODS
from spectune.pair import load_pair
from spectune.pair_ref import PairRef
from spectune.pareto import pareto_front, within_noise
from spectune.prompts import load_prompts


def one_pass(tokens: list[int], seconds: list[float]) -> Pass:
    return Pass([Generation((1,), [0] * n) for n in tokens], seconds, 0.0, 0.0, 0)


def test_the_interval_holds_the_speedup_and_narrows_when_prompts_agree() -> None:
    ar = [one_pass([10] * 6, [1.0] * 6)]
    steady = [one_pass([10] * 6, [0.5] * 6)]  # 2x on every prompt: no spread to resample
    assert speedup_interval(steady, ar) == pytest.approx((2.0, 2.0))
    spread = [one_pass([10] * 6, [0.4, 0.6, 0.3, 0.7, 0.5, 0.5])]
    low, high = speedup_interval(spread, ar)
    assert low < 2.0 < high and high - low > 0.2
    assert speedup_interval(spread, ar) == (low, high)  # seeded: reproducible from the timings
    assert speedup_interval([one_pass([10], [0.5])], [one_pass([10], [1.0])]) == (None, None)


def test_within_noise_marks_overlaps_with_a_front_point_no_more_costly() -> None:
    df = pd.DataFrame({
        "speedup": [1.10, 1.50, 1.52, 1.45, 1.20],
        "speedup_ci_low": [1.05, 1.40, 1.45, 1.41, 1.17],
        "speedup_ci_high": [1.15, 1.60, 1.60, 1.49, 1.25],
        "cost": [1.0, 2.0, 4.0, 3.0, 5.0],
    })
    front = pareto_front(df, {"speedup": "max", "cost": "min"})
    assert front.tolist() == [True, True, True, False, False]
    marked = within_noise(df, front, "cost")
    # 1: its interval is clear of the cheaper front point 0; 2: its gain over 1 is noise;
    # 3: dominated by 1 but their intervals overlap; 4: dominated and clear of every front point
    assert marked.tolist() == [False, False, True, True, False]
    assert not within_noise(df.drop(columns=["speedup_ci_low"]), front, "cost").any()


@dataclass
class Flaky:
    """A peer whose output changes from the second repeat on (what a stateful bug would do)."""

    inner: object
    calls: int = 0
    n_prompts: int = 2

    def generate(self, prompt, max_new_tokens, sampling, seed):
        generation = self.inner.generate(prompt, max_new_tokens, sampling, seed)
        self.calls += 1
        if self.calls > self.n_prompts:  # warm-up is off: calls beyond the first pass are repeat 2
            generation.tokens[-1] = (generation.tokens[-1] + 1) % 50
        return generation


@pytest.fixture(scope="module")
def pair(micro_pair):
    return load_pair(PairRef(target=str(micro_pair / "target"), drafter=str(micro_pair / "drafter")))


def test_measure_pairs_ar_with_the_configuration_and_checks_every_repeat(pair) -> None:
    prompts = load_prompts("default", 2)
    settings = Settings(max_new_tokens=12, repeats=2, warmup=0)
    sps = contender(pair, METHODS.config("sps", {"draft_len": 3}))
    result = measure(pair, sps, prompts, settings)
    assert result.lossless is True and result.lossless_status == "exact" and result.mismatches == 0
    assert len(result.speedups) == 2
    assert result.speedup_ci_low <= result.speedup <= result.speedup_ci_high or math.isclose(
        result.speedup_ci_low, result.speedup_ci_high)

    flaky = Contender(METHODS.config("sps", {"draft_len": 3}), Flaky(sps.runner))
    checked = measure(pair, flaky, prompts, settings)
    assert checked.lossless is False and checked.mismatches == 2  # only repeat 2 differs, and it is caught
    assert [p.matches_ar for p in checked.per_prompt] == [False, False]


def test_sampling_rows_are_unchecked(pair) -> None:
    settings = Settings(max_new_tokens=6, repeats=1, warmup=0)
    result = measure(pair, contender(pair, METHODS.config("pld", {}, 0.8)), load_prompts("default", 2), settings)
    assert result.lossless is None and result.lossless_status == "unchecked"


def test_the_interval_over_repeats_brackets_the_median_and_is_reproducible():
    from spectune.intervals import repeat_interval

    assert repeat_interval([1.2]) == (None, None)  # one repeat knows no spread
    ratios = [0.9, 1.1, 1.3, 1.0]
    low, high = repeat_interval(ratios)
    assert min(ratios) <= low <= statistics.median(ratios) <= high <= max(ratios)
    assert repeat_interval(ratios) == (low, high)  # seeded


def test_a_run_decodes_at_its_configurations_one_temperature():
    """The temperature lives in the configuration: AR, every speedup's baseline, decodes at the contenders' one."""
    from spectune.bench import one_temperature

    def at(temperature: float) -> Contender:
        return Contender(DecodeConfig("pld", temperature=temperature), runner=None)  # type: ignore[arg-type]

    assert one_temperature([at(0.7), at(0.7)]) == 0.7 and one_temperature([]) == 0.0
    with pytest.raises(ValueError, match=r"one run decodes at one temperature .* got \[0.0, 0.7\]"):
        one_temperature([at(0.0), at(0.7)])
