"""Frozen twins (vllm.measure: frozen): a server's processes stop taking CPU while frozen and go on when thawed;
`stop` ends a frozen server; and when the process that froze it dies, its watchdog thaws and ends the group, so
no frozen server outlives the worker. A process group of plain `sleep`s stands in for vLLM's (the server and its
engine process): what is tested is the signalling, which does not depend on what runs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from spectune.workers.vllm.server import Launch, VllmServer, _die_with_parent


def process_state(pid: int) -> str:
    """One letter from /proc: R running, S sleeping, T stopped; 'gone' once reaped or never there."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return "gone"


def group_of_sleeps(tmp_path: Path) -> VllmServer:
    """A 'server' whose group holds two processes, like vLLM's API server and its engine core."""
    process = subprocess.Popen(["sh", "-c", "sleep 120 & exec sleep 120"], preexec_fn=_die_with_parent)
    return VllmServer(Launch(python=sys.executable, model="none"), process, 0, tmp_path / "log")


def members(server: VllmServer) -> list[int]:
    pgid = server.process.pid
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and _pgid(int(p)) == pgid]


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def wait_for(predicate, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_a_frozen_server_is_stopped_in_every_process_and_thaws(tmp_path):
    server = group_of_sleeps(tmp_path)
    try:
        assert wait_for(lambda: len(members(server)) == 2)
        server.freeze()
        assert server.frozen and wait_for(lambda: all(process_state(p) == "T" for p in members(server)))
        server.freeze()  # idempotent
        server.thaw()
        assert not server.frozen and wait_for(lambda: all(process_state(p) == "S" for p in members(server)))
    finally:
        server.stop(timeout_s=5)


def test_stop_ends_a_frozen_server_and_its_watchdog(tmp_path):
    server = group_of_sleeps(tmp_path)
    assert wait_for(lambda: len(members(server)) == 2)
    pids = members(server)
    server.freeze()
    watchdog = server.watchdog
    assert watchdog is not None and watchdog.poll() is None
    started = time.monotonic()
    server.stop(timeout_s=5)
    assert time.monotonic() - started < 5, "SIGTERM reached the frozen group only after the SIGKILL fallback"
    assert not server.alive() and watchdog.poll() is not None
    assert wait_for(lambda: all(process_state(p) in ("gone", "Z") for p in pids))


def test_the_watchdog_ends_a_frozen_server_whose_worker_died(tmp_path):
    """A worker (here a child Python) freezes its server and is killed with SIGKILL: no cleanup of its own runs."""
    script = textwrap.dedent(f"""
        import subprocess, sys, time
        from pathlib import Path
        from spectune.workers.vllm.server import Launch, VllmServer, _die_with_parent
        process = subprocess.Popen(["sh", "-c", "sleep 120 & exec sleep 120"], preexec_fn=_die_with_parent)
        server = VllmServer(Launch(python=sys.executable, model="none"), process, 0, Path({str(tmp_path / 'log')!r}))
        time.sleep(0.5)
        server.freeze()
        print(process.pid, flush=True)
        time.sleep(120)
    """)
    worker = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    group = int(worker.stdout.readline())
    pids = [int(p) for p in os.listdir("/proc") if p.isdigit() and _pgid(int(p)) == group]
    assert pids and wait_for(lambda: all(process_state(p) == "T" for p in pids))
    worker.kill()
    worker.wait()
    assert wait_for(lambda: not [p for p in pids if process_state(p) not in ("gone", "Z")], timeout_s=15), (
        f"a frozen group outlived its worker: {[(p, process_state(p)) for p in pids]}")
