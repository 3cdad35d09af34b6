"""Speculation under load (serving backends such as vLLM): where does speculation stop paying?

Pure figures of the store's trials frame, one trial per (configuration, concurrency) point:

    speedup_vs_concurrency_figure   one line per configuration: speedup at each load (1.0 = no speculation)
    latency_front_figure            throughput vs p95 request latency, a front per load

and `render_load`, the dashboard section that shows them, with the fastest configuration at
each load, when a sweep has such trials. The tables (`spectune.backends.load_table`) are plotly-free, so
`spectune results` prints them without the dashboard.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
import plotly.graph_objects as go

from spectune.backends.load_table import best_per_load, served_rows
from spectune.backends.vllm_schedule import LoadSchedule, ScheduleError, derive
from spectune.pareto import front_step_line

PALETTE = ("#3969AC", "#E68310", "#11A579", "#CF1C90", "#7F3C8D", "#F2B701", "#E73F74",
           "#008695", "#80BA5A", "#F97B72", "#A5AA99")
FONT = {"family": "Inter, 'Source Sans Pro', 'DejaVu Sans', sans-serif", "size": 13}


def speedup_vs_concurrency_figure(df: pd.DataFrame, schedule: LoadSchedule | None = None) -> go.Figure:
    """Speedup against concurrency, one line per configuration (the curve that shows where it stops paying);
    with `schedule`, its batch-size bands shaded behind, each labelled with its k."""
    rows = served_rows(df)
    fig = go.Figure()
    for i, (label, group) in enumerate(rows.groupby("configuration", sort=True)):
        group = group.sort_values("concurrency")
        fig.add_trace(go.Scatter(
            x=group["concurrency"].astype(int).tolist(), y=group["speedup"].astype(float).tolist(),
            mode="lines+markers", name=label, line={"color": PALETTE[i % len(PALETTE)]},
            customdata=group["trial_id"].tolist(),
            hovertemplate=f"{label}<br>concurrency %{{x}}: %{{y:.2f}}x<br>trial %{{customdata}}<extra></extra>",
        ))
    fig.add_hline(y=1.0, line={"dash": "dot", "color": "#999999", "width": 1},
                  annotation_text="no speculation", annotation_position="bottom right")
    fig.update_layout(template="plotly_white", font=FONT, height=420,
                      margin={"l": 10, "r": 10, "t": 30, "b": 10},
                      legend={"orientation": "h", "yanchor": "top", "y": -0.18, "x": 0})
    if schedule is not None:
        _shade_bands(fig, schedule, int(rows["concurrency"].max()))
    fig.update_xaxes(title="requests in flight (concurrency)", type="log", dtick=0.30103,
                     tickvals=sorted(set(rows["concurrency"].dropna().astype(int))) or None)
    fig.update_yaxes(title="speedup over no speculation (x)", tickformat=".2f")
    return fig


def _shade_bands(fig: go.Figure, schedule: LoadSchedule, top_load: int) -> None:
    """The schedule's bands as shaded spans (their edges halfway between batch sizes, on the log axis)."""
    for i, band in enumerate(schedule.bands):
        if band.first > top_load * 2:
            break  # past the measured loads: the last band runs on to max_num_seqs
        low, high = math.log10(max(band.first - 0.5, 0.5)), math.log10(min(band.last, top_load * 2) + 0.5)
        fig.add_vrect(x0=10 ** low, x1=10 ** high, fillcolor=PALETTE[i % len(PALETTE)] if band.k else "#BBBBBB",
                      opacity=0.10, line_width=0, layer="below",
                      annotation_text=f"k={band.k}" if band.k else "no speculation", annotation_position="top left")


def latency_front_figure(df: pd.DataFrame) -> go.Figure:
    """Output tokens/s against p95 request latency; each load its colour and its own front (step line)."""
    rows = served_rows(df).dropna(subset=["tokens_per_s", "p95_latency_s"])
    fig = go.Figure()
    for i, (load, group) in enumerate(rows.groupby("concurrency", sort=True)):
        color = PALETTE[i % len(PALETTE)]
        fig.add_trace(go.Scatter(
            x=group["p95_latency_s"].astype(float).tolist(), y=group["tokens_per_s"].astype(float).tolist(),
            mode="markers", name=f"c={int(load)}", marker={"color": color, "size": 9},
            text=group["configuration"].tolist(), customdata=group["trial_id"].tolist(),
            hovertemplate="%{text}<br>p95 %{x:.2f} s, %{y:.0f} tok/s<br>trial %{customdata}<extra></extra>",
        ))
        xs, ys = front_step_line(group, "p95_latency_s", "tokens_per_s", include_unchecked=True)
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line={"color": color, "shape": "hv", "width": 1.5},
                                 showlegend=False, hoverinfo="skip"))
    fig.update_layout(template="plotly_white", font=FONT, height=420,
                      margin={"l": 10, "r": 10, "t": 30, "b": 10}, legend={"title": {"text": "load"}})
    fig.update_xaxes(title="p95 request latency (s)")
    fig.update_yaxes(title="output tokens/s")
    return fig


def render_load(shown: pd.DataFrame, sweep: str, chart_config: dict[str, Any]) -> None:
    """The dashboard section for trials measured under load (nothing when the sweep has none)."""
    import streamlit as st

    if served_rows(shown).empty:
        return
    st.markdown("#### Speculation under load")
    st.caption("One trial per (configuration, concurrency). The speedup's denominator is the no-speculation "
               "server at the same load, measured pass for pass beside it.")
    schedule, why_not = schedule_of(shown, sweep)
    left, right = st.columns(2, gap="large")
    with left:
        st.plotly_chart(speedup_vs_concurrency_figure(shown, schedule), key=f"load_speedup_{sweep}",
                        config=chart_config)
    with right:
        st.plotly_chart(latency_front_figure(shown), key=f"load_front_{sweep}", config=chart_config)
    st.dataframe(best_per_load(shown), hide_index=True, width="stretch")
    if schedule is not None:
        st.markdown(f"**vLLM schedule** ({schedule.method}, the shaded bands): paste into "
                    "`vllm serve --speculative-config`, or `spectune serve --sweep "
                    f"{sweep} --schedule`")
        st.code(schedule.to_json(), language="json")
    else:
        st.caption(f"No vLLM schedule: {why_not}")


def schedule_of(shown: pd.DataFrame, sweep: str) -> tuple[LoadSchedule | None, str]:
    """The sweep's schedule (`spectune vllm schedule`), or None and why there is none."""
    try:
        return derive(shown, sweep), ""
    except (ScheduleError, ValueError) as err:
        return None, str(err)
