"""Pareto fronts: against a brute-force reference, lossless exclusion, NaN handling."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spectune.pareto import front_step_line, pareto_front, pareto_mask


def brute_force(values: list[list[float]], maximize: list[bool]) -> list[bool]:
    """O(n²) definition: i is on the front unless some j is no worse everywhere and better once."""
    def key(row: list[float]) -> list[float]:
        return [-v if mx else v for v, mx in zip(row, maximize)]

    rows = [key(r) for r in values]
    out = []
    for i, a in enumerate(rows):
        if any(math.isnan(v) for v in a):
            out.append(False)
            continue
        dominated = any(
            not any(math.isnan(v) for v in b)
            and all(bv <= av for av, bv in zip(a, b)) and any(bv < av for av, bv in zip(a, b))
            for j, b in enumerate(rows) if j != i)
        out.append(not dominated)
    return out


# Few distinct values so that ties and duplicate rows are common; NaN sometimes.
cell = st.one_of(st.integers(-3, 3).map(float), st.just(math.nan), st.just(math.inf))


@st.composite
def problems(draw: st.DrawFn) -> tuple[list[list[float]], list[bool]]:
    m = draw(st.integers(1, 4))
    n = draw(st.integers(0, 30))
    rows = draw(st.lists(st.lists(cell, min_size=m, max_size=m), min_size=n, max_size=n))
    maximize = draw(st.lists(st.booleans(), min_size=m, max_size=m))
    return rows, maximize


@settings(max_examples=300, deadline=None)
@given(problems())
def test_mask_matches_brute_force(problem: tuple[list[list[float]], list[bool]]) -> None:
    rows, maximize = problem
    values = np.array(rows, dtype=float).reshape(len(rows), len(maximize))
    assert pareto_mask(values, maximize).tolist() == brute_force(rows, maximize)


@settings(max_examples=50, deadline=None)
@given(problems())
def test_mask_blocks_give_same_answer(problem: tuple[list[list[float]], list[bool]],
                                      ) -> None:
    import spectune.pareto as pareto

    rows, maximize = problem
    values = np.array(rows, dtype=float).reshape(len(rows), len(maximize))
    whole = pareto_mask(values, maximize)
    old = pareto._BLOCK_CELLS
    pareto._BLOCK_CELLS = 1  # one row per block
    try:
        assert pareto_mask(values, maximize).tolist() == whole.tolist()
    finally:
        pareto._BLOCK_CELLS = old


def test_duplicates_and_ties_are_all_on_front() -> None:
    values = np.array([[1.0, 2.0], [1.0, 2.0], [2.0, 1.0], [0.5, 0.5]])
    assert pareto_mask(values, [True, True]).tolist() == [True, True, True, False]


def test_nan_rows_never_on_front_and_dominate_nothing() -> None:
    values = np.array([[np.nan, 100.0], [1.0, 1.0], [0.0, 2.0]])
    assert pareto_mask(values, [True, True]).tolist() == [False, True, True]
    assert pareto_mask(np.full((3, 2), np.nan), [True, False]).tolist() == [False] * 3


def test_empty_and_shape_errors() -> None:
    assert pareto_mask(np.empty((0, 2)), [True, False]).tolist() == []
    with pytest.raises(ValueError):
        pareto_mask(np.zeros((3, 2)), [True])


def _trials() -> pd.DataFrame:
    return pd.DataFrame({
        "trial_id": [1, 2, 3, 4, 5, 6],
        "speedup": [1.5, 2.0, 1.2, 3.0, 3.5, np.nan],
        "tree_tokens_per_step": [4.0, 8.0, 2.0, 4.0, 16.0, 1.0],
        "lossless": pd.array([True, True, None, False, True, True], dtype="boolean"),
        "lossy_method": pd.array([False, False, False, False, True, False], dtype="boolean"),
    }, index=[10, 11, 12, 13, 14, 15])


OBJ = {"speedup": "max", "tree_tokens_per_step": "min"}


def test_front_excludes_lossy_rows_and_keeps_index() -> None:
    df = _trials()
    front = pareto_front(df, OBJ)
    assert list(front.index) == list(df.index)
    # 4 (lossless False) and 5 (lossy method) would dominate but are out; 3 (unchecked) too,
    # unless asked for explicitly: an unchecked result never counts as lossless by default
    assert df.loc[front, "trial_id"].tolist() == [1, 2]
    with_unchecked = pareto_front(df, OBJ, include_unchecked=True)
    assert df.loc[with_unchecked, "trial_id"].tolist() == [1, 2, 3]
    everything = pareto_front(df, OBJ, lossless_only=False)
    assert df.loc[everything, "trial_id"].tolist() == [3, 4, 5]


def test_front_with_object_columns_and_missing_flags() -> None:
    df = _trials().drop(columns=["lossy_method"])
    df["lossless"] = [True, True, None, False, True, True]  # plain object column
    assert df.loc[pareto_front(df, OBJ), "trial_id"].tolist() == [1, 2, 5]
    assert df.loc[pareto_front(df, OBJ, include_unchecked=True), "trial_id"].tolist() == [1, 2, 3, 5]
    plain = _trials()[["trial_id", "speedup", "tree_tokens_per_step"]]
    assert plain.loc[pareto_front(plain, OBJ), "trial_id"].tolist() == [3, 4, 5]


def test_front_rejects_bad_objectives() -> None:
    with pytest.raises(KeyError, match="nope"):
        pareto_front(_trials(), {"nope": "max"})
    with pytest.raises(ValueError, match="'max' or 'min'"):
        pareto_front(_trials(), {"speedup": "up"})


def test_front_step_line_sorted_points() -> None:
    xs, ys = front_step_line(_trials(), "tree_tokens_per_step", "speedup", "min", "max", include_unchecked=True)
    assert xs == [2.0, 4.0, 8.0] and ys == [1.2, 1.5, 2.0]
    df = pd.DataFrame({"a": [1.0, 1.0, 2.0, 0.0], "b": [1.0, 1.0, 0.0, 0.0]})
    assert front_step_line(df, "a", "b", "max", "max") == ([1.0, 2.0], [1.0, 0.0])


def test_a_certificate_verdict_outside_certified_is_lossy_and_unfinished_rows_are_not_unchecked() -> None:
    from spectune.pareto import lossy_rows, unchecked_rows

    df = pd.DataFrame({
        "status": ["done", "done", "done", "running", "done"],
        "lossless": pd.array([True, True, None, None, None], dtype="boolean"),
        "lossless_status": ["exact", "within_tolerance", "unchecked", None, "unchecked"],
        "lossy_method": [False, False, False, False, True],
    })
    assert unchecked_rows(df).tolist() == [False, False, True, False, False]
    assert lossy_rows(df).tolist() == [False, False, True, False, True]
    assert lossy_rows(df, include_unchecked=True).tolist() == [False, False, False, False, True]
    df.loc[1, "lossless_status"] = "lossy"  # a True flag with a failed certificate never counts
    assert lossy_rows(df).tolist()[1] is True
