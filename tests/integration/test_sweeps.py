"""Sweeps on a real Ray cluster into a real SQLite store, on the micro pair.

- a sweep stores every trial once: a failing configuration as `error` with its message,
  the others `done` with metrics and a speedup interval; the worker loaded the pair once and
  timed AR beside every trial;
- a driver killed mid-sweep resumes with --resume, every trial stored exactly once, and only the trials
  missing from the store run again (those finished before the kill keep their worker and finish time);
- an unreachable database fails in seconds, before Ray starts;
- `ray job submit` against a token-authenticated `ray start --head` runs a sweep.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml
from typer.testing import CliRunner

from spectune.cli import app
from spectune.store import connect
from spectune.sweeps.launcher import SweepOptions, run_sweep
from spectune.sweeps.spec import parse_spec
from support import count, sweep_spec

BIN = Path(sys.executable).parent  # the venv's spectune and ray
TOO_BIG_TREE = [16, 16, 4]  # 1296 nodes: more than the micro target's 1024 positions, so the trial fails


def write_spec(folder: Path, spec: dict) -> Path:
    path = folder / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def driver_env(ray_tmp: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "RAY_TMPDIR": str(ray_tmp), "OMP_NUM_THREADS": "1",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **extra}


def finished_trials(db: Path) -> dict[str, tuple[str, str]]:
    """Every trial stored as done: its key -> (finish time, the worker that ran it, host:pid)."""
    with sqlite3.connect(db, timeout=30) as conn:
        rows = conn.execute("SELECT t.trial_key, t.finished_at, m.extra FROM trials t "
                            "JOIN trial_metrics m ON m.trial_id = t.id WHERE t.status = 'done'").fetchall()
    return {key: (finished_at, json.loads(extra)["worker"]["worker_id"]) for key, finished_at, extra in rows}


def kill_group(process: subprocess.Popen) -> None:
    """The driver and the Ray processes it started share its process group (start_new_session)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=30)


@pytest.mark.slow
def test_a_sweep_stores_every_trial_once_and_the_worker_loads_the_pair_once(micro_pair, tmp_path, ray_tmp, monkeypatch):
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))
    space = {"sps": {"draft_len": [2, 4]}, "pld": {}, "tree": {"branching": [TOO_BIG_TREE]}}
    spec = parse_spec(sweep_spec("micro4", micro_pair, space))
    db = tmp_path / "sweeps.db"
    with connect(f"sqlite:///{db}") as store:
        outcome = run_sweep(spec, store, SweepOptions(storage=str(tmp_path / "tune")))
        trials = store.trials_frame("micro4")
        assert store.get_sweep("micro4").status == "done"
        with store.engine.connect() as conn:
            baselines = conn.execute(sa.text("SELECT count(*) FROM ar_baselines")).scalar_one()
        done = trials[trials.status == "done"]
        detail = store.trial_detail(int(done.trial_id.iloc[0]))

    assert (outcome.status, outcome.trials, outcome.failed) == ("done", 4, 1)
    assert len(trials) == 4 and trials.trial_key.is_unique
    [worker] = outcome.workers
    assert (worker["pair_loads"], worker["baselines_measured"], worker["trials_run"]) == (1, 3, 4)
    assert baselines == 1  # AR measured beside every successful trial; the store keeps the latest

    failed = trials[trials.status == "error"]
    assert failed.method.tolist() == ["tree"]
    assert ("tree: branching=[16, 16, 4] makes a draft tree of 1296 nodes; the model context of 1024 positions "
            "allows 1..1022") in failed.error.iloc[0]  # refused when the worker builds the method
    assert failed.speedup.isna().all()

    assert sorted(done.method) == ["pld", "sps", "sps"]
    assert sorted(done.draft_len.dropna().tolist()) == [2, 4]
    assert (done.speedup > 0).all() and (done.mean_accepted_tokens >= 1).all()
    assert (done.speedup_ci_low <= done.speedup_ci_high).all()
    assert done.lossless.all()  # greedy: every speculative output equals AR's
    assert done.cpu_model.notna().all()
    assert detail["hardware"]["device"] == "cpu" and detail["hardware"]["torch_version"]
    assert len(detail["per_prompt"]) == 2
    assert detail["metrics"]["worker"]["pair_loads"] == 1
    assert detail["metrics"]["decode_s"] > 0


@pytest.mark.slow
def test_a_sweep_takes_a_hybrid_pair(hybrid_micro_pair, tmp_path, ray_tmp, monkeypatch):
    """STree against its branch-by-branch baseline and a chain on the hybrid-micro pair, stored like any sweep's;
    a method that cannot decode a hybrid is stored as an error naming why."""
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))
    space = {"sps": {}, "stree": {"verify": ["tree", "branches"]}, "layerskip": {}}
    spec = parse_spec(sweep_spec("hybrid", hybrid_micro_pair, space))
    with connect(f"sqlite:///{tmp_path / 'sweeps.db'}") as store:
        outcome = run_sweep(spec, store, SweepOptions(storage=str(tmp_path / "tune")))
        trials = store.trials_frame("hybrid")
    assert (outcome.status, outcome.trials, outcome.failed) == ("done", 4, 1)
    done, failed = trials[trials.status == "done"], trials[trials.status == "error"]
    assert sorted(done.method) == ["sps", "stree", "stree"] and done.lossless.all() and (done.speedup > 0).all()
    assert "method 'layerskip' cannot decode a hybrid SSM-attention target" in failed.error.iloc[0]


@pytest.mark.slow
def test_a_driver_killed_mid_sweep_resumes_and_stores_every_trial_exactly_once(micro_pair, tmp_path, ray_tmp):
    space = {"sps": {"draft_len": [1, 2, 3, 4]}, "pld": {}}
    path = write_spec(tmp_path, sweep_spec("resumed", micro_pair, space, max_new_tokens=48,
                                           prompts={"set": "default", "limit": 3}))
    db = tmp_path / "sweeps.db"
    command = [str(BIN / "spectune"), "sweep", str(path), "--db", f"sqlite:///{db}", "--storage", str(tmp_path / "tune")]
    first = subprocess.Popen(command, env=driver_env(ray_tmp), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while count(db, "SELECT count(*) FROM trials WHERE status = 'done'") < 1:
            assert first.poll() is None, first.stdout.read().decode()
            assert time.monotonic() < deadline, "no trial finished within 4 minutes"
            time.sleep(0.2)
    finally:
        kill_group(first)
    before = finished_trials(db)  # the driver is dead: nothing writes the store now
    done_before = len(before)
    assert done_before < 5, "the sweep finished before the driver was killed"
    [first_worker] = {worker for _, worker in before.values()}
    assert count(db, "SELECT count(*) FROM sweeps WHERE name = 'resumed' AND status = 'running'") == 1

    second = subprocess.run([*command, "--resume"], env=driver_env(ray_tmp), capture_output=True, text=True,
                            timeout=300, start_new_session=True)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "sweep resumed done: 5 trials" in second.stdout

    with connect(f"sqlite:///{db}") as store:
        trials = store.trials_frame("resumed")
        assert store.get_sweep("resumed").status == "done"
    assert len(trials) == 5 and trials.trial_key.is_unique
    assert (trials.status == "done").all()
    assert sorted(trials.method) == ["pld", "sps", "sps", "sps", "sps"]
    assert sorted(trials.draft_len.dropna().tolist()) == [1, 2, 3, 4]
    assert count(db, "SELECT count(*) FROM trial_metrics") == 5

    # only the missing trials ran again: a finished one keeps its row as the killed driver stored it
    # (the store upserts, so counting rows alone would pass a resume that re-ran every trial)
    after = finished_trials(db)
    assert {key: after[key] for key in before} == before, "a trial finished before the kill ran again"
    rerun = {key: worker for key, (_, worker) in after.items() if key not in before}
    assert len(rerun) == 5 - done_before
    assert first_worker not in set(rerun.values())  # the resumed driver's own worker ran them


def test_an_unreachable_database_fails_fast_before_ray_starts(micro_pair, tmp_path, ray_tmp):
    path = write_spec(tmp_path, sweep_spec("nodb", micro_pair, {"pld": {}}))
    started = time.monotonic()
    result = subprocess.run(
        [str(BIN / "spectune"), "sweep", str(path), "--db", "postgresql+psycopg://spectune:secret@127.0.0.1:9/none"],
        env=driver_env(ray_tmp), capture_output=True, text=True, timeout=60,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 2
    assert result.stderr.startswith("error: cannot reach database postgresql+psycopg://spectune:***@127.0.0.1:9/none")
    assert "secret" not in result.stderr + result.stdout
    assert elapsed < 10
    assert not any(ray_tmp.iterdir()), "Ray started although the database was unreachable"


def test_a_bad_spec_fails_before_anything_starts(tmp_path, micro_pair):
    bad = write_spec(tmp_path, sweep_spec("bad", micro_pair, {"sps": {"draftlen": [2]}}))
    result = CliRunner().invoke(app, ["sweep", str(bad), "--db", f"sqlite:///{tmp_path / 'x.db'}"])
    assert result.exit_code == 2
    assert "space.sps.draftlen: unknown knob for sps; its knobs: draft_len, schedule, max_draft_len" in result.output
    with connect(f"sqlite:///{tmp_path / 'x.db'}") as store:
        assert store.list_sweeps() == []


def test_a_missing_pair_folder_fails_before_ray_starts_and_says_how_to_build_it(tmp_path, ray_tmp, monkeypatch):
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))
    missing = tmp_path / "pairs" / "tiny-seed3"
    spec = write_spec(tmp_path, sweep_spec("nopair", missing, {"pld": {}}))
    result = CliRunner().invoke(app, ["sweep", str(spec), "--db", f"sqlite:///{tmp_path / 'x.db'}"])
    assert result.exit_code == 2
    assert f"pair.target: model path {missing}/target does not exist" in result.output
    assert "spectune models build --preset tiny --seed 3" in result.output
    assert not any(ray_tmp.iterdir())


def test_demo_refuses_a_folder_holding_another_pair_and_an_unreachable_database(micro_pair, tmp_path):
    runner = CliRunner()
    other = runner.invoke(app, ["demo", "--pair", str(micro_pair), "--db", f"sqlite:///{tmp_path / 'x.db'}"])
    assert other.exit_code == 2 and "holds a micro pair" in other.output
    unreachable = runner.invoke(app, ["demo", "--pair", str(tmp_path / "tiny"), "--db", "postgresql://u:pw@127.0.0.1:9/x"])
    assert unreachable.exit_code == 2 and "cannot reach database" in unreachable.output
    assert not (tmp_path / "tiny").exists()  # nothing was built


def test_an_unreachable_ray_address_fails_in_seconds_and_stores_nothing(micro_pair, tmp_path):
    [closed] = free_ports(1)
    spec = write_spec(tmp_path, sweep_spec("noray", micro_pair, {"pld": {}}))
    result = CliRunner().invoke(app, ["sweep", str(spec), "--db", f"sqlite:///{tmp_path / 'x.db'}",
                                      "--address", f"127.0.0.1:{closed}"])
    assert result.exit_code == 2
    assert f"cannot reach Ray at 127.0.0.1:{closed}: Connection refused" in result.output
    with connect(f"sqlite:///{tmp_path / 'x.db'}") as store:
        assert store.list_sweeps() == []


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture
def ray_head(ray_tmp: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """`ray start --head` with token auth, every port free (other clusters may run here), stopped after.

    Stopped by killing its process group rather than `ray stop`, which would stop every Ray on the machine.
    """
    env = driver_env(ray_tmp, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    gcs, dashboard, agent, agent_grpc, client, runtime_env, metrics = free_ports(7)
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "2", "--disable-usage-stats",
         "--include-dashboard", "true", "--port", str(gcs), "--dashboard-port", str(dashboard),
         "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
         "--ray-client-server-port", str(client), "--runtime-env-agent-port", str(runtime_env),
         "--metrics-export-port", str(metrics)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(head.pid, sig)
            except ProcessLookupError:
                break
            time.sleep(3)
        head.wait(timeout=30)


def submit(address: str, env: dict[str, str], working_dir: Path, entrypoint: list[str]) -> subprocess.CompletedProcess:
    """`ray job submit`, retried while the head's job agent is still starting."""
    deadline = time.monotonic() + 180
    while True:
        result = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(working_dir), "--", *entrypoint],
            env=env, capture_output=True, text=True, timeout=600,
        )
        starting = any(s in result.stdout + result.stderr for s in ("No available agent", "Connection refused",
                                                                     "Failed to connect"))
        if result.returncode == 0 or not starting or time.monotonic() > deadline:
            return result
        time.sleep(3)


@pytest.mark.slow
def test_ray_job_submit_runs_a_sweep_on_a_token_authenticated_cluster(micro_pair, tmp_path, ray_head):
    address, env = ray_head
    job_dir = tmp_path / "job"  # what --working-dir uploads: just the spec
    job_dir.mkdir()
    write_spec(job_dir, sweep_spec("submitted", micro_pair, {"sps": {"draft_len": [2]}, "pld": {}}))
    db = tmp_path / "sweeps.db"  # absolute: the job runs in an unpacked copy of the working dir
    result = submit(address, env, job_dir, ["spectune", "sweep", "submitted.yaml", "--db", f"sqlite:///{db}",
                                            "--storage", str(tmp_path / "tune")])
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "succeeded" in output, output
    assert "sweep submitted done: 2 trials" in output

    with connect(f"sqlite:///{db}") as store:
        trials = store.trials_frame("submitted")
        sweep = store.get_sweep("submitted")
    assert sweep.status == "done" and sweep.ray_address
    assert sorted(trials.method) == ["pld", "sps"]
    assert (trials.status == "done").all() and (trials.speedup > 0).all()
