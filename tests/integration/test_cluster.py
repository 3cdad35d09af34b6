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
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest
import sqlalchemy as sa
import yaml

from spectune.cluster import LocalCluster, kill_node
from spectune.store import connect, resolve_url
from support import free_port, sweep_spec

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
PG_URL = os.environ.get("SPECTUNE_TEST_PG_URL")


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*args], env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


@contextmanager
def local_cluster(nodes: int) -> Iterator[LocalCluster]:
    """`spectune cluster up --nodes N --cpus 1`, stopped with `spectune cluster down` whatever happens
    (and every node it holds then, joined ones too, checked gone)."""
    folder = Path(f"/tmp/stc-{uuid.uuid4().hex[:8]}")  # short: Ray's socket paths are limited
    started = time.monotonic()
    up = run(str(BIN / "spectune"), "cluster", "up", "--nodes", str(nodes), "--cpus", "1", "--dir", str(folder),
             timeout=240)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert "ray job submit --address http://127.0.0.1:" in up.stdout and "RAY_AUTH_MODE=token" in up.stdout
        print(f"cluster up in {time.monotonic() - started:.1f} s")
        yield LocalCluster.load(folder)
    finally:
        held = LocalCluster.load(folder).nodes if (folder / "cluster.json").exists() else ()
        down = run(str(BIN / "spectune"), "cluster", "down", "--dir", str(folder), timeout=120)
        assert down.returncode == 0 or not held, down.stdout + down.stderr
        leftover = [n.name for n in held if _group_alive(n.pid)]
        subprocess.run(["rm", "-rf", str(folder)], check=False)
        assert not leftover, f"nodes still running after `cluster down`: {leftover}"


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    """A head and two worker nodes of one CPU each."""
    with local_cluster(2) as started:
        yield started


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


TRIALS = 9  # the node-loss sweep's: 8 sps draft lengths and pld


def test_a_worker_node_killed_mid_sweep_loses_no_trial_and_the_survivor_completes_it(micro_pair, tmp_path, cluster,
                                                                                        db_url):
    space = {"sps": {"draft_len": [1, 2, 3, 4, 5, 6, 7, 8]}, "pld": {}}
    spec = sweep_spec("node-lost", micro_pair, space, concurrency=2, max_new_tokens=160,  # trials of seconds
                      prompts={"set": "default", "limit": 4}, repeats=2)
    submitted = submit(cluster, job_dir_with(tmp_path, spec), ["spectune", "sweep", "node-lost.yaml", "--storage",
                                                                str(tmp_path / "tune")], db_url, wait=False)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job_id = re.search(r"raysubmit_[A-Za-z0-9]+", submitted.stdout).group(0)  # (the line carries colour codes)

    deadline, killed_at = time.monotonic() + 300, None
    while killed_at is None:  # both nodes have finished a trial, two run and two more wait: kill worker-2 mid-trial
        assert time.monotonic() < deadline, "no moment with trials running on both nodes and more to come"
        rows = trial_rows(db_url, "node-lost") if _sweep_exists(db_url, "node-lost") else []
        done_on = {r["node"].split("/")[0] for r in rows if r["status"] == "done"}
        running = sum(r["status"] == "running" for r in rows)
        started = sum(r["status"] in ("done", "running", "error") for r in rows)
        # a trial's process needs a moment before it leases a worker (and so says where it runs): one killed
        # in that moment is stored as dead "before it leased a worker", with no node to name
        settled = all(time.time() - r["started_at"].timestamp() > 1.0 for r in rows if r["status"] == "running")
        if {"worker-1", "worker-2"} <= done_on and running == 2 and started <= TRIALS - 2 and settled:
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
    assert len(rows) == TRIALS and len({r["trial_key"] for r in rows}) == TRIALS  # none lost, none stored twice
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


def _print_timeline(rows: list[dict], killed_at: float, event: str = "worker-2 killed") -> None:
    """The measured timeline (pytest -s shows it): each trial's node, status and times from the event."""
    print(f"{event}; times in s from then")
    def since(t: object) -> float:
        return float("nan") if pd.isna(t) else t.timestamp() - killed_at

    for r in sorted(rows, key=lambda r: r["trial_id"]):
        begin, end = since(r["started_at"]), since(r["finished_at"])
        print(f"  {r['method']:>5} k={r['draft_len']} {r['status']:>5} node={r['node']} "
              f"start={begin:+.1f} end={end:+.1f} {r['error'] or ''}"[:240])


def test_a_node_joining_mid_sweep_gets_a_worker_and_new_trials_use_it(micro_pair, tmp_path, db_url):
    space = {"sps": {"draft_len": [1, 2, 3, 4, 5, 6, 7, 8]}, "pld": {}}
    spec = sweep_spec("node-joins", micro_pair, space, concurrency=2, max_new_tokens=160,  # trials of seconds
                      prompts={"set": "default", "limit": 4}, repeats=2)
    with local_cluster(1) as cluster:  # room for one worker: the spec asks for two
        submitted = submit(cluster, job_dir_with(tmp_path, spec), ["spectune", "sweep", "node-joins.yaml",
                                                                    "--storage", str(tmp_path / "tune")],
                           db_url, wait=False)
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        job_id = re.search(r"raysubmit_[A-Za-z0-9]+", submitted.stdout).group(0)
        deadline = time.monotonic() + 300
        while not any(r["status"] == "done" for r in (trial_rows(db_url, "node-joins")
                                                       if _sweep_exists(db_url, "node-joins") else [])):
            assert time.monotonic() < deadline, "no trial finished on the one-node cluster"
            time.sleep(0.5)
        added = run(str(BIN / "spectune"), "cluster", "add", "--cpus", "1", "--dir", cluster.folder, timeout=240)
        assert added.returncode == 0 and "node worker-2 joined" in added.stdout, added.stdout + added.stderr
        joined_at = time.time()
        finish_by = time.monotonic() + 300
        while (status := _job_status(cluster, job_id)) == "RUNNING":
            assert time.monotonic() < finish_by, "the sweep did not finish"
            time.sleep(2)
        assert status == "SUCCEEDED"
    rows = trial_rows(db_url, "node-joins")
    _print_timeline(rows, joined_at, event="worker-2 joined")
    assert len(rows) == 9 and len({r["trial_key"] for r in rows}) == 9 and all(r["status"] == "done" for r in rows)
    joined = [r for r in rows if r["node"].startswith("worker-2/")]
    assert joined, "no trial ran on the node that joined"
    assert all(r["started_at"].timestamp() > joined_at - 1 for r in joined)  # (it did not exist before)
    assert len({r["worker"]["worker_id"] for r in joined}) == 1 and all(r["worker"]["pair_loads"] == 1 for r in joined)
    before = [r for r in rows if r["finished_at"].timestamp() < joined_at]
    assert before and all(r["node"].startswith("worker-1/") for r in before)


def _replica_nodes(cluster: LocalCluster) -> dict[str, str]:
    """Each live Serve replica's actor id -> the name of the node it runs on."""
    from spectune.cluster import alive_nodes

    names = {n["node_id"]: n["name"] for n in alive_nodes(cluster)}
    listed = run(str(BIN / "ray"), "list", "actors", "--address", cluster.dashboard, "--format", "json",
                 "--filter", "state=ALIVE", "--limit", "1000", env=cluster.env(), timeout=60)
    actors = json.loads(listed.stdout) if listed.returncode == 0 else []
    return {a["actor_id"]: names.get(a["node_id"], a["node_id"]) for a in actors
            if "ServeReplica" in a.get("class_name", "")}


def test_the_endpoint_on_two_nodes_survives_losing_one_replicas_node(micro_pair, tmp_path, cluster):
    import threading

    import httpx

    from spectune.engine.loop import Decoder
    from spectune.engine.sampling import Sampling
    from spectune.methods import METHODS
    from spectune.pair import load_pair
    from spectune.pair_ref import PairRef

    prompts = ["def add(a, b):\n", "import os\nimport sys\n\n", "for i in range(10):\n", "with open(path) as f:\n"]
    pair = load_pair(PairRef.model_validate({"dir": micro_pair}))
    ar = Decoder(pair.runners().target, METHODS.build("ar", {}, pair.runners()), pair.eos_token_id)
    reference = {p: pair.decode(ar.generate(pair.encode(p), 16, Sampling(0.0, 1.0), 0).tokens) for p in prompts}

    config = tmp_path / "served.yaml"
    config.write_text(yaml.safe_dump({"pair": str(micro_pair), "method": "sps", "knobs": {"draft_len": 4}}))
    port = free_port()
    deployed = run(str(BIN / "spectune"), "serve", "--config", str(config), "--address", cluster.address,
                   "--replicas", "2", "--num-cpus", "1", "--max-replicas-per-node", "1", "--port", str(port),
                   env=cluster.env(), timeout=300)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    url = f"http://127.0.0.1:{port}"
    assert httpx.get(f"{url}/healthz", timeout=30).status_code == 200
    placed = _replica_nodes(cluster)
    assert sorted(placed.values()) == ["worker-1", "worker-2"], placed  # one replica on each worker node

    answers: list[tuple[float, float, str, int, str]] = []  # sent, answered, prompt, HTTP status (0: no answer), text
    stop = threading.Event()

    def stream(offset: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            i = offset
            while not stop.is_set():
                prompt, sent = prompts[i % len(prompts)], time.time()
                try:
                    reply = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 16, "temperature": 0})
                    text = reply.json()["choices"][0]["text"] if reply.status_code == 200 else reply.text[:200]
                    answers.append((sent, time.time(), prompt, reply.status_code, text))
                except httpx.HTTPError as err:
                    answers.append((sent, time.time(), prompt, 0, repr(err)[:200]))
                i += 1

    clients = [threading.Thread(target=stream, args=(k,), daemon=True) for k in range(2)]
    for client in clients:
        client.start()
    time.sleep(8)
    kill_node(cluster, "worker-2")
    killed_at = time.time()
    time.sleep(35)
    stop.set()
    for client in clients:
        client.join(timeout=90)

    before = [a for a in answers if a[1] < killed_at]
    after = [a for a in answers if a[0] >= killed_at]
    in_flight = [a for a in answers if a[0] < killed_at <= a[1]]
    failed = [a for a in answers if a[3] != 200]
    last_failure = max((a[1] for a in failed), default=killed_at)
    settled = [a for a in after if a[0] > last_failure]
    print(f"replicas on {sorted(placed.values())}; killed worker-2; requests: {len(before)} answered before, "
          f"{len(in_flight)} in flight at the kill, {len(after)} sent after; {len(failed)} failed "
          f"(the last {last_failure - killed_at:+.1f} s from the kill); {len(settled)} after that, all answered")
    for a in failed:
        print(f"  failed: sent {a[0] - killed_at:+.1f} s, status {a[3]}: {a[4][:120]}")
    assert len(before) >= 4 and all(a[3] == 200 for a in before)
    assert last_failure - killed_at < 30, "requests still failed 30 s after the node's loss"
    assert len(settled) >= 10  # Serve rerouted: every request after the failover answered
    assert all(a[4] == reference[a[2]] for a in answers if a[3] == 200)  # and every answer equals AR's
    assert list(_replica_nodes(cluster).values()) == ["worker-1"]  # the survivor served them

