"""The Streamlit app (dashboard/app.py) run by Streamlit's AppTest on real stores.

A SQLite store is seeded through the store's writer API (tests/dashboard_seed.py: two
sweeps, an errored trial, a lossy one, a pending one); the tests read back what the app
drew (the plotly figures' JSON, the table's frame, messages) and compare it with the store
and `spectune.pareto`. Widgets are driven as a user would: pickers, filters, buttons.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
import streamlit as st
from streamlit.testing.v1 import AppTest

from dashboard_seed import CONFIGS, ERROR_MESSAGE, GPU_HW, metrics, seed_store
from spectune.config import DecodeConfig
from spectune.pareto import front_step_line, pareto_front
from spectune.store import Store, connect, resolve_url

PG_URL = os.environ.get("SPECTUNE_TEST_PG_URL")
APP = Path(__file__).resolve().parents[2] / "dashboard" / "app.py"
X, Y = "tree_tokens_per_step", "speedup"
TIMEOUT_S = 60


@pytest.fixture
def seeded(tmp_path: Path) -> Iterator[tuple[str, Store]]:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    store = seed_store(url)
    yield url, store
    store.close()


def app_on(url: str, monkeypatch: pytest.MonkeyPatch) -> AppTest:
    """The app reading ``url`` (as `spectune dashboard --db URL` sets it), first run done."""
    monkeypatch.setenv("SPECTUNE_DB", url)
    st.cache_data.clear()  # AppTest shares the process: no reads cached by an earlier test
    st.cache_resource.clear()
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT_S).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def rerun(at: AppTest) -> AppTest:
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def pick_sweep(at: AppTest, name: str) -> AppTest:
    at.sidebar.selectbox(key="sweep").set_value(name)
    return rerun(at)


def _array(values: Any) -> list[Any]:
    """Plotly's JSON holds numeric arrays as {"dtype", "bdata"} (base64) or as lists."""
    if isinstance(values, dict) and "bdata" in values:
        return np.frombuffer(base64.b64decode(values["bdata"]), dtype=values["dtype"]).tolist()
    return list(values)


def chart(at: AppTest, key: str) -> dict[str, Any]:
    found = [e for e in at.get("plotly_chart") if e.key == key]
    assert found, f"no chart {key!r}; have {[e.key for e in at.get('plotly_chart')]}"
    return json.loads(found[0].proto.spec)


def drawn_points(fig: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """trial id -> x, y, opacity, symbol, trace of each point of a Pareto chart."""
    points = {}
    for trace in fig["data"]:
        if not trace.get("customdata"):
            continue
        xs, ys = _array(trace["x"]), _array(trace["y"])
        marker = trace["marker"]
        for i, custom in enumerate(trace["customdata"]):
            points[int(custom[0])] = {"x": xs[i], "y": ys[i], "opacity": marker["opacity"][i],
                                      "symbol": marker["symbol"][i], "trace": trace["name"]}
    return points


def front_ids(points: dict[int, dict[str, Any]]) -> set[int]:
    return {t for t, p in points.items() if p["opacity"] == 1.0}


def store_front(frame: pd.DataFrame, x: str = X, y: str = Y) -> tuple[set[int], list[float]]:
    """Front trial ids and the step line's xs, as `spectune.pareto` computes them."""
    done = frame[(frame["status"] == "done") & frame[[x, y]].notna().all(axis=1)]
    ids = set(done.loc[pareto_front(done, {x: "min", y: "max"}).to_numpy(), "trial_id"])
    return ids, front_step_line(done, x, y)[0]


def front_line(fig: dict[str, Any]) -> list[float]:
    return _array(next(t for t in fig["data"] if t["name"] == "Pareto front (lossless)")["x"])


def texts(elements: Any) -> str:
    return "\n".join(str(e.value) for e in elements)


# --- what the store holds is what is drawn ---------------------------------------------------


def test_front_points_and_membership_equal_the_store(seeded: tuple[str, Store],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    url, store = seeded
    at = app_on(url, monkeypatch)
    assert "quick-gpu" in texts(at.markdown)  # the newest sweep opens first
    at = pick_sweep(at, "quick-cpu")
    frame = store.trials_frame("quick-cpu")
    points = drawn_points(chart(at, "front_quick-cpu"))
    done = frame[frame["status"] == "done"].set_index("trial_id")
    assert set(points) == set(done.index) and len(points) == len(CONFIGS)
    for trial_id, point in points.items():
        assert point["x"] == pytest.approx(done.loc[trial_id, X])
        assert point["y"] == pytest.approx(done.loc[trial_id, Y])
        assert point["trace"] == done.loc[trial_id, "method"]
    ids, xs = store_front(frame)
    assert front_ids(points) == ids
    assert front_line(chart(at, "front_quick-cpu")) == pytest.approx(xs)
    lossy = int(frame.loc[frame["lossy_method"].fillna(False).astype(bool), "trial_id"].iloc[0])
    assert points[lossy]["symbol"] != "circle" and lossy not in ids


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh schema on the test PostgreSQL server (dropped afterwards)."""
    schema = f"dash_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(resolve_url(PG_URL))
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield sa.make_url(resolve_url(PG_URL)).update_query_dict(
            {"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False)
    finally:
        st.cache_resource.clear()  # the app's pooled connections, before the schema goes
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.mark.postgres
@pytest.mark.skipif(not PG_URL, reason="SPECTUNE_TEST_PG_URL not set: no PostgreSQL server "
                    "(start one with `eval \"$(.ci/postgres.sh)\"`)")
def test_front_equals_the_store_on_postgresql(pg_url: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    store = seed_store(pg_url)
    try:
        at = pick_sweep(app_on(pg_url, monkeypatch), "quick-cpu")
        frame = store.trials_frame("quick-cpu")
        points = drawn_points(chart(at, "front_quick-cpu"))
        assert set(points) == set(frame.loc[frame["status"] == "done", "trial_id"])
        assert front_ids(points) == store_front(frame)[0]
        assert "spectune:***@" in texts(at.sidebar.caption)  # the password never shows
    finally:
        store.close()


def test_trial_table_lists_every_trial_with_errors(seeded: tuple[str, Store],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    url, store = seeded
    at = pick_sweep(app_on(url, monkeypatch), "quick-cpu")
    table = at.dataframe(key="table_quick-cpu").value
    frame = store.trials_frame("quick-cpu")
    assert sorted(table["trial"]) == sorted(frame["trial_id"])
    assert table["speedup"].dropna().tolist() == sorted(frame["speedup"].dropna(), reverse=True)
    assert table.loc[table["status"] == "error", "error"].tolist() == [ERROR_MESSAGE]
    assert set(table.loc[table["on front"], "trial"]) == store_front(frame)[0]
    assert any(ERROR_MESSAGE in e.value for e in at.error)  # errors are shown, not only listed
    at.selectbox(key="sort_quick-cpu").set_value("tree_tokens_per_step")
    at.toggle(key="sort_desc_quick-cpu").set_value(False)
    table = rerun(at).dataframe(key="table_quick-cpu").value
    costs = table["tree tok/step"].dropna().tolist()
    assert costs == sorted(costs)


def test_filters_change_the_figures_and_the_table(seeded: tuple[str, Store],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    url, store = seeded
    at = pick_sweep(app_on(url, monkeypatch), "quick-cpu")
    frame = store.trials_frame("quick-cpu")

    at.multiselect(key="f_methods_quick-cpu").set_value(["sps"])
    at = rerun(at)
    sps = frame[frame["method"] == "sps"]
    points = drawn_points(chart(at, "front_quick-cpu"))
    assert set(points) == set(sps.loc[sps["status"] == "done", "trial_id"])
    assert front_ids(points) == store_front(sps)[0]
    assert sorted(at.dataframe(key="table_quick-cpu").value["trial"]) == sorted(sps["trial_id"])
    boxes = chart(at, "methods_quick-cpu")["data"]
    assert [b["name"] for b in boxes] == ["sps"]

    at.multiselect(key="f_methods_quick-cpu").set_value([])
    at.toggle(key="f_lossless_quick-cpu").set_value(True)
    at = rerun(at)
    points = drawn_points(chart(at, "front_quick-cpu"))
    lossy = set(frame.loc[frame["lossy_method"].fillna(False).astype(bool), "trial_id"])
    assert lossy and not lossy & set(points)
    assert len(points) == len(CONFIGS) - len(lossy)

    at.toggle(key="f_lossless_quick-cpu").set_value(False)
    at.slider(key="f_draft_len_quick-cpu").set_value((2.0, 4.0))
    at = rerun(at)
    in_range = frame[frame["draft_len"].astype("Float64").between(2, 4).fillna(False)
                     .astype(bool)]
    assert set(drawn_points(chart(at, "front_quick-cpu"))) == set(
        in_range.loc[in_range["status"] == "done", "trial_id"])
    parallel = chart(at, "parallel_quick-cpu")["data"][0]["dimensions"]
    draft = next(d for d in parallel if d["label"] == "draft_len")
    assert sorted(_array(draft["values"])) == sorted(in_range.loc[
        in_range["status"] == "done", "draft_len"].astype(float))

    at.slider(key="f_draft_len_quick-cpu").set_value((1.0, 8.0))
    at.multiselect(key="f_status_quick-cpu").set_value(["error"])
    at = rerun(at)
    assert drawn_points(chart(at, "front_quick-cpu")) == {}
    assert at.dataframe(key="table_quick-cpu").value["error"].tolist() == [ERROR_MESSAGE]


def test_axis_pickers_redraw_the_front(seeded: tuple[str, Store],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    url, store = seeded
    at = pick_sweep(app_on(url, monkeypatch), "quick-cpu")
    frame = store.trials_frame("quick-cpu")
    at.selectbox(key="y_quick-cpu").set_value("mean_accepted_tokens")
    at.selectbox(key="x_quick-cpu").set_value("draft_calls_per_step")
    at = rerun(at)
    fig = chart(at, "front_quick-cpu")
    assert fig["layout"]["yaxis"]["title"]["text"].startswith("mean accepted tokens")
    assert fig["layout"]["xaxis"]["title"]["text"] == "drafter passes per step"
    ids, xs = store_front(frame, "draft_calls_per_step", "mean_accepted_tokens")
    assert front_ids(drawn_points(fig)) == ids
    assert front_line(fig) == pytest.approx(xs)
    assert ids != store_front(frame)[0]


# --- one trial --------------------------------------------------------------------------------


def test_trial_detail_and_serve_button(seeded: tuple[str, Store],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    url, store = seeded
    at = pick_sweep(app_on(url, monkeypatch), "quick-cpu")
    frame = store.trials_frame("quick-cpu")
    ids = store_front(frame)[0]
    best = int(frame[frame["trial_id"].isin(ids)].sort_values(Y).iloc[-1]["trial_id"])
    picker = at.selectbox(key="open_trial_quick-cpu")
    assert picker.value == best  # the best lossless trial of the front opens by default
    assert any(f"Trial {best}" in m for m in at.markdown.values)
    detail = store.trial_detail(best)
    bars = chart(at, f"detail_positions_{best}")["data"][0]
    assert _array(bars["y"]) == pytest.approx(detail["metrics"]["acceptance_by_position"])
    assert any("Lossless: greedy outputs equal plain decoding on all 4 prompts" in s.value
               for s in at.success)

    layerskip = int(frame.loc[frame["method"] == "layerskip", "trial_id"].iloc[0])
    picker.set_value(layerskip)
    at = rerun(at)
    exits = chart(at, f"detail_exit_{layerskip}")["data"][0]
    stored = store.trial_detail(layerskip)["metrics"]["acceptance_by_exit_layer"]
    assert _array(exits["y"]) == pytest.approx([stored[k] for k in sorted(stored)])
    per_prompt = [d for d in at.dataframe if list(d.value.columns[:2]) == ["prompt_id",
                                                                             "new_tokens"]]
    assert per_prompt[0].value["prompt_id"].tolist() == [
        p["prompt_id"] for p in store.trial_detail(layerskip)["per_prompt"]]

    assert store.served_trial() is None
    at.button(key=f"serve_{layerskip}").click()
    at = rerun(at)
    assert store.served_trial() == layerskip
    assert any(f"Trial {layerskip} is now the configuration the endpoint serves" in s.value
               for s in at.success)
    at = rerun(at)
    assert any("The live endpoint serves this configuration" in i.value for i in at.info)

    errored = int(frame.loc[frame["status"] == "error", "trial_id"].iloc[0])
    at.selectbox(key="open_trial_quick-cpu").set_value(errored)
    at = rerun(at)
    assert any(ERROR_MESSAGE in e.value and "Trial failed" in e.value for e in at.error)


def test_lossy_trial_detail_says_so(seeded: tuple[str, Store],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    url, store = seeded
    at = pick_sweep(app_on(url, monkeypatch), "quick-cpu")
    frame = store.trials_frame("quick-cpu")
    lossy = int(frame.loc[frame["lossy_method"].fillna(False).astype(bool), "trial_id"].iloc[0])
    at.selectbox(key="open_trial_quick-cpu").set_value(lossy)
    at = rerun(at)
    assert any("Lossy by design" in w.value for w in at.warning)


# --- two sweeps, live data --------------------------------------------------------------------


def test_two_sweeps_side_by_side(seeded: tuple[str, Store],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    url, store = seeded
    at = app_on(url, monkeypatch)
    assert at.multiselect(key="compare_sweeps").value == ["quick-gpu", "quick-cpu"]
    fig = chart(at, "compare_chart")
    both = store.trials_frame(["quick-cpu", "quick-gpu"])
    for sweep in ("quick-cpu", "quick-gpu"):
        frame = both[both["sweep"] == sweep]
        trace = next(t for t in fig["data"] if t["name"] == sweep)
        done = frame.loc[frame["status"] == "done", "trial_id"]
        assert sorted(int(c[0]) for c in trace["customdata"]) == sorted(done)
        line = next(t for t in fig["data"] if t["name"] == f"{sweep} front")
        assert _array(line["x"]) == pytest.approx(store_front(frame)[1])
    summary = [d.value for d in at.dataframe if "best configuration" in d.value.columns][0]
    assert summary["sweep"].tolist() == ["quick-gpu", "quick-cpu"]
    assert summary["hardware"].iloc[0].startswith("cuda · NVIDIA H200")


def test_running_sweep_refreshes_with_new_trials(seeded: tuple[str, Store],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    url, store = seeded
    at = app_on(url, monkeypatch)
    assert any("live: refreshing every 5 s" in c.value for c in at.sidebar.caption)
    before = drawn_points(chart(at, "front_quick-gpu"))
    config = {"method": "sps", "draft_len": 8}
    store.record_result("quick-gpu", "sps-k8", metrics(config, GPU_HW), GPU_HW.spec)
    time.sleep(2.2)  # past the query cache's TTL: the next (live) run reads the store again
    after = drawn_points(chart(rerun(at), "front_quick-gpu"))
    new = set(after) - set(before)
    assert len(new) == 1
    assert store.trial_detail(new.pop())["trial_key"] == "sps-k8"


# --- empty, unfinished, unreachable ----------------------------------------------------------


def test_empty_store_says_what_to_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = app_on(f"sqlite:///{tmp_path / 'empty.db'}", monkeypatch)
    assert any("No sweeps yet" in i.value for i in at.info)
    page = texts(at.markdown)
    assert "make demo" in page and "spectune sweep sweeps/specs/quick.yaml" in page
    assert not at.get("plotly_chart")


def test_sweep_without_finished_trials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    with connect(url) as store:
        store.create_sweep("just-started", {"name": "quick"})
        store.set_sweep_status("just-started", "running")
        store.upsert_trial("just-started", "sps-k2", DecodeConfig("sps", {"draft_len": 2}), "running")
        store.record_error("just-started", "sps-k9", "RuntimeError: worker died")
    at = app_on(url, monkeypatch)
    assert any("No finished trials yet" in i.value and "just-started" in i.value for i in at.info)
    assert any("RuntimeError: worker died" in e.value for e in at.error)
    assert not at.get("plotly_chart") or all(e.key != "front_just-started"
                                             for e in at.get("plotly_chart"))


def test_unreachable_database_shows_url_and_error(monkeypatch: pytest.MonkeyPatch) -> None:
    at = app_on("postgresql+psycopg://spectune:s3cretpw@127.0.0.1:1/spectune", monkeypatch)
    page = texts(at.error) + texts(at.code) + texts(at.markdown)
    assert "Cannot reach the results database" in page
    assert "postgresql+psycopg://spectune:***@127.0.0.1:1/spectune" in page
    assert "s3cretpw" not in page
    assert "refused" in texts(at.code).lower() or "connect" in texts(at.code).lower()
    assert not at.exception


def test_store_failing_while_open_shows_the_error(seeded: tuple[str, Store],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    url, store = seeded
    at = app_on(url, monkeypatch)
    with store.engine.begin() as conn:  # e.g. someone restored an old, broken copy
        conn.exec_driver_sql("DROP TABLE prompt_results")
        conn.exec_driver_sql("DROP TABLE trial_metrics")
    time.sleep(2.2)  # past the query cache's TTL
    at = rerun(at)
    assert any("A query on the results database failed" in e.value for e in at.error)
    assert "no such table: trial_metrics" in texts(at.code)


# --- try it live ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_live_panel_says_when_the_endpoint_is_down(seeded: tuple[str, Store],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    url, _ = seeded
    at = app_on(url, monkeypatch)
    at.sidebar.text_input(key="endpoint").set_value(f"http://127.0.0.1:{free_port()}")
    at.button(key="live_go").click()
    at = rerun(at)
    assert any("No answer from the endpoint" in e.value for e in at.error)


@pytest.fixture
def live_endpoint(micro_pair: Path) -> Iterator[str]:
    """The real endpoint app (FastAPI, `spectune.workers`) on the micro pair, over HTTP."""
    import uvicorn

    from spectune.workers.serve.completion import SpectuneCompletionService
    from spectune.workers.serve.app import build_app
    from spectune.pair_ref import PairRef
    from spectune.workers.serve.served_config import ServedConfig, ServedSource

    served = ServedConfig(
        pair=PairRef(target=str(micro_pair / "target"), drafter=str(micro_pair / "drafter"),
                     device="cpu"),
        method="sps", knobs={"draft_len": 3}, model_id="micro-sps",
        source=ServedSource(kind="config_file", path="test"))
    service = SpectuneCompletionService.load(served)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(service), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "endpoint did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        service.close()


@pytest.mark.slow
def test_live_panel_streams_an_answer_with_stats(seeded: tuple[str, Store], live_endpoint: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from spectune.workers.serve.client import Finished, complete

    url, _ = seeded
    at = app_on(url, monkeypatch)
    at.sidebar.text_input(key="endpoint").set_value(live_endpoint)
    at.text_area(key="live_prompt").set_value("def add(a, b):")
    at.slider(key="live_max_tokens").set_value(24)
    at.button(key="live_go").click()
    at = rerun(at)
    assert not any("endpoint" in e.value for e in at.error), [e.value for e in at.error]
    reference = [e for e in complete(live_endpoint, "def add(a, b):", max_tokens=24)
                 if isinstance(e, Finished)][0]
    assert reference.text  # greedy: the panel showed the same continuation
    assert at.code.values[-1] == "def add(a, b):" + reference.text
    shown = {m.label: m.value for m in at.metric}
    assert float(shown["tau (tokens / target pass)"]) == pytest.approx(
        reference.speculative.mean_accepted_tokens, abs=0.01)
    assert shown["speedup vs AR"].endswith("x")
    assert any("sps(draft_len=3)" in c.value for c in at.caption)
