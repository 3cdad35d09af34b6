"""Filtering and tabulating the trials frame: pure functions, shared by every view.

A `TrialFilter` is what the filter widgets hold; `apply_filter` narrows the store's trials
frame with it, and the figures and the table are drawn from what is left.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from spectune.dashboard.figures import (
    NUMERIC_KNOBS, Axis, ci_text, config_label, front_of, lossless_text, plottable,
)
from spectune.pareto import lossy_rows


@dataclass(frozen=True)
class TrialFilter:
    """Empty ``methods``/``statuses`` mean all of them (so a method that appears while a
    sweep runs is shown). A knob range keeps only trials that have that knob, in range."""

    methods: tuple[str, ...] = ()
    statuses: tuple[str, ...] = ()
    lossless_only: bool = False
    include_unchecked: bool = False  # sampling trials (lossless by rule, unchecked) count as lossless
    knob_ranges: tuple[tuple[str, float, float], ...] = ()


def apply_filter(df: pd.DataFrame, f: TrialFilter) -> pd.DataFrame:
    keep = pd.Series(True, index=df.index)
    if f.methods:
        keep &= df["method"].astype("string").isin(f.methods).fillna(False).astype(bool)
    if f.statuses:
        keep &= df["status"].isin(f.statuses)
    if f.lossless_only:
        keep &= ~lossy_rows(df, f.include_unchecked)
    for knob, low, high in f.knob_ranges:
        values = pd.to_numeric(df[knob], errors="coerce").astype(float)
        keep &= values.between(low, high).fillna(False).astype(bool)
    return df[keep.to_numpy()]


def knob_bounds(df: pd.DataFrame) -> dict[str, tuple[float, float]]:
    """(min, max) of each numeric knob that takes at least two values (a range to filter)."""
    bounds = {}
    for knob in NUMERIC_KNOBS:
        values = pd.to_numeric(df[knob], errors="coerce").dropna().astype(float)
        if values.nunique() >= 2:
            bounds[knob] = (float(values.min()), float(values.max()))
    return bounds


TABLE_COLUMNS = {  # display order: what users compare first, then the cost details
    "trial_id": "trial", "label": "configuration", "status": "status", "speedup": "speedup",
    "speedup_ci": "speedup 95% CI",
    "mean_accepted_tokens": "tau", "acceptance_rate": "acceptance", "lossless_text": "lossless",
    "on_front": "on front", "tree_tokens_per_step": "tree tok/step",
    "draft_calls_per_step": "draft passes/step", "draft_share": "draft share",
    "ms_per_token": "ms/token", "tokens_per_s": "tok/s", "method": "method", "served": "served",
    "error": "error", "hardware": "hardware", "node": "node",
}
SORTABLE = ("speedup", "mean_accepted_tokens", "acceptance_rate", "tree_tokens_per_step",
            "draft_calls_per_step", "draft_share", "ms_per_token", "tokens_per_s", "trial_id")


def trial_table(df: pd.DataFrame, x: str, y: str, sort_by: str = "speedup",
                descending: bool = True, include_unchecked: bool = False) -> pd.DataFrame:
    """One display row per trial: label, status, the metrics users compare, lossless,
    front membership on (x, y), served, error. Sorted by ``sort_by`` (missing last)."""
    table = df.copy()
    table["label"] = [config_label(c, m, e) for c, m, e in
                      zip(table["config"], table["method"], table["extra"])]
    table["lossless_text"] = [lossless_text(row) if row["status"] == "done" else ""
                              for _, row in table.iterrows()]
    table["speedup_ci"] = [ci_text(row) for _, row in table.iterrows()]
    table["on_front"] = False
    points = plottable(table, x, y)
    if len(points):
        table.loc[points.index, "on_front"] = front_of(points, x, y, include_unchecked)
    table = table.sort_values(sort_by, ascending=not descending, na_position="last", kind="stable")
    return table[list(TABLE_COLUMNS)].rename(columns=TABLE_COLUMNS).reset_index(drop=True)


def axis_choices(df: pd.DataFrame, axes: dict[str, Axis]) -> list[str]:
    """The axis columns with at least one value among done trials (others would be empty)."""
    done = df[df["status"] == "done"]
    present = [c for c in axes if pd.to_numeric(done[c], errors="coerce").notna().any()]
    return present or list(axes)


__all__ = ["SORTABLE", "TABLE_COLUMNS", "TrialFilter", "apply_filter", "axis_choices",
           "knob_bounds", "trial_table"]
