"""The dashboard's figures and table hold exactly what the store holds.

A real SQLite store is seeded through the store's writer API (tests/dashboard_seed.py);
every check compares a figure's data with `Store.trials_frame` and with `spectune.pareto`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import pytest

from dashboard_seed import CONFIGS, ERROR_MESSAGE, seed_store
from spectune.dashboard.figures import (
    DOMINATED_OPACITY, FRONT_OPACITY, LOSSY_SYMBOL, X_AXES, Y_AXES, compare_fronts_figure,
    config_label, exit_layer_figure, front_of, lossless_text, method_colors,
    method_speedup_figure, parallel_figure, pareto_figure, position_acceptance_figure,
)
from spectune.dashboard.filters import (
    TrialFilter, apply_filter, axis_choices, knob_bounds, trial_table,
)
from spectune.pareto import front_step_line, pareto_front
from spectune.store import Store

X, Y = "tree_tokens_per_step", "speedup"
FRONT_TRACE = "Pareto front (lossless)"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    path: Path = tmp_path_factory.mktemp("dash") / "store.db"
    s = seed_store(f"sqlite:///{path}")
    yield s
    s.close()


@pytest.fixture(scope="module")
def cpu(store: Store) -> pd.DataFrame:
    return store.trials_frame("quick-cpu")


def method_traces(fig: go.Figure) -> list[go.Scatter]:
    return [t for t in fig.data if t.customdata is not None]


def plotted(fig: go.Figure) -> dict[int, dict]:
    """trial id -> its point (x, y, opacity, symbol, trace name) as drawn."""
    points = {}
    for trace in method_traces(fig):
        for i, custom in enumerate(trace.customdata):
            points[int(custom[0])] = {
                "x": trace.x[i], "y": trace.y[i], "trace": trace.name,
                "opacity": trace.marker.opacity[i], "symbol": trace.marker.symbol[i],
                "color": trace.marker.color,
            }
    return points


def store_points(frame: pd.DataFrame, x: str = X, y: str = Y) -> pd.DataFrame:
    done = frame[frame["status"] == "done"]
    return done[done[[x, y]].notna().all(axis=1)].set_index("trial_id")


def front_trace(fig: go.Figure, name: str = FRONT_TRACE) -> go.Scatter:
    return next(t for t in fig.data if t.name == name)


def test_pareto_points_are_the_stores_done_trials(cpu: pd.DataFrame) -> None:
    fig = pareto_figure(cpu, X, Y)
    points = plotted(fig)
    expected = store_points(cpu)
    assert set(points) == set(expected.index)  # no error / pending trial is drawn
    assert len(points) == len(CONFIGS)
    for trial_id, point in points.items():
        row = expected.loc[trial_id]
        assert point["x"] == pytest.approx(row[X])
        assert point["y"] == pytest.approx(row[Y])
        assert point["trace"] == row["method"]  # one trace (legend entry, colour) per method
    colors = method_colors(cpu["method"])
    assert {t.name: t.marker.color for t in method_traces(fig)} == {
        m: colors[m] for m in expected["method"].unique()}


def test_front_membership_matches_spectune_pareto(cpu: pd.DataFrame) -> None:
    fig = pareto_figure(cpu, X, Y)
    points = plotted(fig)
    done = store_points(cpu).reset_index()
    on_front = set(done.loc[pareto_front(done, {X: "min", Y: "max"}).to_numpy(), "trial_id"])
    assert 2 <= len(on_front) < len(done)
    assert {t for t, p in points.items() if p["opacity"] == FRONT_OPACITY} == on_front
    dimmed = {t for t, p in points.items() if p["opacity"] == DOMINATED_OPACITY}
    lossy = set(done.loc[done["lossy_method"].astype(bool), "trial_id"])
    assert dimmed == set(done["trial_id"]) - on_front - lossy
    xs, ys = front_step_line(done, X, Y, "min", "max")
    line = front_trace(fig)
    assert list(line.x) == pytest.approx(xs) and list(line.y) == pytest.approx(ys)
    assert line.line.shape == "hv"


def test_lossy_trial_is_marked_and_kept_off_the_front(cpu: pd.DataFrame) -> None:
    points = plotted(pareto_figure(cpu, X, Y))
    lossy = cpu[cpu["lossy_method"].fillna(False).astype(bool)]
    assert len(lossy) == 1
    trial_id = int(lossy["trial_id"].iloc[0])
    assert points[trial_id]["symbol"] == LOSSY_SYMBOL
    assert points[trial_id]["opacity"] != FRONT_OPACITY
    # It has the highest speedup of all: lossless_only is what keeps it off the front.
    assert lossy["speedup"].iloc[0] == cpu["speedup"].max()
    assert {p["symbol"] for t, p in points.items() if t != trial_id} == {"circle"}


@pytest.mark.parametrize("x", list(X_AXES))
@pytest.mark.parametrize("y", list(Y_AXES))
def test_every_axis_pair_draws_the_stores_front(cpu: pd.DataFrame, x: str, y: str) -> None:
    fig = pareto_figure(cpu, x, y)
    done = store_points(cpu, x, y).reset_index()
    on_front = set(done.loc[pareto_front(done, {x: "min", y: "max"}).to_numpy(), "trial_id"])
    assert {t for t, p in plotted(fig).items() if p["opacity"] == FRONT_OPACITY} == on_front
    assert fig.layout.xaxis.title.text == X_AXES[x].label
    assert fig.layout.yaxis.title.text == Y_AXES[y].label


def test_method_filter_redraws_points_and_front(cpu: pd.DataFrame) -> None:
    only_sps = apply_filter(cpu, TrialFilter(methods=("sps",)))
    assert set(only_sps["method"]) == {"sps"}
    fig = pareto_figure(only_sps, X, Y)
    points = plotted(fig)
    assert set(points) == set(store_points(only_sps).index)
    assert {p["trace"] for p in points.values()} == {"sps"}
    done = store_points(only_sps).reset_index()
    xs, _ = front_step_line(done, X, Y)
    assert list(front_trace(fig).x) == pytest.approx(xs)
    sps_front = {t for t, p in points.items() if p["opacity"] == FRONT_OPACITY}
    assert sps_front == set(done.loc[pareto_front(done, {X: "min", Y: "max"}).to_numpy(),
                                     "trial_id"])
    full_line = front_trace(pareto_figure(cpu, X, Y))
    assert list(front_trace(fig).y) != list(full_line.y)  # the tree trials left the front


def test_lossless_status_and_knob_filters(cpu: pd.DataFrame) -> None:
    lossless = apply_filter(cpu, TrialFilter(lossless_only=True))
    assert not lossless["lossy_method"].fillna(False).astype(bool).any()
    assert len(lossless) == len(cpu) - 1
    errors = apply_filter(cpu, TrialFilter(statuses=("error",)))
    assert errors["error"].tolist() == [ERROR_MESSAGE]
    assert plotted(pareto_figure(errors, X, Y)) == {}
    ranged = apply_filter(cpu, TrialFilter(knob_ranges=(("draft_len", 2, 4),)))
    assert sorted(ranged["draft_len"].astype(int)) == [2, 3, 3, 4, 4]  # sps 2-4, layerskip, pld
    bounds = knob_bounds(cpu)
    assert bounds["draft_len"] == (1.0, 8.0) and bounds["node_budget"] == (8.0, 64.0)
    assert "temperature" not in bounds  # one value: nothing to filter


def test_parallel_coordinates_hold_the_stores_values(cpu: pd.DataFrame) -> None:
    fig = parallel_figure(cpu, X, Y)
    dims = {d.label: d for d in fig.data[0].dimensions}
    done = store_points(cpu).reset_index()
    assert list(dims["method"].ticktext) == sorted(done["method"].unique())
    decoded = [dims["method"].ticktext[int(v)] for v in dims["method"].values]
    assert decoded == done["method"].tolist()
    assert list(dims["speedup"].values) == pytest.approx(done[Y].tolist())
    assert list(dims["tree tok/step"].values) == pytest.approx(done[X].tolist())
    # A knob other methods lack: its own "n/a" tick, values otherwise exact.
    draft = dims["draft_len"]
    sentinel = draft.tickvals[list(draft.ticktext).index("n/a")]
    for value, stored in zip(draft.values, done["draft_len"]):
        assert value == (sentinel if pd.isna(stored) else stored)
    assert "temperature" not in dims
    assert list(fig.data[0].line.color) == pytest.approx(done[Y].tolist())


def test_speedup_per_method_boxes(cpu: pd.DataFrame) -> None:
    fig = method_speedup_figure(cpu)
    done = store_points(cpu)
    assert {t.name for t in fig.data} == set(done["method"])
    for box in fig.data:
        stored = done[done["method"] == box.name]
        assert sorted(box.y) == pytest.approx(sorted(stored["speedup"]))
        assert sorted(box.customdata) == sorted(stored.index)


def test_per_position_acceptance_and_exit_layers(cpu: pd.DataFrame, store: Store) -> None:
    done = store_points(cpu).reset_index()
    front = done[front_of(done, X, Y).to_numpy()]
    fig = position_acceptance_figure(front)
    assert len(fig.data) == len(front)
    for bar, (_, row) in zip(fig.data, front.iterrows()):
        assert list(bar.y) == pytest.approx(row["acceptance_by_position"])
        assert list(bar.x) == list(range(1, len(row["acceptance_by_position"]) + 1))
        assert bar.name.startswith(f"#{row['trial_id']} ")
    layerskip = int(cpu.loc[cpu["method"] == "layerskip", "trial_id"].iloc[0])
    by_layer = store.trial_detail(layerskip)["metrics"]["acceptance_by_exit_layer"]
    bars = exit_layer_figure(by_layer).data[0]
    assert list(bars.x) == ["1", "2", "3"]
    assert list(bars.y) == pytest.approx([by_layer[k] for k in ("1", "2", "3")])


def test_two_sweeps_fronts_on_one_plot(store: Store) -> None:
    both = store.trials_frame(["quick-cpu", "quick-gpu"])
    fig = compare_fronts_figure(both, X, Y, ["quick-cpu", "quick-gpu"])
    for sweep in ("quick-cpu", "quick-gpu"):
        points = next(t for t in fig.data if t.name == sweep)
        done = store_points(both[both["sweep"] == sweep]).reset_index()
        assert sorted(int(c[0]) for c in points.customdata) == sorted(done["trial_id"])
        xs, ys = front_step_line(done, X, Y)
        line = front_trace(fig, f"{sweep} front")
        assert list(line.x) == pytest.approx(xs) and list(line.y) == pytest.approx(ys)
        assert line.line.color == points.marker.color
    cpu_front = front_trace(fig, "quick-cpu front")
    gpu_front = front_trace(fig, "quick-gpu front")
    assert max(gpu_front.y) > max(cpu_front.y)  # the seeded GPU sweep is faster


def test_trial_table_rows_sorting_and_errors(cpu: pd.DataFrame) -> None:
    table = trial_table(cpu, X, Y, sort_by="speedup", descending=True)
    assert sorted(table["trial"]) == sorted(cpu["trial_id"])
    speeds = table["speedup"].dropna().tolist()
    assert speeds == sorted(speeds, reverse=True)
    assert table["speedup"].iloc[-2:].isna().all()  # error and pending trials last
    done = store_points(cpu).reset_index()
    front = set(done.loc[front_of(done, X, Y).to_numpy(), "trial_id"])
    assert set(table.loc[table["on front"], "trial"]) == front
    failed = table[table["status"] == "error"]
    assert failed["error"].tolist() == [ERROR_MESSAGE]
    by_id = table.set_index("trial")
    lossy_id = int(cpu.loc[cpu["lossy_method"].fillna(False).astype(bool), "trial_id"].iloc[0])
    assert by_id.loc[lossy_id, "lossless"] == "lossy method"
    ascending = trial_table(cpu, X, Y, sort_by="tree_tokens_per_step", descending=False)
    costs = ascending["tree tok/step"].dropna().tolist()
    assert costs == sorted(costs)


def test_labels_and_lossless_text() -> None:
    assert config_label({"method": "sps", "draft_len": 4}) == "sps(draft_len=4)"
    assert config_label({"method": "tree", "knobs": {"tree_shape": [3, 2]}}) == \
        "tree(tree_shape=[3,2])"
    assert config_label({}, "pld", {"label": "pld(ngram=3)"}) == "pld(ngram=3)"
    assert lossless_text({"lossless": True, "lossy_method": False}) == "yes"
    assert lossless_text({"lossless": False, "lossy_method": False, "mismatches": 2}) == \
        "NO (2 prompts differ)"
    assert lossless_text({"lossless": None, "lossy_method": False}) == "unchecked (sampling)"


def test_axis_choices_skip_empty_metrics(cpu: pd.DataFrame) -> None:
    no_share = cpu.assign(draft_share=float("nan"))
    assert "draft_share" not in axis_choices(no_share, X_AXES)
    assert axis_choices(cpu, Y_AXES) == list(Y_AXES)


def test_wide_cost_range_gets_a_log_axis(cpu: pd.DataFrame) -> None:
    assert pareto_figure(cpu, X, Y).layout.xaxis.type == "log"  # 2 .. 45 tree tokens
    assert pareto_figure(cpu, "ms_per_token", Y).layout.xaxis.type != "log"


def test_dashboard_command_runs_the_installed_app_headless() -> None:
    from spectune.cli.dashboard_cmd import app_path, streamlit_command

    assert app_path().is_file() and app_path().name == "app.py"
    command = streamlit_command("127.0.0.1", 8765)
    assert command[1:4] == ["-m", "streamlit", "run"] and command[4] == str(app_path())
    flags = dict(zip(command[5::2], command[6::2]))
    assert flags["--server.headless"] == "true"
    assert flags["--server.port"] == "8765" and flags["--server.address"] == "127.0.0.1"


def test_an_unchecked_sampling_trial_is_off_the_front_unless_counted(cpu: pd.DataFrame) -> None:
    from spectune.dashboard.figures import UNCHECKED_SYMBOL

    frame = cpu.copy()
    done = frame[(frame["status"] == "done") & ~frame["lossy_method"].fillna(False).astype(bool)]
    sampled = done.index[0]
    frame.loc[sampled, "lossless"] = pd.NA  # as a trial at T > 0 stores it
    frame.loc[sampled, "speedup"] = float(cpu["speedup"].max()) + 1.0
    trial_id = int(frame.loc[sampled, "trial_id"])
    point = plotted(pareto_figure(frame, X, Y))[trial_id]
    assert point["symbol"] == UNCHECKED_SYMBOL and point["opacity"] != FRONT_OPACITY
    counted = plotted(pareto_figure(frame, X, Y, include_unchecked=True))[trial_id]
    assert counted["opacity"] == FRONT_OPACITY
    table = trial_table(frame, X, Y).set_index("trial")
    assert table.loc[trial_id, "lossless"] == "unchecked (sampling)" and not table.loc[trial_id, "on front"]
    assert trial_table(frame, X, Y, include_unchecked=True).set_index("trial").loc[trial_id, "on front"]


def test_speedup_intervals_are_error_bars_and_overlaps_are_marked(cpu: pd.DataFrame) -> None:
    from spectune.dashboard.figures import NOISE_SYMBOL
    from spectune.pareto import within_noise

    frame = cpu.copy()
    frame["speedup_ci_low"] = frame["speedup"] - 0.3  # wide enough that some points are within noise
    frame["speedup_ci_high"] = frame["speedup"] + 0.1
    fig = pareto_figure(frame, X, Y)
    points = plotted(fig)
    for trace in method_traces(fig):
        assert list(trace.error_y.array) == pytest.approx([0.1] * len(trace.x))
        assert list(trace.error_y.arrayminus) == pytest.approx([0.3] * len(trace.x))
    done = store_points(frame).reset_index()
    noisy = within_noise(done, pareto_front(done, {X: "min", Y: "max"}), X) & ~done["lossy_method"].astype(bool)
    assert noisy.any()
    assert {t for t, p in points.items() if p["symbol"] == NOISE_SYMBOL} == set(done.loc[noisy, "trial_id"])
    table = trial_table(frame, X, Y).set_index("trial")
    some = int(done["trial_id"].iloc[0])
    row = done.iloc[0]
    assert table.loc[some, "speedup 95% CI"] == f"{row['speedup'] - 0.3:.2f}-{row['speedup'] + 0.1:.2f}x"
