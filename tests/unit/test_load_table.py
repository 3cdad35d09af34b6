"""Speculation under load as tables (`spectune.backends.load_table`), read from a real SQLite store: what
`spectune results` prints for a sweep with a load axis, without importing the dashboard or plotly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from spectune.config import DecodeConfig
from spectune.backends.load_table import best_per_load, on_latency_front, served_rows, speedup_table
from spectune.results import DecodeResult, StepCounts
from spectune.store import Store, connect

NGRAM = {"method": "ngram", "backend": "vllm", "num_speculative_tokens": 3}
AR = {"method": "ar", "backend": "vllm"}
# (configuration, concurrency) -> (speedup, tokens/s, p95 latency s)
POINTS = {
    ("ngram", 1): (1.4, 140.0, 0.9), ("ngram", 4): (0.9, 360.0, 1.6),
    ("ar", 1): (1.0, 100.0, 1.0), ("ar", 4): (1.0, 400.0, 1.5),
}


def served(flat: dict, concurrency: int, speedup: float, tokens_per_s: float, p95: float) -> DecodeResult:
    config = DecodeConfig.from_dict({**flat, "concurrency": concurrency})
    return DecodeResult(config=config, n_prompts=4, counts=StepCounts(new_tokens=64, target_calls=32, draft_calls=0),
                        wall_s=1.0, tokens_per_s=tokens_per_s, ar_tokens_per_s=tokens_per_s / speedup,
                        speedup=speedup, p50_latency_s=p95 / 2, p95_latency_s=p95)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    store = connect(f"sqlite:///{tmp_path / 'store.db'}")
    store.create_sweep("load", {})
    for (method, load), point in POINTS.items():
        store.record_result("load", f"{method}-{load}", served(NGRAM if method == "ngram" else AR, load, *point), None)
    store.record_result("load", "engine", served({"method": "sps", "draft_len": 4}, 1, 2.0, 200.0, 0.5), None)
    yield store
    store.close()


NGRAM_LABEL = "vllm:ngram(num_speculative_tokens=3)"


def test_only_trials_measured_under_load_are_served_rows(store):
    rows = served_rows(store.trials_frame("load"))
    assert sorted(rows["configuration"].unique()) == ["vllm:ar", NGRAM_LABEL]  # spectune's own engine row left out
    assert len(rows) == 4


def test_the_speedup_table_and_the_best_configuration_per_load(store):
    frame = store.trials_frame("load")
    table = speedup_table(frame)
    assert list(table.columns) == ["c=1", "c=4"]
    assert table.loc[NGRAM_LABEL].tolist() == [1.4, 0.9] and table.loc["vllm:ar"].tolist() == [1.0, 1.0]
    best = best_per_load(frame)
    assert best["concurrency"].tolist() == [1, 4]
    assert best["best configuration"].tolist() == [NGRAM_LABEL, "vllm:ar"]  # speculation stops paying at 4
    front = on_latency_front(frame)
    on = served_rows(frame).loc[front[front].index, ["configuration", "concurrency"]]
    assert sorted(map(tuple, on.to_numpy().tolist())) == [("vllm:ar", 4), (NGRAM_LABEL, 1)]


def test_spectune_results_prints_the_load_table_without_the_dashboard(store, tmp_path):
    script = (
        "import sys\n"
        "from typer.main import get_command\n"
        "from spectune.cli import app\n"
        "try:\n"
        f"    get_command(app)(['results', 'load', '--db', {json.dumps(store.url)}], standalone_mode=False)\n"
        "finally:\n"
        "    sys.stdout.flush()\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('plotly', 'streamlit')"
        " or m.startswith('spectune.dashboard.'))\n"
        "print('LOADED', loaded)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={"COLUMNS": "200", "PATH": ""}, check=False)
    assert out.returncode == 0, out.stderr
    assert "speedup by load" in out.stdout and "1.40★" in out.stdout
    assert "LOADED []" in out.stdout


def test_the_dashboards_load_figures_draw_the_tables_rows(store):
    from spectune.dashboard.load_view import latency_front_figure, speedup_vs_concurrency_figure

    frame = store.trials_frame("load")
    table = speedup_table(frame)
    curves = {trace.name: trace for trace in speedup_vs_concurrency_figure(frame).data}
    assert set(curves) == set(table.index)
    for label, curve in curves.items():
        assert list(curve.x) == [1, 4] and list(curve.y) == table.loc[label].tolist()
    points = [t for t in latency_front_figure(frame).data if t.mode == "markers"]
    assert sorted(t.name for t in points) == ["c=1", "c=4"] and all(len(t.x) == 2 for t in points)
