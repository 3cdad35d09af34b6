"""A real multi-node Ray cluster on this machine (`spectune cluster up`: a head of 0 CPUs and two worker
nodes of one CPU each, token auth, its own ports and Ray folder), sweeps submitted with `ray job submit`
as a user would, results in PostgreSQL ($SPECTUNE_TEST_PG_URL, a private schema) or SQLite without it.

- a sweep spreads over both worker nodes, each loading its pair once, every trial recording its node;
- a trial asking for more than any node has is refused before the sweep starts, naming the largest node;
- a worker node SIGKILLed mid-sweep (its raylet and workers): the sweep completes on the survivor, every
  trial stored exactly once, the trial(s) it held stored as `error` naming the node, and `spectune results`
  says which node failed.

Every cluster is stopped after its test (`spectune cluster down`: its own process groups only).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import sqlalchemy as sa
import yaml

from spectune.cluster import LocalCluster, kill_node
from spectune.store import connect, resolve_url
from support import sweep_spec

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
PG_URL = os.environ.get("SPECTUNE_TEST_PG_URL")


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*args], env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    """`spectune cluster up --nodes 2 --cpus 1`, stopped with `spectune cluster down` whatever happens."""
    folder = Path(f"/tmp/stc-{uuid.uuid4().hex[:8]}")  # short: Ray's socket paths are limited
    started = time.monotonic()
    up = run(str(BIN / "spectune"), "cluster", "up", "--nodes", "2", "--cpus", "1", "--dir", str(folder), timeout=240)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert "ray job submit --address http://127.0.0.1:" in up.stdout and "RAY_AUTH_MODE=token" in up.stdout
        print(f"cluster up in {time.monotonic() - started:.1f} s")
        yield LocalCluster.load(folder)
    finally:
        nodes = LocalCluster.load(folder).nodes if (folder / "cluster.json").exists() else ()
        down = run(str(BIN / "spectune"), "cluster", "down", "--dir", str(folder), timeout=120)
        assert down.returncode == 0 or not nodes, down.stdout + down.stderr
        leftover = [n.name for n in nodes if _group_alive(n.pid)]
        subprocess.run(["rm", "-rf", str(folder)], check=False)
        assert not leftover, f"nodes still running after `cluster down`: {leftover}"


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def db_url(tmp_path: Path) -> Iterator[str]:
    """A private PostgreSQL schema when $SPECTUNE_TEST_PG_URL is set, else a SQLite file."""
    if not PG_URL:
        yield f"sqlite:///{tmp_path / 'sweeps.db'}"
        return
    schema = f"c_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(resolve_url(PG_URL))
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    try:
        url = sa.make_url(resolve_url(PG_URL)).update_query_dict({"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def submit(cluster: LocalCluster, job_dir: Path, entrypoint: list[str], db_url: str, *, wait: bool = True,
           timeout: float = 300) -> subprocess.CompletedProcess:
    """`ray job submit` with the cluster's token; the store URL travels in the job's environment, not its command."""
    runtime_env = json.dumps({"env_vars": {"SPECTUNE_DB": db_url, "OMP_NUM_THREADS": "1"}})
    return run(str(BIN / "ray"), "job", "submit", "--address", cluster.dashboard, "--working-dir", str(job_dir),
               "--runtime-env-json", runtime_env, *([] if wait else ["--no-wait"]), "--", *entrypoint,
               env=cluster.env(), timeout=timeout)


def job_dir_with(tmp_path: Path, spec: dict) -> Path:
    folder = tmp_path / f"job-{spec['name']}"
    folder.mkdir()
    (folder / f"{spec['name']}.yaml").write_text(yaml.safe_dump(spec))
    return folder


def trial_rows(db_url: str, sweep: str) -> list[dict]:
    with connect(db_url) as store:
        frame = store.trials_frame(sweep)
        return [{**row, "worker": (store.trial_detail(int(row["trial_id"]))["metrics"] or {}).get("worker")}
                for row in frame.to_dict("records")]


def test_a_submitted_sweep_spreads_over_both_nodes_each_loading_its_pair_once(micro_pair, tmp_path, cluster, db_url):
    space = {"sps": {"draft_len": [1, 2, 3]}, "pld": {}}
    spec = sweep_spec("spread", micro_pair, space, concurrency=2)
    started = time.monotonic()
    result = submit(cluster, job_dir_with(tmp_path, spec), ["spectune", "sweep", "spread.yaml", "--storage",
                                                             str(tmp_path / "tune")], db_url)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "succeeded" in output, output
    print(f"sweep of 4 trials over 2 nodes in {time.monotonic() - started:.1f} s")

    rows = trial_rows(db_url, "spread")
    assert len(rows) == 4 and len({r["trial_key"] for r in rows}) == 4
    assert all(r["status"] == "done" for r in rows)
    by_node: dict[str, set[str]] = {}
    for r in rows:
        assert r["node"] == r["worker"]["node"]  # the column and the worker's own report agree
        by_node.setdefault(r["node"].split("/")[0], set()).add(r["worker"]["worker_id"])
        assert r["worker"]["pair_loads"] == 1
    assert set(by_node) == {"worker-1", "worker-2"}, by_node  # both worker nodes ran trials, the head none
    assert all(len(workers) == 1 for workers in by_node.values()), by_node  # one worker, one pair load per node

    shown = run(str(BIN / "spectune"), "results", "spread", "--db", db_url, env={"COLUMNS": "200"})
    assert shown.returncode == 0 and "worker-1/" in shown.stdout and "worker-2/" in shown.stdout, shown.stdout

    # a slot that no node can hold (2 CPUs; each node has 1, the cluster 2 in all): refused up front
    big = sweep_spec("too-big", micro_pair, {"pld": {}}, resources={"cpus": 2, "gpus": 0})
    started = time.monotonic()
    refused = submit(cluster, job_dir_with(tmp_path, big), ["spectune", "sweep", "too-big.yaml", "--storage",
                                                             str(tmp_path / "tune")], db_url, timeout=180)
    output = refused.stdout + refused.stderr
    assert refused.returncode != 0, output
    assert ("a trial needs 2 CPUs and 0 GPUs on one node; the largest of the cluster's 3 node(s), worker-"
            in " ".join(output.split())), output
    assert time.monotonic() - started < 120
    with connect(db_url) as store:
        assert store.get_sweep("too-big") is None  # refused before the sweep entered the store


def _job_status(cluster: LocalCluster, job_id: str) -> str:
    status = run(str(BIN / "ray"), "job", "status", "--address", cluster.dashboard, job_id, env=cluster.env(),
                 timeout=60)
    ended = re.search(rf"Job '{job_id}' (succeeded|failed|stopped)", status.stdout)  # else it runs
    return ended.group(1).upper() if ended else "RUNNING"


def test_a_worker_node_killed_mid_sweep_loses_no_trial_and_the_survivor_completes_it(micro_pair, tmp_path, cluster,
                                                                                        db_url):
    space = {"sps": {"draft_len": [1, 2, 3, 4, 5]}, "pld": {}}
    spec = sweep_spec("node-lost", micro_pair, space, concurrency=2, max_new_tokens=160,  # trials of seconds
                      prompts={"set": "default", "limit": 4}, repeats=2)
    submitted = submit(cluster, job_dir_with(tmp_path, spec), ["spectune", "sweep", "node-lost.yaml", "--storage",
                                                                str(tmp_path / "tune")], db_url, wait=False)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job_id = re.search(r"raysubmit_[A-Za-z0-9]+", submitted.stdout).group(0)  # (the line carries colour codes)

    deadline, killed_at = time.monotonic() + 300, None
    while killed_at is None:  # both nodes have finished a trial and two run: kill worker-2 mid-trial
        assert time.monotonic() < deadline, "no moment with trials running on both nodes"
        rows = trial_rows(db_url, "node-lost") if _sweep_exists(db_url, "node-lost") else []
        done_on = {r["node"].split("/")[0] for r in rows if r["status"] == "done"}
        running = sum(r["status"] == "running" for r in rows)
        if {"worker-1", "worker-2"} <= done_on and running == 2:
            time.sleep(1.0)
            kill_node(cluster, "worker-2")
            killed_at = time.time()
        time.sleep(0.5)

    def logs() -> str:
        return run(str(BIN / "ray"), "job", "logs", "--address", cluster.dashboard, job_id, env=cluster.env()).stdout

    finish_by = time.monotonic() + 240
    while (status := _job_status(cluster, job_id)) == "RUNNING":
        assert time.monotonic() < finish_by, f"the sweep did not finish within 240 s of its node's loss: {logs()}"
        time.sleep(2)
    assert status == "SUCCEEDED", logs()
    print(f"job done {time.time() - killed_at:.1f} s after the kill")

    rows = trial_rows(db_url, "node-lost")
    _print_timeline(rows, killed_at)
    assert len(rows) == 6 and len({r["trial_key"] for r in rows}) == 6  # none lost, none stored twice
    assert {r["status"] for r in rows} <= {"done", "error"}
    errors = [r for r in rows if r["status"] == "error"]
    assert 1 <= len(errors) <= 2, errors  # the trial(s) running when the node died
    assert all("died" in r["error"] for r in errors), [r["error"] for r in errors]
    after = [r for r in rows if r["status"] == "done" and r["started_at"].timestamp() > killed_at + 1]
    assert after and all(r["node"].startswith("worker-1/") for r in after)  # the survivor ran the rest
    shown = run(str(BIN / "spectune"), "results", "node-lost", "--db", db_url, env={"COLUMNS": "200"})
    assert shown.returncode == 0 and "node worker-2/" in shown.stdout and "its worker died" in shown.stdout, shown.stdout


def _sweep_exists(db_url: str, name: str) -> bool:
    try:
        with connect(db_url) as store:
            return store.get_sweep(name) is not None
    except Exception:  # noqa: BLE001 - the store may not have its tables yet
        return False


def _print_timeline(rows: list[dict], killed_at: float) -> None:
    """The measured node-loss timeline (pytest -s shows it): each trial's node, status and times from the kill."""
    print("node killed: worker-2; times in s from the kill")
    def since(t: object) -> float:
        return float("nan") if pd.isna(t) else t.timestamp() - killed_at

    for r in sorted(rows, key=lambda r: r["trial_id"]):
        begin, end = since(r["started_at"]), since(r["finished_at"])
        print(f"  {r['method']:>5} k={r['draft_len']} {r['status']:>5} node={r['node']} "
              f"start={begin:+.1f} end={end:+.1f} {r['error'] or ''}"[:240])
