"""Faults a sweep survives, on the micro pair with real Ray, SQLite and PostgreSQL.

- a worker actor SIGKILLed mid-trial: that trial is stored as `error`, Ray restarts the worker
  (it reloads the pair) and the sweep completes; Tune's state is kept per store, so the same
  spec may start again into another store;
- PostgreSQL stopped mid-sweep and started again: every result is stored (buffered meanwhile);
- PostgreSQL gone for good at the end: the sweep fails naming the URL (its status could not be
  set either, which is noted, not raised instead), and `--resume` once it is back stores every result
  from Tune's state, running no trial again and leaving the results already stored as they were.

The PostgreSQL tests run a private server (initdb in a temporary folder, a free port), never the
shared cluster of `.ci/postgres.sh`, so stopping it disturbs nothing else.
"""

from __future__ import annotations

import glob
import io
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from rich.console import Console

from spectune.store import connect
from spectune.sweeps.launcher import SweepFailed, SweepOptions, _check_new_or_resumable, run_sweep
from spectune.sweeps.spec import parse_spec
from support import count, sweep_spec

pytestmark = pytest.mark.slow

# five trials of a few seconds each on the micro pair: long enough to be hit mid-trial
SPACE = {"sps": {"draft_len": [1, 2, 3, 4]}, "pld": {}}
LONG = {"max_new_tokens": 160, "prompts": {"set": "default", "limit": 4}, "repeats": 2}


def worker_pid(db: Path) -> int | None:
    """The pid of the worker that ran the first finished trial (its metrics name it host:pid)."""
    with sqlite3.connect(db, timeout=30) as conn:
        row = conn.execute("SELECT extra FROM trial_metrics ORDER BY trial_id LIMIT 1").fetchone()
    return int(json.loads(row[0])["worker"]["worker_id"].rsplit(":", 1)[1]) if row else None


def test_a_worker_killed_mid_trial_fails_that_trial_and_is_restarted(micro_pair, tmp_path, ray_tmp, monkeypatch):
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))
    spec = parse_spec(sweep_spec("killed", micro_pair, SPACE, **LONG))
    db = tmp_path / "sweeps.db"
    killed: dict[str, int] = {}

    def kill_the_worker_during_the_second_trial() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and "pid" not in killed:
            done = count(db, "SELECT count(*) FROM trials WHERE status = 'done'")
            running = count(db, "SELECT count(*) FROM trials WHERE status = 'running'")
            if done >= 1 and running >= 1:
                pid = worker_pid(db)
                time.sleep(1.0)  # the trial is decoding now (it takes seconds)
                os.kill(pid, signal.SIGKILL)
                killed["pid"] = pid
            time.sleep(0.05)

    killer = threading.Thread(target=kill_the_worker_during_the_second_trial, daemon=True)
    killer.start()
    options = SweepOptions(storage=str(tmp_path / "tune"))
    with connect(f"sqlite:///{db}") as store:
        outcome = run_sweep(spec, store, options)
        trials = store.trials_frame("killed")
        later = [store.trial_detail(int(t))["metrics"]["worker"]["worker_id"]
                 for t in trials[trials.status == "done"].trial_id]
        with pytest.raises(SweepFailed, match="already in the store"):
            _check_new_or_resumable(store, spec, options)
    killer.join(timeout=5)

    assert "pid" in killed, "no trial was seen running after the first finished"
    assert (outcome.status, outcome.trials, outcome.failed) == ("done", 5, 1)
    [error] = trials[trials.status == "error"].error.tolist()
    assert error.startswith("the worker running this trial died") and "Ray restarts it" in error
    pids = [int(w.rsplit(":", 1)[1]) for w in later]
    assert pids[0] == killed["pid"] and len(pids) == 4
    assert all(pid != killed["pid"] for pid in pids[1:])  # every later trial ran on the restarted worker
    [worker] = outcome.workers
    assert worker["pair_loads"] == 1 and worker["trials_run"] == 3  # the restarted process loaded the pair again

    # Tune's state is kept per store: the same spec starts afresh into another store
    with connect(f"sqlite:///{tmp_path / 'other.db'}") as other:
        _check_new_or_resumable(other, spec, options)


# --- PostgreSQL going away ------------------------------------------------------------------


def _pg_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class PrivatePostgres:
    """A PostgreSQL server of this test's own: stop() and start() touch nothing else."""

    pg_ctl: str
    data: Path
    port: int
    as_user: list[str]

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://spectune@127.0.0.1:{self.port}/postgres"

    def _ctl(self, *args: str) -> None:
        subprocess.run([*self.as_user, self.pg_ctl, "-D", str(self.data), *args], check=True,
                       capture_output=True, timeout=60)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._ctl("-o", options, "-l", str(self.data / "server.log"), "-w", "start")

    def stop(self) -> None:
        self._ctl("-m", "fast", "-w", "stop")


@pytest.fixture(scope="module")
def postgres() -> Iterator[PrivatePostgres]:
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip("PostgreSQL's initdb/pg_ctl are not installed (.ci/postgres.sh installs them)")
    folder = Path(tempfile.mkdtemp(prefix="st-pg-", dir="/tmp"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(folder, "postgres")
    folder.chmod(0o700)
    server = PrivatePostgres(pg_ctl, folder / "data", _free_port(), as_user)
    subprocess.run([*as_user, initdb, "-D", str(server.data), "-A", "trust", "-U", "spectune", "--no-sync"],
                   check=True, capture_output=True, timeout=120)
    server.start()
    try:
        yield server
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(server.data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


def pg_count(url: str, sql: str) -> int:
    import psycopg

    try:
        with psycopg.connect(url.replace("postgresql+psycopg", "postgresql"), connect_timeout=2) as conn:
            return conn.execute(sql).fetchone()[0]
    except psycopg.Error:  # down, or the tables are not there yet
        return 0


def finished_rows(url: str, sweep: str) -> dict[str, tuple[object, str]]:
    """Every trial of `sweep` stored as done: its key -> (finish time, the worker that ran it, host:pid).
    (The private server keeps the earlier tests' sweeps: only this one's rows count.)"""
    import psycopg

    with psycopg.connect(url.replace("postgresql+psycopg", "postgresql"), connect_timeout=2) as conn:
        rows = conn.execute("SELECT t.trial_key, t.finished_at, m.extra FROM trials t "
                            "JOIN trial_metrics m ON m.trial_id = t.id JOIN sweeps s ON s.id = t.sweep_id "
                            "WHERE t.status = 'done' AND s.name = %s", (sweep,)).fetchall()
    extras = {key: extra if isinstance(extra, dict) else json.loads(extra) for key, _, extra in rows}
    return {key: (finished_at, extras[key]["worker"]["worker_id"]) for key, finished_at, _ in rows}


def stored_metrics(url: str) -> set[int]:
    import psycopg

    with psycopg.connect(url.replace("postgresql+psycopg", "postgresql"), connect_timeout=2) as conn:
        return {row[0] for row in conn.execute("SELECT trial_id FROM trial_metrics")}


def _outage(server: PrivatePostgres, sweep: str, after_done: int, down_s: float | None, seen: dict[str, float]) -> None:
    """Stop the server once `after_done` trials of `sweep` are stored; start it again after `down_s`
    (None: it stays down)."""
    deadline = time.monotonic() + 300
    done = ("SELECT count(*) FROM trials JOIN sweeps ON sweeps.id = trials.sweep_id "
            f"WHERE sweeps.name = '{sweep}' AND trials.status = 'done'")
    while pg_count(server.url, done) < after_done:
        if time.monotonic() > deadline:
            return
        time.sleep(0.2)
    server.stop()
    seen["stopped"] = time.monotonic()
    if down_s is not None:
        time.sleep(down_s)
        server.start()
        seen["started"] = time.monotonic()


def test_postgres_stopped_mid_sweep_and_started_again_loses_no_result(micro_pair, tmp_path, ray_tmp, monkeypatch,
                                                                      postgres):
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))
    spec = parse_spec(sweep_spec("outage", micro_pair, SPACE, **LONG))
    seen: dict[str, float] = {}
    outage = threading.Thread(target=_outage, args=(postgres, "outage", 1, 10.0, seen), daemon=True)
    said = io.StringIO()
    with connect(postgres.url) as store:
        outage.start()
        outcome = run_sweep(spec, store, SweepOptions(storage=str(tmp_path / "tune")), Console(file=said))
        outage.join(timeout=60)
        trials = store.trials_frame("outage")
    assert "stopped" in seen and "started" in seen
    assert (outcome.status, outcome.trials, outcome.failed) == ("done", 5, 0)
    assert (trials.status == "done").all() and trials.speedup.notna().all()
    assert trials.trial_id.isin(stored_metrics(postgres.url)).all()
    text = said.getvalue()
    assert "unreachable" in text and "is back" in text


def test_postgres_gone_at_the_end_fails_naming_the_url_and_resume_stores_everything(micro_pair, tmp_path, ray_tmp,
                                                                                    monkeypatch, postgres):
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))
    spec = parse_spec(sweep_spec("gone", micro_pair, SPACE, **LONG))
    seen: dict[str, float] = {}
    outage = threading.Thread(target=_outage, args=(postgres, "gone", 1, None, seen), daemon=True)
    options = SweepOptions(storage=str(tmp_path / "tune"), store_retry_s=3.0)
    with connect(postgres.url) as store:
        outage.start()
        with pytest.raises(SweepFailed) as failed:
            run_sweep(spec, store, options, Console(file=io.StringIO()))
        outage.join(timeout=60)
    message = str(failed.value)
    assert "cannot write" in message and "postgresql+psycopg://spectune@127.0.0.1" in message
    assert "--resume" in message
    notes = getattr(failed.value, "__notes__", [])
    assert any("could not be set to 'error'" in note for note in notes)  # noted, not raised instead

    postgres.start()
    before = finished_rows(postgres.url, "gone")  # stored before the outage
    assert 1 <= len(before) < 5
    [first_worker] = {worker for _, worker in before.values()}
    with connect(postgres.url) as store:
        outcome = run_sweep(spec, store, SweepOptions(storage=str(tmp_path / "tune"), resume=True),
                            Console(file=io.StringIO()))
        trials = store.trials_frame("gone")
        status = store.get_sweep("gone").status
    assert (outcome.status, outcome.trials, outcome.failed, status) == ("done", 5, 0, "done")
    assert (trials.status == "done").all() and trials.trial_id.isin(stored_metrics(postgres.url)).all()

    # Tune had finished every trial: the resume runs none (the store upserts, so counting rows alone would
    # pass a resume that ran them again), writes the lost results from Tune's state (each names the first
    # driver's worker) and leaves the ones stored before the outage as they were
    [resumed_worker] = outcome.workers
    assert resumed_worker["trials_run"] == 0
    after = finished_rows(postgres.url, "gone")
    assert {key: after[key] for key in before} == before
    assert {worker for _, worker in after.values()} == {first_worker}
