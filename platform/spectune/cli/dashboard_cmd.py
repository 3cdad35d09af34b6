"""`spectune dashboard`: the Streamlit dashboard on a results store."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import typer

from spectune.cli.output import fail

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
STOP_WAIT_S = 15.0  # after passing a signal on, how long the child has before it is killed


def app_path() -> Path:
    """The installed dashboard entry script (``dashboard/app.py`` of the package), found without importing
    the dashboard: the CLI runs below it, and streamlit imports the app in its own process."""
    spec = importlib.util.find_spec("spectune.dashboard")
    if spec is None or spec.origin is None:
        raise RuntimeError("the spectune.dashboard package is not installed with spectune; reinstall it (pip install -e .)")
    return Path(spec.origin).resolve().parent / "app.py"


def streamlit_command(host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "streamlit", "run", str(app_path()),
            "--server.headless", "true", "--server.address", host, "--server.port", str(port),
            "--browser.gatherUsageStats", "false", "--client.toolbarMode", "viewer",
            "--theme.base", "light"]


def dashboard(
    db: str = typer.Option(None, "--db", help="Results store URL or SQLite path "
                           "(default: $SPECTUNE_DB or ~/.cache/spectune/spectune.db)"),
    port: int = typer.Option(8501, "--port", min=1, max=65535, help="Port to listen on"),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on "
                             "(0.0.0.0 to reach it from other machines)"),
) -> None:
    """Open the Pareto-front dashboard (Streamlit) on a results store."""
    from spectune.store import mask_url, resolve_url

    if not app_path().is_file():
        fail(f"dashboard entry {app_path()} is missing: reinstall spectune")
    url = resolve_url(db)
    env = {**os.environ, "SPECTUNE_DB": url}  # env, not argv: a password stays out of `ps`
    typer.echo(f"spectune dashboard on http://{host}:{port}  (store: {mask_url(url)})")
    code = run_passing_signals(streamlit_command(host, port), env)
    raise typer.Exit(0 if code in (-signal.SIGINT, -signal.SIGTERM) else code)


def run_passing_signals(command: list[str], env: dict[str, str]) -> int:
    """Run `command` until it exits, passing SIGTERM, SIGINT and SIGHUP on to it; its exit code.

    Without this, a SIGTERM ends this process at once and leaves the child (streamlit) running,
    holding the port. A child that has not exited `STOP_WAIT_S` after a signal is killed.
    """
    child = subprocess.Popen(command, env=env)
    asked: list[float] = []

    def pass_on(signum: int, _frame: object) -> None:
        asked.append(time.monotonic())
        if child.poll() is None:
            child.send_signal(signum)

    previous = {signum: signal.signal(signum, pass_on) for signum in FORWARDED}
    try:
        while True:
            try:
                return child.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                if asked and time.monotonic() - asked[0] > STOP_WAIT_S:
                    child.kill()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
