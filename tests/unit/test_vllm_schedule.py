"""A vLLM load sweep's schedule (`spectune.backends.vllm_schedule`), derived without a server: bands cover
1..max_num_seqs without gaps, k follows the fastest certified k that surely pays at each load, k = 0 where
none does, one family only; bad sweeps and bad schedules are one-line errors."""

from __future__ import annotations

import pandas as pd
import pytest

from spectune.backends import BACKENDS
from spectune.backends.vllm import check_bands
from spectune.backends.vllm_schedule import Band, ScheduleError, band_edges, derive, merge_bands


def trial(trial_id: int, method: str, concurrency: int, speedup: float, k: int | None = None, low: float | None = None,
          status: str = "exact", **knobs) -> dict:
    config = BACKENDS.get("vllm").config(method, {**({"num_speculative_tokens": k} if k else {}), **knobs},
                                         0.0, concurrency)
    return {"trial_id": trial_id, "sweep": "load", "status": "done", "backend": "vllm", "method": method,
            "config": config.as_dict(), "concurrency": concurrency, "speedup": speedup,
            "speedup_ci_low": low, "lossless_status": status}


def frame(*rows: dict) -> pd.DataFrame:
    return pd.DataFrame(list(rows))


def test_bands_cover_every_batch_size_once_split_at_geometric_means() -> None:
    assert band_edges([1, 4, 16], 128) == [(1, 2), (3, 8), (9, 128)]
    assert band_edges([16, 1, 4, 4], 16) == [(1, 2), (3, 8), (9, 16)]  # sorted, repeats ignored
    assert band_edges([1, 2], 2) == [(1, 1), (2, 2)]
    for loads, top in (([1, 2, 3, 5, 8, 13], 64), ([1, 64], 64), ([2, 3], 7)):
        edges = band_edges(loads, top)
        check_bands([[first, last, 1] for first, last in edges], 1, top)  # no gap, no overlap, ends at top
        assert all(first <= load <= last for (first, last), load in zip(edges, sorted(set(loads))))


def test_fewer_than_two_loads_or_loads_beyond_the_batch_are_refused() -> None:
    with pytest.raises(ScheduleError, match=r"two loads at least; it has \[4\]"):
        band_edges([4, 4], 16)
    with pytest.raises(ScheduleError, match=r"within 1..max_num_seqs \(8\)"):
        band_edges([1, 16], 8)


def test_neighbouring_bands_with_one_k_merge() -> None:
    bands = [Band(1, 2, 5, (1,), 1.3), Band(3, 8, 5, (4,), 1.1), Band(9, 16, 0, (16,), 1.0)]
    assert merge_bands(bands) == (Band(1, 8, 5, (1, 4), 1.1), Band(9, 16, 0, (16,), 1.0))


def test_the_schedule_takes_the_fastest_sure_k_per_load_and_none_where_none_pays() -> None:
    rows = frame(
        trial(1, "ar", 1, 1.0), trial(2, "ar", 4, 1.0), trial(3, "ar", 16, 1.0),
        trial(4, "ngram", 1, 1.40, 5, 1.30, prompt_lookup_max=4), trial(5, "ngram", 1, 1.20, 2, 1.10, prompt_lookup_max=4),
        trial(6, "ngram", 4, 1.25, 5, 0.98, prompt_lookup_max=4),  # faster, but its interval reaches below 1
        trial(7, "ngram", 4, 1.10, 2, 1.04, prompt_lookup_max=4),
        trial(8, "ngram", 16, 0.80, 5, 0.70, prompt_lookup_max=4), trial(9, "ngram", 16, 0.95, 2, 0.90, prompt_lookup_max=4),
    )
    chosen = derive(rows, "load", max_num_seqs=64)
    assert chosen.per_batch_size() == [[1, 2, 5], [3, 8, 2], [9, 64, 0]]
    assert chosen.speculative_config() == {"method": "ngram", "prompt_lookup_max": 4, "num_speculative_tokens": 5,
                                           "num_speculative_tokens_per_batch_size": [[1, 2, 5], [3, 8, 2], [9, 64, 0]]}
    assert chosen.trials == (4, 7)
    knobs = BACKENDS.get("vllm").config("ngram", chosen.served_knobs()).knobs  # the vLLM backend takes it as knobs
    assert knobs["num_speculative_tokens_per_batch_size"] == [[1, 2, 5], [3, 8, 2], [9, 64, 0]]


def test_one_family_per_schedule_the_fastest_over_the_loads() -> None:
    rows = frame(
        trial(1, "ngram", 1, 1.30, 3, 1.2, prompt_lookup_max=3), trial(2, "ngram", 4, 1.02, 3, 1.01, prompt_lookup_max=3),
        trial(3, "ngram", 1, 1.25, 3, 1.2, prompt_lookup_max=4), trial(4, "ngram", 4, 1.20, 3, 1.1, prompt_lookup_max=4),
    )
    chosen = derive(rows, "load", max_num_seqs=8)
    assert chosen.knobs == {"prompt_lookup_max": 4} and chosen.per_batch_size() == [[1, 8, 3]]
    assert chosen.trials == (3, 4)  # never lookup 3 at c=1 with lookup 4 at c=4: only k varies per band


def test_engine_knobs_bound_the_last_band_and_go_to_the_server() -> None:
    rows = frame(trial(1, "ngram", 1, 1.3, 4, 1.2, max_num_seqs=8), trial(2, "ngram", 8, 0.9, 4, 0.8, max_num_seqs=8))
    chosen = derive(rows, "load")
    assert chosen.max_num_seqs == 8 and chosen.per_batch_size() == [[1, 2, 4], [3, 8, 0]]
    assert "max_num_seqs" not in chosen.speculative_config() and chosen.served_knobs()["max_num_seqs"] == 8


@pytest.mark.parametrize(("rows", "message"), [
    ((trial(1, "ngram", 1, 1.3, 4, 1.2),), r"measured at 1 load\(s\) \[1\]: a schedule needs two at least"),
    ((trial(1, "ngram", 1, 1.3, 4, 1.2, status="unchecked"), trial(2, "ngram", 4, 1.3, 4, 1.2, status="unchecked")),
     r"none of sweep 'load'.s trials is certified \(trial 1 is unchecked\)"),
    ((trial(1, "ar", 1, 1.0), trial(2, "ar", 4, 1.0)), r"no finished vLLM trial that speculates"),
    ((trial(1, "ngram", 1, 0.9, 4, 0.8), trial(2, "ngram", 4, 0.8, 4, 0.7)),
     r"no speculative configuration.s speedup lies surely above 1 at any load \[1, 4\]: serve it without speculation"),
])
def test_sweeps_that_cannot_give_a_schedule_say_why_in_one_line(rows, message) -> None:
    with pytest.raises(ScheduleError, match=message) as raised:
        derive(frame(*rows), "load")
    assert "\n" not in str(raised.value)


def test_a_method_the_sweep_lacks_is_named() -> None:
    rows = frame(trial(1, "ngram", 1, 1.3, 4, 1.2), trial(2, "ngram", 4, 1.3, 4, 1.2))
    with pytest.raises(ScheduleError, match="no finished draft_model trial"):
        derive(rows, "load", method="draft_model")


@pytest.mark.parametrize(("bands", "message"), [
    ([[1, 4, 3], [4, 8, 0]], r"\(4, 8, 0\) overlaps the band ending at 4"),
    ([[1, 4, 3], [6, 8, 0]], r"batch sizes 5..5 fall in no band"),
    ([[2, 8, 3]], r"the first band must start at batch size 1"),
    ([[1, 8, 9]], r"k = 9 is above num_speculative_tokens \(5\)"),
    ([[1, 4, 3]], r"the bands end at 4, not at max_num_seqs \(8\)"),
    ([], r"must not be empty"),
])
def test_malformed_bands_are_refused_naming_the_band(bands, message) -> None:
    with pytest.raises(ValueError, match=message):
        check_bands(bands, 5, 8)


def test_the_vllm_knobs_refuse_a_gapped_schedule_before_a_server_starts() -> None:
    with pytest.raises(ValueError, match=r"batch sizes 3..3 fall in no band"):
        BACKENDS.get("vllm").config("ngram", {"num_speculative_tokens": 4,
                                              "num_speculative_tokens_per_batch_size": [[1, 2, 4], [4, 8, 0]]})


def test_the_dashboards_load_curve_shades_the_schedules_bands() -> None:
    from spectune.dashboard.load_view import schedule_of, speedup_vs_concurrency_figure

    rows = frame(trial(1, "ar", 1, 1.0), trial(2, "ar", 16, 1.0),
                 trial(3, "ngram", 1, 1.4, 4, 1.3), trial(4, "ngram", 16, 0.8, 4, 0.7))
    schedule, why_not = schedule_of(rows, "load")
    assert why_not == "" and schedule.per_batch_size() == [[1, 4, 4], [5, 128, 0]]
    figure = speedup_vs_concurrency_figure(rows, schedule)
    shaded = [s for s in figure.layout.shapes if s.type == "rect"]
    assert [(round(s.x0, 2), round(s.x1, 2)) for s in shaded] == [(0.5, 4.5), (4.5, 32.5)]
    labels = {a.text for a in figure.layout.annotations}
    assert {"k=4", "no speculation"} <= labels
    none, why = schedule_of(frame(trial(1, "ngram", 1, 1.4, 4, 1.3)), "load")
    assert none is None and "a schedule needs two at least" in why
