"""The results store on SQLite (always) and PostgreSQL (when $SPECTUNE_TEST_PG_URL is set).

Start a local PostgreSQL with `eval "$(.ci/postgres.sh)"`. Every PostgreSQL test runs in
a fresh schema (dropped afterwards), so tests never see each other's tables.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
import typer
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from typer.testing import CliRunner

from spectune.cli import store_cmd
from spectune.config import DecodeConfig, KnobColumns
from spectune.results import BaselineResult, DecodeResult
from spectune.store import (
    FRAME_COLUMNS, Store, StoreUnavailable, SweepExists, UnknownSweep, UnknownTrial, alembic_config,
    connect, resolve_url,
)
from spectune.store.schema import Base
from spectune.store.writer import result_row

PG_URL = os.environ.get("SPECTUNE_TEST_PG_URL")
TABLES = {"sweeps", "trials", "trial_metrics", "prompt_results", "hardware", "ar_baselines",
          "serving", "alembic_version"}

CPU = {"device": "cpu", "cpu_model": "Test CPU 9000", "gpu_model": None, "n_cpus": 2,
       "torch_version": "2.13.0", "transformers_version": "5.0.0", "hostname": "box"}
GPU = {**CPU, "device": "cuda", "gpu_model": "NVIDIA H200", "n_cpus": 16}


@pytest.fixture(params=[
    "sqlite",
    pytest.param("postgresql", marks=[
        pytest.mark.postgres,
        pytest.mark.skipif(not PG_URL, reason="SPECTUNE_TEST_PG_URL not set: no PostgreSQL "
                           "server (start one with `eval \"$(.ci/postgres.sh)\"`)"),
    ]),
])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'sub' / 'store.db'}"
        return
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(resolve_url(PG_URL))
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    try:
        url = sa.make_url(resolve_url(PG_URL)).update_query_dict(
            {"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    s = connect(db_url)
    yield s
    s.close()


def metrics(speedup: float = 1.5, **options: Any) -> DecodeResult:
    """One configuration's result as `spectune bench` measures it (see `bench_row` for its fields)."""
    return DecodeResult.from_dict(bench_row(speedup, **options))


def config(flat: dict[str, Any], **columns: Any) -> DecodeConfig:
    """A trial's configuration with the knob columns its method would declare."""
    return DecodeConfig.from_dict(flat, KnobColumns(**columns))


def written(result: DecodeResult) -> dict[str, Any]:
    """The flat row the store keeps for a result: what reading it back must give."""
    return result_row(result)


def bench_row(speedup: float = 1.5, *, lossless: bool | None = True, lossy: bool = False,
        cost: float = 4.0, n_prompts: int = 2, **over: Any) -> dict[str, Any]:
    """A dict shaped like one configuration of `spectune bench --json`."""
    m = {
        "method": "sps", "config": {"method": "sps", "draft_len": 4}, "n_prompts": n_prompts,
        "new_tokens": 96 * n_prompts, "target_calls": 40 * n_prompts, "draft_calls": 160,
        "mean_accepted_tokens": 2.4, "acceptance_rate": 0.35,
        "acceptance_by_position": [0.7, 0.4, 0.2, 0.1], "wall_s": 1.25, "wall_s_std": 0.05,
        "tokens_per_s": 150.0 * speedup, "ar_tokens_per_s": 150.0, "speedup": speedup,
        "speedup_std": 0.02, "lossless": lossless, "lossy_method": lossy,
        "mismatches": 0 if lossless else 1, "tree_tokens_per_step": cost,
        "draft_calls_per_step": 4.0, "draft_share": 0.3, "ms_per_token": 1000 / (150 * speedup),
        "peak_mem_mb": None, "acceptance_by_exit_layer": {"2": 0.5, "4": 0.75},
        "per_prompt": [
            {"prompt_id": f"code-{i:02d}", "new_tokens": 96, "target_calls": 40,
             "mean_accepted_tokens": 2.4, "wall_s": 0.6, "matches_ar": lossless}
            for i in range(n_prompts)
        ],
        "label": "sps(draft_len=4)", "speedups": [speedup, speedup],  # extra keys
    }
    m.update(over)
    return m


def without_prompts(m: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in m.items() if k != "per_prompt"}


def count(store: Store, table: str) -> int:
    with store.engine.connect() as conn:
        return conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one()


# --- schema and migrations ----------------------------------------------------------------------


def test_migrations_create_schema_matching_the_orm(store: Store, db_url: str) -> None:
    insp = sa.inspect(store.engine)
    assert set(insp.get_table_names()) == TABLES
    head = ScriptDirectory.from_config(alembic_config(db_url)).get_current_head()
    with store.engine.connect() as conn:
        assert MigrationContext.configure(conn).get_current_revision() == head
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
        # The comparison is live: a column the migrations lack is reported.
        extra = sa.MetaData()
        for table in Base.metadata.sorted_tables:
            table.to_metadata(extra)
        extra.tables["trials"].append_column(sa.Column("not_migrated", sa.Integer()))
        assert compare_metadata(MigrationContext.configure(conn), extra)
    command.check(alembic_config(db_url))  # `alembic check`: env.py opening its own engine


def test_connect_again_is_a_no_op_and_downgrade_round_trips(store: Store, db_url: str) -> None:
    store.create_sweep("keep", {"a": 1})
    again = connect(db_url)
    assert again.get_sweep("keep") is not None
    again.close()
    with store.engine.begin() as conn:
        command.downgrade(alembic_config(db_url, conn), "base")
    assert set(sa.inspect(store.engine).get_table_names()) == {"alembic_version"}
    store.close()
    fresh = connect(db_url)
    assert set(sa.inspect(fresh.engine).get_table_names()) == TABLES
    fresh.close()


@pytest.mark.timeout(60)
def test_concurrent_first_connects_migrate_once(db_url: str) -> None:
    """A sweep driver and a dashboard starting together on a fresh database both work."""
    from concurrent.futures import ThreadPoolExecutor

    def open_and_write(i: int) -> int:
        s = connect(db_url)
        try:
            return s.create_sweep(f"s{i}", {})
        finally:
            s.close()

    with ThreadPoolExecutor(6) as pool:
        ids = list(pool.map(open_and_write, range(6)))
    assert len(set(ids)) == 6
    store = connect(db_url)
    assert len(store.list_sweeps()) == 6
    store.close()


@pytest.mark.timeout(60)
def test_concurrent_writers_and_readers(store: Store, db_url: str) -> None:
    """Two stores (say the sweep driver and the dashboard's "serve this") write at once."""
    from concurrent.futures import ThreadPoolExecutor

    other = connect(db_url)
    store.create_sweep("s", {})

    def work(i: int) -> int:
        s = store if i % 2 else other
        s.upsert_trial("s", f"k{i % 10}", config({"method": "sps", "draft_len": i}, draft_len=i), "running")
        tid = s.record_result("s", f"k{i % 10}", metrics(1.0 + i), CPU)
        try:
            s.mark_served(tid)
        except ValueError as err:  # threads i and i + 10 share a trial: the other may have re-opened it
            assert "is running; only finished trials can be served" in str(err)
        return len(s.trials_frame("s"))

    with ThreadPoolExecutor(6) as pool:
        assert max(pool.map(work, range(30))) <= 10
    other.close()
    assert (count(store, "trials"), count(store, "trial_metrics"), count(store, "serving")) == (10, 10, 1)


def test_sqlite_uses_wal_and_foreign_keys(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "x.db"
    store = connect(f"sqlite:///{path}")
    assert path.exists()
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    store.close()
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # persisted in the file
    raw.close()


def test_url_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_url(str(tmp_path / "a.db")) == f"sqlite:///{tmp_path / 'a.db'}"
    assert resolve_url("postgresql://u:p@h/db") == "postgresql+psycopg://u:p@h/db"
    assert resolve_url("postgres://u:p@h/db") == "postgresql+psycopg://u:p@h/db"
    monkeypatch.setenv("SPECTUNE_DB", "sqlite:////elsewhere/x.db")
    assert resolve_url(None) == "sqlite:////elsewhere/x.db"
    monkeypatch.delenv("SPECTUNE_DB")
    monkeypatch.delenv("SPECTUNE_CACHE", raising=False)  # the default store lives in the default cache
    assert resolve_url(None).endswith("/.cache/spectune/spectune.db")
    monkeypatch.setenv("SPECTUNE_CACHE", str(tmp_path / "cache"))
    assert resolve_url(None) == f"sqlite:///{tmp_path / 'cache' / 'spectune.db'}"


def test_unreachable_postgres_fails_fast_with_password_masked() -> None:
    start = time.monotonic()
    with pytest.raises(StoreUnavailable) as info:
        connect("postgresql+psycopg://x:s3cretpw@127.0.0.1:1/db")
    assert time.monotonic() - start < 30  # refused at once; the bound only means no retry loop (CI's cores are shared)
    message = str(info.value)
    assert "s3cretpw" not in message and "***" in message
    assert message.startswith("cannot reach database postgresql+psycopg://x:***@127.0.0.1:1/db: ")
    assert "\n" not in message and info.value.reason


def test_unreachable_host_times_out_within_a_few_seconds() -> None:
    start = time.monotonic()
    with pytest.raises(StoreUnavailable):
        connect("postgresql+psycopg://x:pw@10.255.255.1:5432/db")  # blackholed address
    # the driver gives up after its connect timeout (3 s), not the OS's ~2 minutes of SYN retries: a bound
    # generous enough that a loaded machine cannot fail it, still well short of what a lost timeout takes
    assert time.monotonic() - start < 60


def test_bad_sqlite_location_and_bad_url_are_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(StoreUnavailable, match="cannot reach database sqlite:///"):
        connect(f"sqlite:///{blocker / 'x.db'}")
    with pytest.raises(StoreUnavailable):
        connect("mysql+nodriver://u:p@h/db")


# --- sweeps -------------------------------------------------------------------------------------


def test_create_sweep_names_are_unique_unless_resumed(store: Store) -> None:
    spec = {"objectives": [{"metric": "speedup", "mode": "max"}], "space": {"k": [2, 4]}}
    sid = store.create_sweep("s", spec, who="ana", where={"hostname": "head", "ray_address": "ray://h:10001"})
    with pytest.raises(SweepExists, match="'s' already exists"):
        store.create_sweep("s", {"other": True})
    assert store.create_sweep("s", {"other": True}, resume=True) == sid
    row = store.get_sweep("s")
    assert row is not None
    assert (row.id, row.name, row.spec, row.status) == (sid, "s", spec, "pending")
    assert (row.who, row.hostname, row.ray_address) == ("ana", "head", "ray://h:10001")
    assert row.created_at.tzinfo is not None and row.started_at is None
    assert store.get_sweep("missing") is None
    assert store.create_sweep("t", {}, where="worker-3") != sid
    assert store.get_sweep("t").hostname == "worker-3"  # type: ignore[union-attr]


def test_sweep_status_transitions(store: Store) -> None:
    store.create_sweep("s", {})
    store.set_sweep_status("s", "running")
    first = store.get_sweep("s")
    assert first.status == "running" and first.started_at and first.finished_at is None  # type: ignore[union-attr]
    store.set_sweep_status("s", "interrupted")
    store.set_sweep_status("s", "running")  # resumed: started_at kept
    assert store.get_sweep("s").started_at == first.started_at  # type: ignore[union-attr]
    store.set_sweep_status("s", "done")
    done = store.get_sweep("s")
    assert done.status == "done" and done.finished_at >= done.started_at  # type: ignore[union-attr,operator]
    with pytest.raises(ValueError, match="must be one of"):
        store.set_sweep_status("s", "finished")
    with pytest.raises(UnknownSweep):
        store.set_sweep_status("nope", "done")


# --- trials -------------------------------------------------------------------------------------


def test_upsert_trial_is_idempotent(store: Store) -> None:
    store.create_sweep("s", {})
    cfg = {"method": "tree", "branching": [4, 2, 1], "node_budget": 12, "temperature": 0.0}
    typed = config(cfg, tree_shape="[4,2,1]", node_budget=12)
    tid = store.upsert_trial("s", "trial_0001", typed, "pending")
    assert store.upsert_trial("s", "trial_0001", typed, "pending") == tid
    assert store.upsert_trial("s", "trial_0001", typed, "running") == tid
    assert count(store, "trials") == 1
    df = store.trials_frame("s")
    row = df.iloc[0]
    assert (row["status"], row["method"], row["tree_shape"], row["node_budget"]) == (
        "running", "tree", "[4,2,1]", 12)
    assert row["temperature"] == 0.0 and pd.isna(row["draft_len"]) and row["config"] == cfg
    assert row["started_at"] is not pd.NaT
    other = store.upsert_trial("s", "trial_0002", config({"method": "sps", "k": 6}, draft_len=6), "error",
                               error="boom")
    assert other != tid
    assert store.trials_frame("s").set_index("trial_key").loc["trial_0002", "draft_len"] == 6
    with pytest.raises(UnknownSweep):
        store.upsert_trial("nope", "t", None, "pending")
    with pytest.raises(ValueError, match="trial status"):
        store.upsert_trial("s", "t", None, "interrupted")


def test_record_result_replaces_never_duplicates(store: Store) -> None:
    store.create_sweep("s", {})
    tid = store.upsert_trial("s", "k1", config({"method": "sps", "draft_len": 4, "seed": 1}, draft_len=4), "running")
    first = metrics(1.4, n_prompts=3)
    assert store.record_result("s", "k1", first, CPU) == tid
    second = metrics(1.6, n_prompts=2)
    assert store.record_result("s", "k1", second, CPU) == tid
    assert store.record_result("s", "k1", second, CPU) == tid
    assert (count(store, "trials"), count(store, "trial_metrics")) == (1, 1)
    assert (count(store, "prompt_results"), count(store, "hardware")) == (2, 1)
    detail = store.trial_detail(tid)
    assert detail["status"] == "done" and detail["error"] is None
    assert detail["config"] == {"method": "sps", "draft_len": 4, "seed": 1, "temperature": 0.0}  # the trial's own
    assert detail["metrics"] == without_prompts(written(second))
    assert detail["per_prompt"] == written(second)["per_prompt"]
    assert detail["hardware"] == CPU
    assert detail["finished_at"] >= detail["started_at"]


def test_result_for_unknown_trial_creates_it_and_hardware_dedupes(store: Store) -> None:
    store.create_sweep("s", {})
    cfg = {"method": "pld", "draft_len": 10, "temperature": 0.7}
    a = store.record_result("s", "a", DecodeResult.from_dict(bench_row(1.3), config(cfg, draft_len=10)), CPU)
    b = store.record_result("s", "b", metrics(1.2), dict(CPU))
    c = store.record_result("s", "c", metrics(2.0), {**GPU, "cuda_version": "12.8"})
    assert count(store, "hardware") == 2
    detail = store.trial_detail(a)
    assert detail["config"] == cfg
    assert detail["knobs"] == {"method": "pld", "draft_len": 10, "tree_shape": None,
                               "node_budget": None, "exit_layer": None, "temperature": 0.7,
                               "backend": "spectune", "concurrency": 1}
    assert store.trial_detail(c)["hardware"] == {**GPU, "cuda_version": "12.8"}
    df = store.trials_frame("s").set_index("trial_id")
    assert df.loc[a, "hardware"] == "cpu · Test CPU 9000 · 2 CPUs"
    assert df.loc[c, "hardware"] == "cuda · NVIDIA H200"
    assert df.loc[b, "device"] == "cpu" and df.loc[c, "gpu_model"] == "NVIDIA H200"


def test_numpy_and_nan_values_are_stored_as_plain_values(store: Store) -> None:
    store.create_sweep("s", {})
    m = bench_row(1.5)
    m.update(speedup=np.float32(1.5), new_tokens=np.int64(192), acceptance_rate=float("nan"),
             acceptance_by_position=np.array([0.5, 0.25]), lossless=np.bool_(True),
             speedups=[1.0, float("inf")])
    tid = store.record_result("s", "k", DecodeResult.from_dict(m), CPU)
    got = store.trial_detail(tid)["metrics"]
    assert got["speedup"] == 1.5 and got["new_tokens"] == 192 and got["lossless"] is True
    assert got["acceptance_rate"] is None and got["acceptance_by_position"] == [0.5, 0.25]
    assert got["speedups"] == [1.0, None]
    with pytest.raises(ValueError, match="speedup"):
        store.record_result("s", "k", DecodeResult.from_dict({**bench_row(), "speedup": "fast"}), CPU)


def test_record_error_then_retry(store: Store) -> None:
    store.create_sweep("s", {})
    tid = store.upsert_trial("s", "k", config({"method": "sps", "draft_len": 2}, draft_len=2), "running")
    assert store.record_error("s", "k", "CUDA out of memory\ntraceback...") == tid
    assert store.record_error("s", "k", "CUDA out of memory\ntraceback...") == tid
    row = store.trials_frame("s").iloc[0]
    assert row["status"] == "error" and row["error"].startswith("CUDA out of memory")
    assert row["config"] == {"method": "sps", "draft_len": 2, "temperature": 0.0} and pd.isna(row["speedup"])
    new = store.record_error("s", "never-started", "actor died")
    assert store.trial_detail(new)["config"] == {} and store.trial_detail(new)["metrics"] is None
    store.record_result("s", "never-started", DecodeResult.from_dict(bench_row(1.1), config({"method": "sps", "draft_len": 4}, draft_len=4)), CPU)  # a retry succeeded
    detail = store.trial_detail(new)
    assert detail["status"] == "done" and detail["error"] is None
    assert detail["knobs"]["method"] == "sps" and detail["knobs"]["draft_len"] == 4  # filled in
    assert count(store, "trials") == 2
    with pytest.raises(UnknownTrial):
        store.trial_detail(10_000)


def test_trials_frame_equals_what_was_written(store: Store) -> None:
    store.create_sweep("a", {})
    store.create_sweep("b", {})
    given = {
        ("a", "t1"): metrics(1.5, cost=4.0),
        ("a", "t2"): metrics(2.0, cost=8.0, lossless=False),
        ("b", "t1"): metrics(1.1, cost=2.0, lossless=None, peak_mem_mb=812.5),
    }
    ids = {key: store.record_result(*key, m, CPU) for key, m in given.items()}
    store.upsert_trial("a", "t3", config({"method": "sps", "draft_len": 8}, draft_len=8), "running")
    df = store.trials_frame("a")
    assert list(df.columns) == list(FRAME_COLUMNS)
    assert df["trial_key"].tolist() == ["t1", "t2", "t3"]
    assert df["status"].tolist() == ["done", "done", "running"]
    for _, row in df[df["status"] == "done"].iterrows():
        m = written(given[(row["sweep"], row["trial_key"])])
        assert row["trial_id"] == ids[(row["sweep"], row["trial_key"])]
        for field, value in without_prompts(m).items():
            if field in ("method", "config", "label", "speedups", "temperature"):
                continue
            got = row[field]
            if value is None:
                assert got is None or pd.isna(got), field
            elif isinstance(value, float):
                assert math.isclose(got, value), field
            else:
                assert got == value, field
        assert row["extra"] == {"label": m["label"], "speedups": m["speedups"], "temperature": 0.0}
    assert df["lossless"].dtype == "boolean" and df["speedup"].dtype == "float64"
    assert pd.isna(df.iloc[2]["speedup"]) and df.iloc[2]["draft_len"] == 8
    assert len(store.trials_frame(["a", "b"])) == 4 and len(store.trials_frame()) == 4
    assert store.trials_frame("b").iloc[0]["peak_mem_mb"] == 812.5
    store.create_sweep("empty", {})
    empty = store.trials_frame("empty")
    assert empty.empty and list(empty.columns) == list(FRAME_COLUMNS)


def test_best_trial_respects_lossless_only(store: Store) -> None:
    store.create_sweep("s", {})
    ok = store.record_result("s", "ok", metrics(1.5, cost=4.0), CPU)
    unchecked = store.record_result("s", "sampled", metrics(1.2, lossless=None, cost=2.0), CPU)
    broken = store.record_result("s", "broken", metrics(3.0, lossless=False), CPU)
    lossy = store.record_result("s", "typical", metrics(2.5, lossy=True), CPU)
    store.upsert_trial("s", "running", None, "running")
    assert store.best_trial("s", "speedup") == ok
    assert store.best_trial("s", "speedup", lossless_only=False) == broken
    # an unchecked (sampled) trial never counts as lossless unless asked for explicitly
    assert store.best_trial("s", "tree_tokens_per_step", "min") == ok
    assert store.best_trial("s", "tree_tokens_per_step", "min", include_unchecked=True) == unchecked
    assert store.best_trial("s", "speedup", "min", lossless_only=False) == unchecked
    failed_certificate = store.record_result("s", "uncertified", replace(metrics(9.0), lossless_status="lossy"), CPU)
    assert store.best_trial("s", "speedup") == ok and failed_certificate != ok
    store.record_error("s", "ok", "re-run failed")  # errored trials never win
    assert store.best_trial("s", "speedup") is None
    assert store.best_trial("s", "speedup", include_unchecked=True) == unchecked
    assert lossy != broken
    with pytest.raises(ValueError, match="unknown objective"):
        store.best_trial("s", "label")
    with pytest.raises(UnknownSweep):
        store.best_trial("nope", "speedup")
    store.create_sweep("empty", {})
    assert store.best_trial("empty", "speedup") is None


def test_served_trial(store: Store) -> None:
    store.create_sweep("s", {})
    assert store.served_trial() is None
    a = store.record_result("s", "a", metrics(1.5), CPU)
    b = store.record_result("s", "b", metrics(1.7), CPU)
    running = store.upsert_trial("s", "c", None, "running")
    store.mark_served(a)
    assert store.served_trial() == a
    store.mark_served(b)
    store.mark_served(b)
    assert store.served_trial() == b and count(store, "serving") == 1
    assert store.trials_frame("s")["served"].tolist() == [False, True, False]
    assert store.trial_detail(b)["served"] and not store.trial_detail(a)["served"]
    with pytest.raises(ValueError, match="running"):
        store.mark_served(running)
    with pytest.raises(UnknownTrial):
        store.mark_served(999_999)
    store.mark_served(a, slot="canary")
    assert (store.served_trial(), store.served_trial("canary")) == (b, a)


def test_list_sweeps_counts(store: Store) -> None:
    assert store.list_sweeps() == []
    store.create_sweep("old", {})
    store.create_sweep("new", {})
    store.set_sweep_status("new", "running")
    store.record_result("new", "1", metrics(), CPU)
    store.record_result("new", "2", metrics(), GPU)
    store.record_error("new", "3", "x")
    store.upsert_trial("new", "4", None, "running")
    store.upsert_trial("new", "5", None, "pending")
    store.upsert_trial("new", "6", None, "pending")
    new, old = store.list_sweeps()
    assert (new.name, new.status, old.name, old.status) == ("new", "running", "old", "pending")
    assert new.n_trials == {"pending": 2, "running": 1, "done": 2, "error": 1} and new.total == 6
    assert old.n_trials == {"pending": 0, "running": 0, "done": 0, "error": 0} and old.total == 0
    assert new.hardware == "cpu · Test CPU 9000 · 2 CPUs; cuda · NVIDIA H200"
    assert new.started_at is not None and old.hardware == ""


def test_baseline_round_trip(store: Store) -> None:
    key = {"pair_id": "tiny-seed0", "prompt_set_hash": "sha256:abc", "max_new_tokens": 96,
           "temperature": 0.0}

    def baseline(speed: float, target: str = "/pairs/tiny/target", drafter: str | None = "/pairs/tiny/drafter"):
        return BaselineResult(**key, ar_tokens_per_s=speed, target_path=target, drafter_path=drafter, measured_s=2.5)

    assert store.get_baseline(**key, hardware=CPU) is None
    bid = store.save_baseline(baseline(159.0), CPU, extra={"repeats": 3})
    got = store.get_baseline(**key, hardware=CPU)
    assert got is not None and got.id == bid
    assert (got.ar_tokens_per_s, got.target_path, got.drafter_path) == (
        159.0, "/pairs/tiny/target", "/pairs/tiny/drafter")
    assert got.hardware == CPU and got.extra == {"measured_s": 2.5, "repeats": 3} and got.measured_at.tzinfo
    assert store.save_baseline(baseline(161.5), CPU) == bid  # re-measured
    assert store.get_baseline(**key, hardware=CPU).ar_tokens_per_s == 161.5  # type: ignore[union-attr]
    assert count(store, "ar_baselines") == 1
    assert store.get_baseline(**key, hardware=GPU) is None
    gpu = store.save_baseline(baseline(900.0), GPU)
    assert store.get_baseline(**key).id == gpu  # type: ignore[union-attr]  # latest, any hardware
    assert store.get_baseline(**{**key, "temperature": 0.7}, hardware=CPU) is None
    with pytest.raises(ValueError):
        store.save_baseline(baseline(float("nan")), CPU)


# --- the CLI ------------------------------------------------------------------------------------


def cli() -> typer.Typer:
    app = typer.Typer()
    app.command("results")(store_cmd.results)
    app.add_typer(store_cmd.sweeps_app, name="sweeps")
    return app


def test_cli_results_json_and_table(store: Store, db_url: str) -> None:
    store.create_sweep("s", {"objectives": [{"metric": "speedup", "mode": "max"},
                                            {"metric": "draft_calls_per_step", "mode": "min"}]})
    a = store.record_result("s", "a", metrics(1.5, cost=4.0), CPU)
    b = store.record_result("s", "b", metrics(1.2, cost=2.0), CPU)
    store.record_result("s", "c", metrics(3.0, cost=2.0, lossless=False), CPU)
    store.record_error("s", "d", "boom")
    runner = CliRunner()
    out = runner.invoke(cli(), ["results", "s", "--json", "--db", db_url])
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert data["objectives"] == [{"metric": "speedup", "mode": "max"},
                                  {"metric": "draft_calls_per_step", "mode": "min"}]
    assert data["front"] == [a] and len(data["trials"]) == 4
    out = runner.invoke(cli(), ["results", "s", "--json", "--db", db_url,
                                "--objective", "speedup:max", "--objective", "tree_tokens_per_step:min"])
    assert json.loads(out.stdout)["front"] == [a, b]
    table = runner.invoke(cli(), ["results", "s", "--db", db_url])
    assert table.exit_code == 0 and "★" in table.stdout and "4 trials, 1 on the front" in table.stdout
    bad = runner.invoke(cli(), ["results", "s", "--db", db_url, "--objective", "speed:up"])
    assert bad.exit_code == 2
    missing = runner.invoke(cli(), ["results", "nope", "--db", db_url])
    assert missing.exit_code == 1 and "no sweep named 'nope'" in missing.stderr


def test_cli_results_keeps_unchecked_trials_off_the_front_unless_asked(store: Store, db_url: str) -> None:
    store.create_sweep("s", {})
    a = store.record_result("s", "a", replace(metrics(1.5, cost=4.0), speedup_ci_low=1.4, speedup_ci_high=1.6), CPU)
    sampled = store.record_result("s", "t", metrics(1.9, cost=4.0, lossless=None), CPU)
    runner = CliRunner()
    plain = runner.invoke(cli(), ["results", "s", "--json", "--db", db_url])
    assert json.loads(plain.stdout)["front"] == [a]
    counted = runner.invoke(cli(), ["results", "s", "--json", "--db", db_url, "--include-unchecked"])
    assert json.loads(counted.stdout)["front"] == [sampled]
    table = runner.invoke(cli(), ["results", "s", "--db", db_url])
    assert "1 sampling trial(s) unchecked, kept off the front" in table.stdout
    assert "1.40-1.60" in table.stdout  # the speedup's interval


def test_cli_default_objectives_and_sweeps_list(store: Store, db_url: str) -> None:
    store.create_sweep("s", {})
    store.record_result("s", "a", metrics(1.5, cost=4.0), CPU)
    runner = CliRunner()
    data = json.loads(runner.invoke(cli(), ["results", "s", "--json", "--db", db_url]).stdout)
    assert data["objectives"] == [{"metric": "speedup", "mode": "max"},
                                  {"metric": "tree_tokens_per_step", "mode": "min"}]
    listed = runner.invoke(cli(), ["sweeps", "list", "--db", db_url], env={"COLUMNS": "200"})
    assert listed.exit_code == 0 and "Test CPU 9000" in listed.stdout
    rows = json.loads(runner.invoke(cli(), ["sweeps", "list", "--json", "--db", db_url]).stdout)
    assert rows[0]["name"] == "s" and rows[0]["n_trials"]["done"] == 1


def test_cli_unreachable_database_exits_2_with_one_line() -> None:
    runner = CliRunner()
    for args in (["results", "s"], ["sweeps", "list"]):
        out = runner.invoke(cli(), [*args, "--db", "postgresql+psycopg://u:hunter2@127.0.0.1:1/x"])
        assert out.exit_code == 2
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(
            "error: cannot reach database postgresql+psycopg://u:***@127.0.0.1:1/x: ")
        assert "hunter2" not in out.output
