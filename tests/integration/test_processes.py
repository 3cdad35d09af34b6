"""`spectune dashboard` stopped by SIGTERM or SIGINT takes its streamlit child with it: no process
is left behind and the port is free again. (`spectune serve` is checked the same way at the end of
tests/integration/test_serve.py, where its endpoint is stopped.)"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from support import alive, descendants

SPECTUNE = str(Path(sys.executable).with_name("spectune"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_the_dashboard_stops_with_its_child_and_frees_the_port(tmp_path: Path, signum: int) -> None:
    port = free_port()
    env = {**os.environ, "SPECTUNE_CACHE": str(tmp_path / "cache")}
    process = subprocess.Popen([SPECTUNE, "dashboard", "--port", str(port), "--db", f"sqlite:///{tmp_path / 'x.db'}"],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, "the dashboard exited on its own"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/_stcore/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the dashboard did not answer within 2 minutes"
            time.sleep(0.5)
        children = descendants(process.pid)
        assert children, "streamlit runs as a child of `spectune dashboard`"
        process.send_signal(signum)
        assert process.wait(timeout=30) == 0
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in children if alive(pid)], "a child outlived `spectune dashboard`"
        assert port_is_free(port)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
