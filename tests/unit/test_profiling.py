"""Timing from outside: ForwardClock's counting, the forward-time profile, and bench passes that see every drafting module."""

import pytest
import torch
from torch import nn

from spectune.bench import Settings, contender, timed_pass
from spectune.engine.sampling import Sampling
from spectune.methods import METHODS
from spectune.pair import load_pair
from spectune.pair_ref import PairRef
from spectune.profiling import ForwardClock, profile_forwards


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(self.inner(x))


class Failing(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")


def test_nested_forwards_of_attached_modules_count_once():
    outer = Outer()
    clock = ForwardClock()
    with clock.attached(outer, outer.inner):
        outer(torch.ones(2))
    assert clock.calls == 1 and clock.seconds > 0
    with clock.attached(outer, outer.inner):
        outer.inner(torch.ones(2))  # the inner module alone is an outermost call
    assert clock.calls == 2


def test_a_module_named_twice_or_none_is_hooked_once():
    outer = Outer()
    clock = ForwardClock()
    with clock.attached(outer, None, outer):
        assert len(outer._forward_pre_hooks) == 1
        outer(torch.ones(2))
    assert clock.calls == 1
    assert not outer._forward_pre_hooks and not outer._forward_hooks and not outer.inner._forward_hooks


def test_a_forward_that_raises_does_not_stop_the_clock_counting():
    failing, fine = Failing(2, 2), nn.Linear(2, 2)
    clock = ForwardClock()
    with clock.attached(failing, fine):
        with pytest.raises(RuntimeError):
            failing(torch.ones(2))
        fine(torch.ones(2))
    assert clock.calls == 2


def test_a_forward_profile_times_every_tree_size_and_counts_every_forward(micro_pair):
    pair = load_pair(PairRef.model_validate({"dir": micro_pair}))
    filler = pair.encode("def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n" * 4)
    clock = ForwardClock()
    with clock.attached(pair.target):
        times = profile_forwards(pair.target, filler, past=16, max_tokens=5, repeats=2)
    assert len(times) == 5 and all(t > 0 for t in times)
    # the past, three warm-up calls, then (repeats + 1) forwards per size
    assert clock.calls == 1 + 3 + 5 * 3
    assert 1000 * clock.seconds > sum(times)  # the fastest of each size is a part of all the time spent


def test_only_self_speculative_drafters_name_modules_of_their_own(micro_pair):
    pair = load_pair(PairRef.model_validate({"dir": micro_pair}))
    configs = {"ar": {}, "sps": {}, "layerskip": {}, "del": {"cost": "layers"}}
    expected = {"ar": 0, "sps": 0, "layerskip": 1, "del": 3}  # del: a view per exit layer 1..L-1
    for method, knobs in configs.items():
        modules = contender(pair, METHODS.config(method, knobs)).drafter.draft_modules()
        assert len(modules) == expected[method], method
        assert all(m is not pair.target and m is not pair.drafter for m in modules)


@pytest.mark.parametrize("config", [{"method": "layerskip"}, {"method": "del", "cost": "layers", "max_draft_len": 3}])
def test_self_speculative_draft_time_is_drafting_not_engine_overhead(micro_pair, config):
    pair = load_pair(PairRef.model_validate({"dir": micro_pair}))
    settings = Settings(max_new_tokens=24, repeats=1, warmup=0)
    encoded = [pair.encode(text) for text in ("The capital of France is", "def fibonacci(n):")]
    who = contender(pair, METHODS.config(config["method"], {k: v for k, v in config.items() if k != "method"}))
    timed_pass(pair, who, encoded[:1], settings)  # warm up
    run = timed_pass(pair, who, encoded, settings)
    # the target's clock sees exactly the prefills and verifications: no draft pass through the view
    assert run.target_forwards == len(encoded) + sum(g.target_calls for g in run.generations)
    # before the views were timed, their draft time (~0.35 of the wall here) landed in the overhead; counted,
    # not compared with a share of the wall (which a shared 2-core machine can skew): a clock on the modules
    # bench times as drafting sees one forward per draft call, and their time is a part of the wall
    draft_clock = ForwardClock()
    with draft_clock.attached(pair.drafter, *who.drafter.draft_modules()):
        generation = who.runner.generate(encoded[1], settings.max_new_tokens, Sampling(), 0)
    assert generation.draft_calls > 0 and draft_clock.calls == generation.draft_calls
    assert 0 < run.draft_s and run.target_s + run.draft_s < run.wall_s
