"""Plotly figures of a sweep's trials: pure functions of the store's trials frame.

Every function takes the frame `Store.trials_frame` returns (or a filtered slice of it)
and returns a `plotly.graph_objects.Figure`; none touches Streamlit, so the tests check
a figure's data against the store directly. The Pareto front is `spectune.pareto`'s
(shared with `spectune results`), never recomputed here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import plotly.graph_objects as go

from spectune.config import DecodeConfig
from spectune.lossless import lossless_text  # the lossless cell (short form); re-exported for the views
from spectune.pareto import front_step_line, lossy_rows, pareto_front, unchecked_rows, within_noise


@dataclass(frozen=True)
class Axis:
    column: str
    label: str
    mode: str  # "max" or "min": the direction that is better
    number_format: str  # d3-format for hover and ticks
    short: str  # for narrow places (parallel-coordinate axes, table headers)


Y_AXES: dict[str, Axis] = {a.column: a for a in (
    Axis("speedup", "speedup over AR (x)", "max", ".2f", "speedup"),
    Axis("mean_accepted_tokens", "mean accepted tokens per step (tau)", "max", ".2f", "tau"),
    Axis("acceptance_rate", "acceptance rate", "max", ".0%", "acceptance"),
)}
X_AXES: dict[str, Axis] = {a.column: a for a in (
    Axis("tree_tokens_per_step", "tree tokens verified per step", "min", ".1f", "tree tok/step"),
    Axis("draft_calls_per_step", "drafter passes per step", "min", ".1f", "draft passes/step"),
    Axis("draft_share", "draft share of wall time", "min", ".0%", "draft share"),
    Axis("ms_per_token", "ms per token", "min", ".2f", "ms/token"),
    Axis("p95_latency_s", "p95 request latency (s)", "min", ".2f", "p95 latency"),  # served engines (vLLM)
    Axis("ttft_s", "time to first token (s)", "min", ".3f", "TTFT"),
)}
AXES: dict[str, Axis] = {**Y_AXES, **X_AXES}

# Knob columns of the trials frame that parallel coordinates and range filters offer.
NUMERIC_KNOBS = ("draft_len", "node_budget", "exit_layer", "temperature")

PALETTE = ("#3969AC", "#E68310", "#11A579", "#CF1C90", "#7F3C8D", "#F2B701", "#E73F74",
           "#008695", "#80BA5A", "#F97B72", "#A5AA99")
SWEEP_PALETTE = ("#1F4E9A", "#D1495B", "#2A9D8F", "#8D6A9F")
DOMINATED_OPACITY = 0.3
LOSSY_OPACITY = 0.85  # marked, not faded: a lossy point may look best and must be seen as lossy
LOG_X_SPREAD = 8.0  # x values spanning more than this factor get a log axis
FRONT_OPACITY = 1.0
FRONT_LINE_COLOR = "#222222"
LOSSY_SYMBOL = "x-thin-open"
UNCHECKED_SYMBOL = "circle-open"  # sampling: lossless by rule, outputs unchecked (off the front unless counted)
NOISE_SYMBOL = "circle-dot"  # within noise of a front point no more costly (the speedup's intervals overlap)
# (mark column, legend entry, symbol): each kind of off-front mark gets one legend entry when drawn
LEGEND_MARKS = (("_lossy", "lossy (off the front)", LOSSY_SYMBOL),
                ("_unchecked", "unchecked sampling (off the front)", UNCHECKED_SYMBOL),
                ("_noise", "within noise of the front", NOISE_SYMBOL))
CI_COLUMNS = ("speedup_ci_low", "speedup_ci_high")
FONT = {"family": "Inter, 'Source Sans Pro', 'DejaVu Sans', sans-serif", "size": 13}


def method_colors(methods: Sequence[Any]) -> dict[str, str]:
    """A stable colour per method name (sorted), so filtering never recolours a method."""
    names = sorted({str(m) for m in methods if m is not None and not _missing(m)})
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}


def _missing(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def _flat_config(config: Any) -> dict[str, Any]:
    """Config knobs one level deep (sweeps may nest them under e.g. ``knobs``)."""
    if not isinstance(config, Mapping):
        return {}
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            flat.update({str(k): v for k, v in value.items()})
        else:
            flat[str(key)] = value
    return flat


def config_label(config: Any, method: Any = None, extra: Any = None) -> str:
    """The configuration's one label (`DecodeConfig.label`): the one its trial reported, else made from the config."""
    if isinstance(extra, Mapping) and extra.get("label"):
        return str(extra["label"])
    flat = dict(config) if isinstance(config, Mapping) else {}
    if not flat.get("method"):
        flat["method"] = str(method) if not _missing(method) and method else "?"
    return DecodeConfig.from_dict(flat).label()


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":")) if isinstance(value, (list, dict)) else str(value)


def config_lines(config: Any) -> str:
    """The configuration as ``key = value`` lines joined by <br> (plotly hover text)."""
    flat = _flat_config(config)
    return "<br>".join(f"{k} = {_compact(v)}" for k, v in flat.items()) or "(no config)"


def ci_text(row: Mapping[str, Any]) -> str:
    """The speedup's bootstrap interval as "1.02-1.10x", or "" when the trial has none."""
    low, high = row.get("speedup_ci_low"), row.get("speedup_ci_high")
    return "" if _missing(low) or _missing(high) else f"{float(low):.2f}-{float(high):.2f}x"


def finished(df: pd.DataFrame) -> pd.DataFrame:
    """Done trials (the only ones with metrics)."""
    return df[df["status"] == "done"]


def plottable(df: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """Done trials with both axis values present."""
    done = finished(df)
    values = done[[x, y]].apply(pd.to_numeric, errors="coerce")
    return done[values.notna().all(axis=1).to_numpy()]


def front_of(df: pd.DataFrame, x: str, y: str, include_unchecked: bool = False) -> pd.Series:
    """Front membership (index of ``df``) of the (x, y) objectives, certified lossless trials only
    (and unchecked sampling trials when ``include_unchecked``)."""
    return pareto_front(df, {x: AXES[x].mode, y: AXES[y].mode}, lossless_only=True,
                        include_unchecked=include_unchecked)


def _hover_template(x: Axis, y: Axis) -> str:
    return ("<b>%{customdata[1]}</b><br>trial %{customdata[0]} · %{customdata[2]}<br>"
            f"{y.label}: %{{y:{y.number_format}}}<br>{x.label}: %{{x:{x.number_format}}}<br>"
            "lossless: %{customdata[3]}<br><br>%{customdata[4]}<extra></extra>")


def _customdata(df: pd.DataFrame, on_front: pd.Series) -> list[list[Any]]:
    """Per point: trial id, label, front/dominated, lossless text, config lines."""
    rows = []
    for idx, row in df.iterrows():
        where = "on the front" if on_front[idx] else ("lossy: off the front" if row["_lossy"]
                                                      else "unchecked (sampling): off the front"
                                                      if row.get("_unchecked", False) else "dominated")
        if row.get("_noise", False):
            where += " (within noise of a front point no more costly)"
        if ci := ci_text(row):
            where += f" · speedup 95% CI {ci}"
        rows.append([int(row["trial_id"]), config_label(row["config"], row["method"], row["extra"]),
                     where, lossless_text(row), config_lines(row["config"])])
    return rows


def _base_layout(fig: go.Figure, x: Axis, y: Axis, title: str | None = None) -> go.Figure:
    fig.update_layout(
        template="plotly_white", font=FONT, height=460, margin={"l": 10, "r": 10, "t": 40, "b": 10},
        legend={"title": {"text": "method"}, "orientation": "h", "yanchor": "bottom", "y": 1.02,
                "x": 0, "font": {"size": 12}},
        hoverlabel={"font": {"size": 12}, "align": "left"}, clickmode="event+select",
        title={"text": title, "font": {"size": 15}} if title else None,
    )
    fig.update_xaxes(title=x.label, tickformat=x.number_format, zeroline=False)
    fig.update_yaxes(title=y.label, tickformat=y.number_format, zeroline=False)
    return fig


def _step_shape(x: Axis, y: Axis) -> str:
    # Cost (min) vs quality (max): quality rises with cost, a staircase drawn "hv".
    return "hv" if (x.mode == "min") == (y.mode == "max") else "vh"


def pareto_figure(df: pd.DataFrame, x: str, y: str, colors: Mapping[str, str] | None = None,
                  include_unchecked: bool = False) -> go.Figure:
    """Every done trial as a point coloured by method; the lossless front bold and joined by a
    step line, dominated trials dimmed, lossy trials drawn as crosses and kept off the front.

    Points carry ``customdata[0]`` = trial id (what a selection event hands back).
    """
    x_axis, y_axis = AXES[x], AXES[y]
    points, on_front, with_ci = _marked_points(df, x, y, x_axis, include_unchecked)
    colors = dict(colors or method_colors(df["method"]))
    fig = go.Figure()
    for method, group in points.groupby(points["method"].fillna("?").astype(str), sort=True):
        fig.add_trace(_method_trace(group, method, on_front, x_axis, y_axis, colors, with_ci))
    xs, ys = (front_step_line(points, x, y, x_axis.mode, y_axis.mode, include_unchecked=include_unchecked)
              if len(points) else ([], []))
    fig.add_trace(go.Scatter(
        x=xs, y=ys, mode="lines", name="Pareto front (lossless)", hoverinfo="skip",
        line={"shape": _step_shape(x_axis, y_axis), "color": FRONT_LINE_COLOR, "width": 2,
              "dash": "solid"},
    ))
    for column, name, symbol in LEGEND_MARKS:  # one legend entry per kind of mark that is drawn
        if points[column].any():
            fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=name,
                                     marker={"symbol": symbol, "color": "#555555", "size": 10}))
    if y == "speedup" and len(points):
        fig.add_hline(y=1.0, line={"dash": "dot", "color": "#999999", "width": 1},
                      annotation_text="AR (1.0x)", annotation_position="bottom right")
    fig = _base_layout(fig, x_axis, y_axis)
    fig.update_layout(legend={"orientation": "v", "x": 1.02, "y": 1, "yanchor": "top"},
                      height=480)
    if _wide_spread(points[x]):
        fig.update_xaxes(type="log", tickvals=_log_ticks(points[x]))
    return fig


def _marked_points(df: pd.DataFrame, x: str, y: str, x_axis: Axis,
                   include_unchecked: bool) -> tuple[pd.DataFrame, pd.Series, bool]:
    """The plottable trials with their marks (_lossy, _unchecked, _noise), which are on the front, and
    whether the speedup's intervals are drawn."""
    points = plottable(df, x, y).copy()
    points["_lossy"] = lossy_rows(points, include_unchecked=True)
    points["_unchecked"] = unchecked_rows(points) & (not include_unchecked)
    on_front = front_of(points, x, y, include_unchecked) if len(points) else pd.Series(dtype=bool)
    with_ci = y == "speedup" and all(c in points.columns for c in CI_COLUMNS)
    points["_noise"] = (within_noise(points, on_front, x, x_mode=x_axis.mode) & ~points["_lossy"]
                        if with_ci and len(points) else False)
    return points, on_front, with_ci


def _method_trace(group: pd.DataFrame, method: str, on_front: pd.Series, x_axis: Axis, y_axis: Axis,
                  colors: Mapping[str, str], with_ci: bool) -> go.Scatter:
    """One method's trials: front points large and outlined, lossy ones crossed, dominated ones dimmed."""
    front = on_front[group.index]
    lossy = group["_lossy"]
    return go.Scatter(
        x=group[x_axis.column].astype(float), y=group[y_axis.column].astype(float), mode="markers", name=method,
        customdata=_customdata(group, on_front), hovertemplate=_hover_template(x_axis, y_axis),
        error_y=_ci_bars(group, y_axis.column) if with_ci else None,
        marker={
            "color": colors.get(method, PALETTE[-1]),
            "size": [15 if f else 12 if bad else 10 for f, bad in zip(front, lossy)],
            "opacity": [FRONT_OPACITY if f else LOSSY_OPACITY if bad else DOMINATED_OPACITY
                        for f, bad in zip(front, lossy)],
            "symbol": [LOSSY_SYMBOL if bad else UNCHECKED_SYMBOL if unchecked else NOISE_SYMBOL if noise
                       else "circle" for bad, unchecked, noise in zip(lossy, group["_unchecked"], group["_noise"])],
            "line": {"width": [2 if f else 0 for f in front], "color": FRONT_LINE_COLOR},
        },
    )


def _ci_bars(group: pd.DataFrame, y: str) -> dict[str, Any]:
    """Asymmetric error bars from the speedup's bootstrap interval (none where a trial has none)."""
    value = group[y].astype(float)
    low, high = (pd.to_numeric(group[c], errors="coerce").astype(float) for c in CI_COLUMNS)
    return {"type": "data", "symmetric": False, "array": (high - value).clip(lower=0).tolist(),
            "arrayminus": (value - low).clip(lower=0).tolist(), "thickness": 1, "width": 3,
            "color": "#888888"}


def _log_ticks(values: pd.Series) -> list[float]:
    """1-2-5 ticks covering ``values`` (plotly's own log ticks crowd between decades)."""
    numbers = pd.to_numeric(values, errors="coerce").dropna().astype(float)
    low, high = numbers.min(), numbers.max()
    decades = range(math.floor(math.log10(low)) - 1, math.ceil(math.log10(high)) + 1)
    ticks = [m * 10.0 ** d for d in decades for m in (1, 2, 5)]
    return [t for t in ticks if low / 1.5 <= t <= high * 1.5]


def _wide_spread(values: pd.Series) -> bool:
    """All positive and spanning more than `LOG_X_SPREAD`x: a log axis keeps cheap points apart."""
    numbers = pd.to_numeric(values, errors="coerce").dropna().astype(float)
    return bool(len(numbers) and numbers.min() > 0 and numbers.max() / numbers.min() > LOG_X_SPREAD)


def _dimension(label: str, values: pd.Series, number_format: str | None = None) -> dict[str, Any]:
    """A parcoords axis; missing values (a knob another method has no use for) get their own
    tick "n/a" just below the range instead of breaking the line."""
    numbers = pd.to_numeric(values, errors="coerce").astype(float)
    dim: dict[str, Any] = {"label": label, "values": numbers.tolist()}
    if number_format:
        dim["tickformat"] = number_format
    if numbers.isna().any():
        present = sorted(numbers.dropna().unique().tolist())
        low, high = (present[0], present[-1]) if present else (0.0, 1.0)
        sentinel = low - max((high - low) * 0.15, 1.0)
        dim["values"] = numbers.fillna(sentinel).tolist()
        dim["tickvals"] = [sentinel, *present]
        dim["ticktext"] = ["n/a", *[f"{v:g}" for v in present]]
    return dim


def parallel_figure(df: pd.DataFrame, x: str, y: str) -> go.Figure:
    """Parallel coordinates over method, the knobs that vary and both objectives; lines
    coloured by the y objective."""
    done = plottable(df, x, y)
    methods = sorted(done["method"].fillna("?").astype(str).unique())
    codes = done["method"].fillna("?").astype(str).map({m: i for i, m in enumerate(methods)})
    dims = [{"label": "method", "values": codes.astype(float).tolist(),
             "tickvals": list(range(len(methods))), "ticktext": methods}]
    for knob in NUMERIC_KNOBS:  # the knobs that vary (a constant axis says nothing)
        if pd.to_numeric(done[knob], errors="coerce").dropna().nunique() >= 2:
            dims.append(_dimension(knob, done[knob]))
    dims.append(_dimension(AXES[x].short, done[x], AXES[x].number_format))
    dims.append(_dimension(AXES[y].short, done[y], AXES[y].number_format))
    fig = go.Figure(go.Parcoords(
        dimensions=dims,
        line={"color": done[y].astype(float).tolist(), "colorscale": "Viridis", "showscale": True,
              "colorbar": {"title": {"text": AXES[y].short}, "x": 1.04, "thickness": 14}},
        labelfont={"size": 13}, tickfont={"size": 11}, labelangle=0,
    ))
    fig.update_layout(template="plotly_white", font=FONT, height=400,
                      margin={"l": 70, "r": 90, "t": 50, "b": 25})
    return fig


def method_speedup_figure(df: pd.DataFrame, metric: str = "speedup",
                          colors: Mapping[str, str] | None = None) -> go.Figure:
    """The distribution of ``metric`` per method over its done trials (box + every trial)."""
    done = finished(df)
    done = done[pd.to_numeric(done[metric], errors="coerce").notna().to_numpy()]
    colors = dict(colors or method_colors(df["method"]))
    fig = go.Figure()
    for method, group in done.groupby(done["method"].fillna("?").astype(str), sort=True):
        labels = [config_label(c, m, e) for c, m, e in zip(group["config"], group["method"],
                                                            group["extra"])]
        fig.add_trace(go.Box(
            y=group[metric].astype(float), name=method, boxpoints="all", jitter=0.4, pointpos=0,
            marker={"color": colors.get(method, PALETTE[-1]), "size": 7},
            line={"color": colors.get(method, PALETTE[-1])}, customdata=group["trial_id"].tolist(),
            text=labels, hovertemplate="%{text}<br>trial %{customdata}<br>"
                                       f"{metric}: %{{y:.2f}}<extra></extra>",
        ))
    axis = AXES.get(metric)
    if metric == "speedup":
        fig.add_hline(y=1.0, line={"dash": "dot", "color": "#999999", "width": 1})
    fig.update_layout(template="plotly_white", font=FONT, height=420, showlegend=False,
                      margin={"l": 10, "r": 10, "t": 30, "b": 10})
    fig.update_yaxes(title=axis.label if axis else metric,
                     tickformat=axis.number_format if axis else None)
    return fig


def category_table(by_category: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """A trial's results per prompt category (bench's `by_category`), one row per category."""
    rows = [{"category": name, **{k: entry.get(k) for k in ("n_prompts", "speedup", "mean_accepted_tokens",
                                                             "acceptance_rate")}}
            for name, entry in sorted(by_category.items())]
    return pd.DataFrame(rows, columns=["category", "n_prompts", "speedup", "mean_accepted_tokens", "acceptance_rate"])


def category_figure(df: pd.DataFrame, colors: Mapping[str, str] | None = None) -> go.Figure | None:
    """Methods compared per prompt category: each method's best certified trial (by overall speedup),
    its speedup in every category as grouped bars. None when no trial has categories."""
    done = finished(df)
    done = done[~lossy_rows(done).to_numpy()]
    done = done.loc[[isinstance(c, Mapping) and bool(c) for c in done["by_category"]]]
    done = done[pd.to_numeric(done["speedup"], errors="coerce").notna().to_numpy()]
    if done.empty:
        return None
    colors = dict(colors or method_colors(df["method"]))
    fig = go.Figure()
    for method, group in done.groupby(done["method"].fillna("?").astype(str), sort=True):
        best = group.loc[group["speedup"].astype(float).idxmax()]
        table = category_table(best["by_category"])
        label = config_label(best["config"], best["method"], best["extra"])
        fig.add_trace(go.Bar(x=table["category"], y=table["speedup"].astype(float), name=label,
                             marker={"color": colors.get(method, PALETTE[-1])},
                             customdata=[int(best["trial_id"])] * len(table),
                             hovertemplate=f"{label}<br>trial %{{customdata}}<br>%{{x}}: %{{y:.2f}}x<extra></extra>"))
    fig.add_hline(y=1.0, line={"dash": "dot", "color": "#999999", "width": 1})
    fig.update_layout(template="plotly_white", font=FONT, height=380, barmode="group",
                      margin={"l": 10, "r": 10, "t": 30, "b": 10}, legend={"orientation": "h", "y": -0.25})
    fig.update_yaxes(title="speedup over AR (same prompts)")
    return fig


def position_acceptance_figure(rows: pd.DataFrame, colors: Mapping[str, str] | None = None
                               ) -> go.Figure:
    """Per-position acceptance (share of steps whose i-th draft token was accepted), one bar
    group per trial in ``rows``; one trial takes its method's colour from ``colors``."""
    fig = go.Figure()
    single = len(rows) == 1
    for i, (_, row) in enumerate(rows.iterrows()):
        rates = row["acceptance_by_position"]
        if not isinstance(rates, (list, tuple)) or not rates:
            continue
        fig.add_trace(go.Bar(
            x=list(range(1, len(rates) + 1)), y=[float(r) for r in rates],
            name=f"#{int(row['trial_id'])} {config_label(row['config'], row['method'], row['extra'])}",
            marker={"color": (colors or {}).get(str(row["method"]), PALETTE[0]) if single
                    else PALETTE[i % len(PALETTE)]},
            hovertemplate="position %{x}: %{y:.0%}<extra>%{fullData.name}</extra>",
        ))
    fig.update_layout(template="plotly_white", font=FONT, height=300, barmode="group",
                      margin={"l": 10, "r": 10, "t": 30, "b": 10},
                      legend={"orientation": "h", "yanchor": "bottom", "y": 1.02, "x": 0})
    fig.update_xaxes(title="draft position", dtick=1)
    fig.update_yaxes(title="accepted", tickformat=".0%", range=[0, 1.05])
    return fig


def exit_layer_figure(by_layer: Mapping[str, float]) -> go.Figure:
    """Acceptance per exit layer (self-speculative methods)."""
    layers = sorted(by_layer, key=lambda k: float(k) if str(k).lstrip("-").isdigit() else math.inf)
    fig = go.Figure(go.Bar(x=[str(k) for k in layers], y=[float(by_layer[k]) for k in layers],
                           marker={"color": PALETTE[2]},
                           hovertemplate="exit layer %{x}: %{y:.0%}<extra></extra>"))
    fig.update_layout(template="plotly_white", font=FONT, height=260,
                      margin={"l": 10, "r": 10, "t": 30, "b": 10})
    fig.update_xaxes(title="exit layer", type="category")
    fig.update_yaxes(title="accepted", tickformat=".0%", range=[0, 1.05])
    return fig


def compare_fronts_figure(df: pd.DataFrame, x: str, y: str, sweeps: Sequence[str]) -> go.Figure:
    """Trials of several sweeps on one plot, coloured by sweep, each with its own front
    (a step line in the sweep's colour); dominated trials dimmed, lossy ones crosses."""
    x_axis, y_axis = AXES[x], AXES[y]
    fig = go.Figure()
    for i, sweep in enumerate(sweeps):
        color = SWEEP_PALETTE[i % len(SWEEP_PALETTE)]
        points = plottable(df[df["sweep"] == sweep], x, y).copy()
        points["_lossy"] = lossy_rows(points, include_unchecked=True)
        points["_unchecked"] = unchecked_rows(points)
        on_front = front_of(points, x, y) if len(points) else pd.Series(dtype=bool)
        fig.add_trace(go.Scatter(
            x=points[x].astype(float), y=points[y].astype(float), mode="markers", name=sweep,
            legendgroup=sweep, customdata=_customdata(points, on_front),
            hovertemplate=_hover_template(x_axis, y_axis),
            marker={"color": color, "size": [13 if f else 9 for f in on_front],
                    "opacity": [FRONT_OPACITY if f else LOSSY_OPACITY if lossy
                                else DOMINATED_OPACITY
                                for f, lossy in zip(on_front, points["_lossy"])],
                    "symbol": [LOSSY_SYMBOL if lossy else UNCHECKED_SYMBOL if unchecked else "circle"
                               for lossy, unchecked in zip(points["_lossy"], points["_unchecked"])]},
        ))
        xs, ys = (front_step_line(points, x, y, x_axis.mode, y_axis.mode) if len(points)
                  else ([], []))
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name=f"{sweep} front",
                                 legendgroup=sweep, hoverinfo="skip",
                                 line={"shape": _step_shape(x_axis, y_axis), "color": color,
                                       "width": 2.5}))
    fig = _base_layout(fig, x_axis, y_axis)
    fig.update_layout(legend={"title": {"text": "sweep"}})
    shown = plottable(df[df["sweep"].isin(list(sweeps))], x, y)[x]
    if _wide_spread(shown):
        fig.update_xaxes(type="log", tickvals=_log_ticks(shown))
    return fig


__all__ = [
    "AXES", "Axis", "NUMERIC_KNOBS", "X_AXES", "Y_AXES", "compare_fronts_figure", "config_label",
    "config_lines", "exit_layer_figure", "finished", "front_of", "lossless_text",
    "ci_text", "method_colors", "method_speedup_figure", "parallel_figure", "pareto_figure", "plottable",
    "position_acceptance_figure",
]
