"""The `spectune` command line: one typer app, each command group in its own module."""

from __future__ import annotations

import typer

from spectune.cli import bench_cmd, methods_cmd, models_cmd
from spectune.cli import store_cmd
from spectune.cli import dashboard_cmd
from spectune.cli import serve_cmd
from spectune.cli import trees_cmd
from spectune.cli import sweep_cmd
from spectune.cli import heads_cmd
from spectune.cli import cluster_cmd
from spectune.cli import vllm_cmd

app = typer.Typer(
    name="spectune",
    help="Sweep, compare and serve speculative-decoding configurations.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(models_cmd.app, name="models")
app.command("bench")(bench_cmd.bench)
app.command("methods")(methods_cmd.methods)

# Command groups added by other modules register here, one line each.
app.command("results")(store_cmd.results)
app.add_typer(store_cmd.sweeps_app, name="sweeps")
app.command("dashboard")(dashboard_cmd.dashboard)
app.command("serve")(serve_cmd.serve)
app.add_typer(trees_cmd.app, name="trees")
app.command("sweep")(sweep_cmd.sweep)
app.command("demo")(sweep_cmd.demo)
app.add_typer(heads_cmd.app, name="heads")
app.add_typer(cluster_cmd.app, name="cluster")
app.add_typer(vllm_cmd.app, name="vllm")


def main() -> None:
    _quiet_libraries()
    app()


def _quiet_libraries() -> None:
    """Our own progress bars and errors only: no weight-loading bars or advisory warnings."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
