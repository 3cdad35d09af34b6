"""`spectune dashboard`: the Streamlit dashboard on a results store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import typer

from spectune.cli.output import fail


def app_path() -> Path:
    """The installed dashboard entry script (``dashboard/app.py`` of the package)."""
    import spectune.dashboard

    return Path(spectune.dashboard.__file__).resolve().parent / "app.py"


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
    try:
        code = subprocess.call(streamlit_command(host, port), env=env)
    except KeyboardInterrupt:
        code = 0
    raise typer.Exit(code)
