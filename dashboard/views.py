"""The dashboard's sections: a sweep (front, trial, table, knobs, methods), two sweeps side
by side, the live endpoint, and the messages for an empty or unreachable store."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from functools import partial

import pandas as pd
import streamlit as st

from spectune.dashboard import data
from spectune.dashboard.detail import render_trial
from spectune.dashboard.figures import (
    AXES, X_AXES, Y_AXES, category_figure, compare_fronts_figure, config_label, front_of, method_colors,
    method_speedup_figure, parallel_figure, pareto_figure, plottable,
    position_acceptance_figure,
)
from spectune.dashboard.filters import (
    SORTABLE, TABLE_COLUMNS, TrialFilter, apply_filter, axis_choices, knob_bounds, trial_table,
)
from spectune.dashboard.load_view import render_load
from spectune.dashboard.live import (
    EndpointDown, EndpointRejected, LiveAnswer, stream_completion,
)
from spectune.pareto import lossy_rows
from spectune.store import SweepSummary

NEXT_STEPS = """\
Run a sweep and its trials appear here as they finish:

```bash
make demo                                   # builds the tiny model pair, sweeps, fills the store
spectune sweep sweeps/specs/quick.yaml      # or run a sweep spec yourself
```
"""
CHART_CONFIG = {"displaylogo": False, "modeBarButtonsToRemove": ["lasso2d", "autoScale2d"]}
TRIAL_TABLE_HEIGHT = 390


# --- messages -------------------------------------------------------------------------------


def unreachable(masked_url: str, reason: str,
                heading: str = "Cannot reach the results database") -> None:
    st.error(f"**{heading}** `{masked_url}`", icon=":material/cloud_off:")
    st.code(reason, language=None, wrap_lines=True)
    st.markdown("Check the URL (`spectune dashboard --db URL`, or `$SPECTUNE_DB`) and that the "
                "database server is running; this page retries on every refresh.")


def empty_store(masked_url: str) -> None:
    st.info(f"**No sweeps yet** in `{masked_url}`.", icon=":material/inbox:")
    st.markdown(NEXT_STEPS)


def sweep_label(s: SweepSummary) -> str:
    return f"{s.name} · {s.status} · {s.n_trials['done']}/{s.total} done"


def when(moment: datetime | None) -> str:
    return "–" if moment is None else moment.strftime("%Y-%m-%d %H:%M UTC")


def sweeps_overview(summaries: Sequence[SweepSummary]) -> pd.DataFrame:
    return pd.DataFrame([{
        "sweep": s.name, "status": s.status, "done": s.n_trials["done"],
        "running": s.n_trials["running"], "pending": s.n_trials["pending"],
        "errors": s.n_trials["error"], "started": when(s.started_at),
        "finished": when(s.finished_at), "hardware": s.hardware or "–",
    } for s in summaries])


# --- one sweep ------------------------------------------------------------------------------


def _header(summary: SweepSummary, frame: pd.DataFrame) -> None:
    color = {"running": "blue", "done": "green", "error": "red", "interrupted": "orange"}.get(
        summary.status, "gray")
    st.markdown(f"### {summary.name}  :{color}-badge[{summary.status}]")
    finished_at = f" · finished {when(summary.finished_at)}" if summary.finished_at else ""
    st.caption(f"started {when(summary.started_at)}{finished_at} · "
               f"{summary.hardware or 'hardware not recorded yet'}")
    best = _best_lossless(frame[frame["status"] == "done"])
    tiles = st.columns([1, 1, 1, 1.2, 3])
    tiles[0].metric("trials done", f"{summary.n_trials['done']} / {summary.total}", border=True)
    tiles[1].metric("running", summary.n_trials["running"], border=True)
    tiles[2].metric("errors", summary.n_trials["error"], border=True)
    tiles[3].metric("best lossless speedup", "–" if best is None else f"{best['speedup']:.2f}x",
                    border=True)
    if best is not None:
        with tiles[4].container(border=True, height="stretch"):
            st.caption("best lossless configuration")
            st.markdown(f"`{config_label(best['config'], best['method'], best['extra'])}`  \n"
                        f"trial {int(best['trial_id'])} · {best['method']}")


def _best_lossless(done: pd.DataFrame) -> pd.Series | None:
    """The done, lossless trial with the highest speedup (what a user would serve)."""
    eligible = done[~lossy_rows(done).to_numpy()]
    eligible = eligible[pd.to_numeric(eligible["speedup"], errors="coerce").notna().to_numpy()]
    if eligible.empty:
        return None
    return eligible.loc[eligible["speedup"].astype(float).idxmax()]


def _filter_widgets(frame: pd.DataFrame, sweep: str) -> TrialFilter:
    methods = sorted(frame["method"].dropna().astype(str).unique())
    cols = st.columns([3, 2.2, 1.3, 1.3], vertical_alignment="bottom")
    picked = cols[0].multiselect("Methods", methods, key=f"f_methods_{sweep}",
                                 placeholder="all methods")
    statuses = cols[1].multiselect("Status", ["done", "running", "pending", "error"],
                                   key=f"f_status_{sweep}", placeholder="any status")
    lossless = cols[2].toggle("Lossless only", key=f"f_lossless_{sweep}",
                              help="Hide lossy methods, trials whose outputs differed from AR and "
                              "unchecked sampling trials (unless counted below)")
    unchecked = cols[2].toggle("Count unchecked", key=f"f_unchecked_{sweep}",
                               help="Sampling trials are lossless by the method's rule but their outputs "
                               "are not checked: off the front unless counted")
    ranges = []
    bounds = knob_bounds(frame)
    with cols[3].popover("Knob ranges", icon=":material/tune:", width="stretch",
                         disabled=not bounds):
        for knob, (low, high) in bounds.items():
            step = 0.05 if knob == "temperature" else 1.0
            chosen = st.slider(knob, low, high, (low, high), step=step, key=f"f_{knob}_{sweep}")
            if chosen != (low, high):
                ranges.append((knob, float(chosen[0]), float(chosen[1])))
    return TrialFilter(tuple(picked), tuple(statuses), lossless, unchecked, tuple(ranges))


def _axis_pickers(frame: pd.DataFrame, sweep: str, prefix: str = "") -> tuple[str, str]:
    left, right = st.columns(2)
    xs, ys = axis_choices(frame, X_AXES), axis_choices(frame, Y_AXES)
    y = left.selectbox("y: quality", ys, key=f"{prefix}y_{sweep}",
                       format_func=lambda c: AXES[c].label)
    x = right.selectbox("x: cost", xs, key=f"{prefix}x_{sweep}",
                        format_func=lambda c: AXES[c].label)
    return x, y


def _open_key(sweep: str) -> str:
    return f"open_trial_{sweep}"


def _open_from_chart(sweep: str, chart_key: str) -> None:
    points = st.session_state[chart_key].selection.points
    ids = [p["customdata"][0] for p in points if p.get("customdata")]
    if ids:
        st.session_state[_open_key(sweep)] = int(ids[0])


def _open_from_table(sweep: str, table_key: str, trial_ids: list[int]) -> None:
    rows = st.session_state[table_key].selection.rows
    if rows:
        st.session_state[_open_key(sweep)] = int(trial_ids[rows[0]])


def _trial_picker(frame: pd.DataFrame, sweep: str, default: int | None) -> int | None:
    labels = {int(t): f"#{int(t)} {config_label(c, m, e)} ({s})" for t, c, m, e, s in zip(
        frame["trial_id"], frame["config"], frame["method"], frame["extra"], frame["status"])}
    options = list(labels)
    key = _open_key(sweep)
    if st.session_state.get(key) not in options:  # filtered away, or never picked
        st.session_state[key] = default if default in options else None
    return st.selectbox("Trial", options, key=key, format_func=labels.__getitem__,
                        placeholder="click a point or a table row, or pick a trial")


def _front_and_trial(url: str, frame: pd.DataFrame, shown: pd.DataFrame, sweep: str,
                     colors: dict[str, str], unchecked: bool = False) -> tuple[str, str]:
    chart_col, trial_col = st.columns([1.45, 1], gap="large")
    with chart_col:
        st.markdown("#### Pareto front: quality vs cost")
        x, y = _axis_pickers(frame, sweep)
        chart_key = f"front_{sweep}"
        st.plotly_chart(pareto_figure(shown, x, y, colors, unchecked), key=chart_key,
                        on_select=partial(_open_from_chart, sweep, chart_key),
                        selection_mode="points", config=CHART_CONFIG)
        st.caption("Bold points with a dark ring: the lossless Pareto front (joined by the step "
                   "line). Faded: dominated. Crosses: lossy, never on the front. Open rings: sampling "
                   "trials, unchecked (off the front unless counted). A dot inside: within noise (95% "
                   "intervals, the bars, overlap) of a front point no more costly. "
                   "Click a point to open its trial.")
    with trial_col:
        st.markdown("#### Trial")
        best = _best_on_front(shown, x, y, unchecked)
        trial_id = _trial_picker(shown, sweep, best)
        if trial_id is not None:
            render_trial(url, trial_id, colors)
    return x, y


def _best_on_front(shown: pd.DataFrame, x: str, y: str, unchecked: bool = False) -> int | None:
    points = plottable(shown, x, y)
    if points.empty:
        return None
    front = points[front_of(points, x, y, unchecked).to_numpy()]
    if front.empty:
        return None
    return int(front.loc[front[y].astype(float).idxmax(), "trial_id"])


def _trial_table(shown: pd.DataFrame, sweep: str, x: str, y: str, unchecked: bool = False) -> None:
    head, sort_col, desc_col = st.columns([3, 1.4, 0.8], vertical_alignment="bottom")
    head.markdown(f"#### Trials ({len(shown)})")
    sort_by = sort_col.selectbox("Sort by", SORTABLE, key=f"sort_{sweep}",
                                 format_func=lambda c: TABLE_COLUMNS.get(c, c))
    descending = desc_col.toggle("descending", value=True, key=f"sort_desc_{sweep}")
    table = trial_table(shown, x, y, sort_by, descending, unchecked)
    table_key = f"table_{sweep}"
    st.dataframe(
        table, key=table_key, hide_index=True, width="stretch", height=TRIAL_TABLE_HEIGHT,
        on_select=partial(_open_from_table, sweep, table_key, table["trial"].tolist()),
        selection_mode="single-row",
        column_config={
            "trial": st.column_config.NumberColumn(width="small"),
            "configuration": st.column_config.TextColumn(width=260),
            "lossless": st.column_config.TextColumn(width=110),
            "speedup": st.column_config.NumberColumn(format="%.2fx"),
            "tau": st.column_config.NumberColumn(format="%.2f"),
            "acceptance": st.column_config.NumberColumn(format="percent"),
            "tree tok/step": st.column_config.NumberColumn(format="%.1f"),
            "draft passes/step": st.column_config.NumberColumn(format="%.1f"),
            "draft share": st.column_config.NumberColumn(format="percent"),
            "ms/token": st.column_config.NumberColumn(format="%.2f"),
            "tok/s": st.column_config.NumberColumn(format="%.0f"),
            "on front": st.column_config.CheckboxColumn(),
            "served": st.column_config.CheckboxColumn(),
            "error": st.column_config.TextColumn(width="large"),
        },
    )
    errors = shown[shown["status"] == "error"]
    for _, row in errors.iterrows():
        st.error(f"Trial {int(row['trial_id'])} "
                 f"`{config_label(row['config'], row['method'], row['extra'])}` failed: "
                 f"{row['error'] or 'no message recorded'}", icon=":material/error:")


def _knobs_and_methods(shown: pd.DataFrame, x: str, y: str, colors: dict[str, str],
                       sweep: str, unchecked: bool = False) -> None:
    st.markdown("#### Knobs and objectives")
    st.plotly_chart(parallel_figure(shown, x, y), key=f"parallel_{sweep}",
                    config=CHART_CONFIG)
    left, right = st.columns(2, gap="large")
    with left:
        st.markdown("#### Speedup per method")
        st.plotly_chart(method_speedup_figure(shown, "speedup", colors), key=f"methods_{sweep}",
                        config=CHART_CONFIG)
    with right:
        st.markdown("#### Per-position acceptance along the front")
        points = plottable(shown, x, y)
        front = points[front_of(points, x, y, unchecked).to_numpy()] if len(points) else points
        st.plotly_chart(position_acceptance_figure(front), key=f"positions_{sweep}",
                        config=CHART_CONFIG)
    categories = category_figure(shown, colors)
    if categories is not None:
        st.markdown("#### Speedup per prompt category")
        st.caption("Each method's best certified configuration, its speedup on each category's prompts alone.")
        st.plotly_chart(categories, key=f"categories_{sweep}", config=CHART_CONFIG)


def _no_finished_trials(summary: SweepSummary) -> None:
    counts = ", ".join(f"{n} {status}" for status, n in summary.n_trials.items() if n)
    st.info(f"**No finished trials yet** in `{summary.name}` ({summary.status}; "
            f"{counts or 'no trials'}). Results appear here as trials finish.",
            icon=":material/hourglass_top:")
    if summary.status != "running":
        st.markdown(NEXT_STEPS)


def sweep_view(url: str, sweep: str) -> None:
    """Everything about one sweep; a fragment, so a live refresh redraws only this."""
    summaries = {s.name: s for s in data.sweeps(url)}
    summary = summaries.get(sweep)
    if summary is None:
        st.warning(f"Sweep `{sweep}` is no longer in the store.")
        return
    frame = data.trials(url, (sweep,))
    _header(summary, frame)
    if summary.n_trials["done"] == 0:
        _no_finished_trials(summary)
        if len(frame):
            _trial_table(frame, sweep, "tree_tokens_per_step", "speedup")
        return
    colors = method_colors(frame["method"])
    chosen = _filter_widgets(frame, sweep)
    shown = apply_filter(frame, chosen)
    x, y = _front_and_trial(url, frame, shown, sweep, colors, chosen.include_unchecked)
    _trial_table(shown, sweep, x, y, chosen.include_unchecked)
    render_load(shown, sweep, CHART_CONFIG)  # trials measured under load (vLLM): speedup vs concurrency
    _knobs_and_methods(shown, x, y, colors, sweep, chosen.include_unchecked)


# --- two sweeps -----------------------------------------------------------------------------


def compare_view(url: str, summaries: Sequence[SweepSummary], current: str) -> None:
    names = [s.name for s in summaries]
    if len(names) < 2:
        st.info("Comparing needs two sweeps: run the same spec on another machine "
                "(for example `spectune sweep sweeps/specs/quick.yaml --db URL` on a GPU node "
                "pointing at this store).", icon=":material/compare_arrows:")
        return
    others = [n for n in names if n != current]
    picked = st.multiselect("Sweeps", names, default=[current, others[0]], key="compare_sweeps",
                            max_selections=4)
    if not picked:
        st.caption("Pick sweeps to compare.")
        return
    frame = data.trials(url, tuple(picked))
    x, y = _axis_pickers(frame, "compare", prefix="cmp_")
    st.plotly_chart(compare_fronts_figure(frame, x, y, picked), key="compare_chart",
                    config=CHART_CONFIG)
    hardware = {s.name: s.hardware or "–" for s in summaries}
    st.dataframe(pd.DataFrame([_sweep_best(frame, name, hardware[name], x, y) for name in picked]),
                 hide_index=True, width="stretch")


def _sweep_best(frame: pd.DataFrame, sweep: str, hardware: str, x: str, y: str) -> dict:
    points = plottable(frame[frame["sweep"] == sweep], x, y)
    front = points[front_of(points, x, y).to_numpy()] if len(points) else points
    best = front.loc[front[y].astype(float).idxmax()] if len(front) else None
    return {"sweep": sweep, "hardware": hardware, "finished trials": len(points),
            "on the front": len(front),
            f"best {y}": None if best is None else round(float(best[y]), 3),
            "best configuration": None if best is None else
            config_label(best["config"], best["method"], best["extra"])}


# --- the live endpoint ----------------------------------------------------------------------


def _live_stats(answer: LiveAnswer) -> None:
    if answer.finished is None:
        return
    spec, comparison = answer.finished.speculative, answer.finished.comparison
    tiles = st.columns(4)
    tau, rate = spec.mean_accepted_tokens, spec.acceptance_rate
    tiles[0].metric("tau (tokens / target pass)", "–" if tau is None else f"{tau:.2f}")
    tiles[1].metric("acceptance", "–" if rate is None else f"{rate:.0%}")
    tiles[2].metric("tok/s", f"{spec.tokens_per_s:.0f}")
    tiles[3].metric("speedup vs AR", "–" if comparison is None else f"{comparison.speedup:.2f}x",
                    help=None if comparison is None else
                    f"AR: {comparison.ar_tokens_per_s:.0f} tok/s; outputs "
                    f"{'match' if comparison.outputs_match else 'differ'}")
    source = f" (trial {spec.trial_id})" if spec.trial_id is not None else ""
    st.caption(f"served: `{spec.label}`{source} · "
               f"{spec.target_calls} target passes · finish: {answer.finished.finish_reason}")


def live_panel(endpoint: str) -> None:
    st.markdown("#### Try the served configuration")
    st.caption(f"Endpoint: `{endpoint}` (change it in the sidebar). Greedy decoding, so the "
               "answer equals plain decoding for a lossless method.")
    prompt = st.text_area("Prompt", "def fibonacci(n):", key="live_prompt", height=110)
    cols = st.columns([2, 2, 1], vertical_alignment="bottom")
    max_tokens = cols[0].slider("max new tokens", 8, 256, 64, step=8, key="live_max_tokens")
    compare = cols[1].checkbox("also decode with AR (speedup)", value=True, key="live_compare")
    go = cols[2].button("Generate", type="primary", key="live_go", width="stretch",
                        disabled=not prompt.strip(), icon=":material/play_arrow:")
    if not go:
        return
    answer = LiveAnswer()
    shown = st.empty()  # redrawn per streamed step: the prompt and its continuation so far
    try:
        for _ in stream_completion(endpoint, prompt, answer, max_tokens=max_tokens,
                                   compare_ar=compare):
            shown.code(prompt + answer.text, language="python", wrap_lines=True)
    except EndpointDown as exc:
        st.error(f"**No answer from the endpoint** at `{endpoint}`: {exc}. Start one with "
                 "`spectune serve`, or set its URL in the sidebar.", icon=":material/cloud_off:")
        return
    except EndpointRejected as exc:
        st.error(f"**The endpoint refused the request.** {exc}", icon=":material/block:")
        return
    _live_stats(answer)


__all__ = ["compare_view", "empty_store", "live_panel", "sweep_label", "sweep_view",
           "sweeps_overview", "unreachable"]
