"""Pareto fronts over trial metrics (acceptance/speed versus cost).

A row is on the front when no other eligible row is at least as good in every
objective and strictly better in one. Duplicates of a front point are all on the
front; rows with a missing (NaN) objective are never on it and dominate nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from spectune.lossless import counts_mask, judged_mask, unchecked_mask

_MODES = ("max", "min")
_BLOCK_CELLS = 1 << 22  # comparisons per numpy block (bounds memory)


def pareto_mask(values: np.ndarray, maximize: Sequence[bool]) -> np.ndarray:
    """Non-dominated rows of ``values`` [n, m]; ``maximize[j]`` says the direction of column j."""
    v = np.asarray(values, dtype=float)
    if v.ndim != 2 or v.shape[1] != len(maximize):
        raise ValueError(f"values must be [n, {len(maximize)}], got shape {v.shape}")
    v = np.where(np.asarray(maximize, dtype=bool), -v, v)  # now every column is minimised
    valid = ~np.isnan(v).any(axis=1)
    cand = v[valid]
    dominated = np.zeros(len(cand), dtype=bool)
    block = max(1, _BLOCK_CELLS // max(1, len(cand) * max(1, v.shape[1])))
    for start in range(0, len(cand), block):
        rows = cand[start:start + block, None, :]  # [b, 1, m] against all [1, n, m]
        no_worse = (cand[None, :, :] <= rows).all(axis=2)
        better = (cand[None, :, :] < rows).any(axis=2)
        dominated[start:start + block] = (no_worse & better).any(axis=1)
    mask = np.zeros(len(v), dtype=bool)
    mask[np.flatnonzero(valid)] = ~dominated
    return mask


def _check_objectives(df: pd.DataFrame, objectives: Mapping[str, str]) -> None:
    if not objectives:
        raise ValueError("at least one objective is needed")
    for col, mode in objectives.items():
        if mode not in _MODES:
            raise ValueError(f"objective {col!r}: mode must be 'max' or 'min', got {mode!r}")
        if col not in df.columns:
            raise KeyError(f"objective {col!r} is not a column (have: {', '.join(map(str, df.columns))})")


def unchecked_rows(df: pd.DataFrame) -> pd.Series:
    """Finished rows of a lossless method whose outputs were never checked (sampling trials, lossless
    by the method's rule but not certified); rows that have not finished have no results yet
    (the rule: `spectune.lossless`)."""
    return unchecked_mask(df)


def lossy_rows(df: pd.DataFrame, include_unchecked: bool = False) -> pd.Series:
    """Finished rows (and lossy methods) that do not count as lossless (`spectune.lossless.counts_mask`):
    outputs that differed, a failed certificate, a lossy method and, unless ``include_unchecked``,
    unchecked rows: an unchecked result never counts as lossless by default."""
    return judged_mask(df) & ~counts_mask(df, include_unchecked)


def pareto_front(df: pd.DataFrame, objectives: Mapping[str, str],
                 lossless_only: bool = True, include_unchecked: bool = False) -> pd.Series:
    """Boolean Series (index of ``df``): the rows on the front of ``objectives``
    (``{"speedup": "max", "tree_tokens_per_step": "min"}``). With ``lossless_only``
    rows that do not count as lossless (see `lossy_rows`; unchecked sampling rows only with
    ``include_unchecked``) are neither on the front nor dominate anything."""
    _check_objectives(df, objectives)
    eligible = ~lossy_rows(df, include_unchecked) if lossless_only else pd.Series(True, index=df.index)
    cols = list(objectives)
    values = df.loc[eligible.to_numpy(), cols].apply(pd.to_numeric, errors="coerce")
    mask = pareto_mask(values.to_numpy(dtype=float, na_value=np.nan),
                       [objectives[c] == "max" for c in cols])
    front = pd.Series(False, index=df.index)
    front[eligible.to_numpy()] = mask
    return front


def front_step_line(df: pd.DataFrame, x: str, y: str, x_mode: str = "min", y_mode: str = "max",
                    lossless_only: bool = True, include_unchecked: bool = False) -> tuple[list[float], list[float]]:
    """The 2-D front of (x, y) as points sorted by x (duplicates dropped), for a step line.

    With x minimised and y maximised (cost versus speed) y rises with x: draw it with
    plotly's ``line_shape="hv"``; with both maximised y falls with x: use ``"vh"``.
    """
    on_front = pareto_front(df, {x: x_mode, y: y_mode}, lossless_only=lossless_only,
                            include_unchecked=include_unchecked)
    pts = df.loc[on_front.to_numpy(), [x, y]].apply(pd.to_numeric).astype(float)
    pts = pts.drop_duplicates().sort_values([x, y])
    return pts[x].tolist(), pts[y].tolist()


def within_noise(df: pd.DataFrame, on_front: pd.Series, x: str, low: str = "speedup_ci_low",
                 high: str = "speedup_ci_high", x_mode: str = "min") -> pd.Series:
    """Rows whose difference from a front point at most as costly (in ``x``) is within noise.

    A row is marked when some *other* front row no worse in ``x`` has a confidence interval
    (``low``..``high``, e.g. the speedup's bootstrap interval) overlapping its own: a dominated
    row that may be as good as the front, or a front row whose gain over a cheaper front row
    the measurement cannot tell from noise. Rows without an interval are never marked.
    """
    if x_mode not in _MODES:
        raise ValueError(f"x mode must be 'max' or 'min', got {x_mode!r}")
    marked = pd.Series(False, index=df.index)
    if low not in df.columns or high not in df.columns or not on_front.any():
        return marked
    lo, hi = (pd.to_numeric(df[c], errors="coerce").to_numpy(dtype=float, na_value=np.nan) for c in (low, high))
    cost = pd.to_numeric(df[x], errors="coerce").to_numpy(dtype=float, na_value=np.nan)
    cost = cost if x_mode == "min" else -cost
    front = np.flatnonzero(on_front.reindex(df.index, fill_value=False).to_numpy(dtype=bool))
    for i in range(len(df)):
        others = front[front != i]
        overlaps = (lo[others] <= hi[i]) & (lo[i] <= hi[others]) & (cost[others] <= cost[i])  # NaN compares False
        marked.iloc[i] = bool(overlaps.any())
    return marked


__all__ = ["front_step_line", "lossy_rows", "pareto_front", "pareto_mask", "unchecked_rows", "within_noise"]
