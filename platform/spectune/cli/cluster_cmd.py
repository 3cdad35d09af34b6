"""`spectune cluster up / down`: a Ray cluster of several nodes on this machine, with token auth."""

from __future__ import annotations

import shlex
from pathlib import Path

import typer

from spectune.cli.output import fail

app = typer.Typer(help="A local multi-node Ray cluster (token auth) for trying the cluster path.",
                  no_args_is_help=True)

FOLDER_HELP = "The cluster's folder: its state, token, logs and Ray's files (default: /tmp/spectune-cluster-UID)"


@app.command("up")
def up(
    nodes: int = typer.Option(2, "--nodes", min=1, help="Worker nodes besides the head (the head offers no CPUs)"),
    cpus: float = typer.Option(2.0, "--cpus", min=0.001, help="Logical CPUs each worker node offers"),
    folder: Path = typer.Option(None, "--dir", help=FOLDER_HELP),
) -> None:
    """Start a head and --nodes worker nodes; print the address and how to submit a sweep."""
    from spectune.cluster import ClusterError
    from spectune.cluster import up as start

    try:
        cluster = start(nodes, cpus, folder)
    except ClusterError as err:
        fail(str(err))
    env = cluster.env()
    typer.echo(f"cluster up: head + {nodes} worker node(s) of {cpus:g} CPUs "
               f"({', '.join(n.name for n in cluster.nodes)}); logs in {cluster.folder}")
    typer.echo(f"address {cluster.address}, job API {cluster.dashboard}")
    typer.echo("use it from this shell:")
    typer.echo("  export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()))
    typer.echo(f"  ray job submit --address {cluster.dashboard} --working-dir sweeps/specs -- "
               "spectune sweep quick.yaml --db sqlite:////ABSOLUTE/PATH/spectune.db")
    typer.echo(f"stop it: spectune cluster down{'' if folder is None else f' --dir {shlex.quote(str(folder))}'}")


@app.command("add")
def add(
    cpus: float = typer.Option(2.0, "--cpus", min=0.001, help="Logical CPUs the new worker node offers"),
    folder: Path = typer.Option(None, "--dir", help=FOLDER_HELP),
) -> None:
    """Join one more worker node to the running cluster (a sweep in progress starts workers on it)."""
    from spectune.cluster import ClusterError, add_node

    try:
        node = add_node(folder, cpus)
    except ClusterError as err:
        fail(str(err))
    typer.echo(f"node {node.name} joined with {cpus:g} CPUs; log {node.log}")


@app.command("down")
def down(folder: Path = typer.Option(None, "--dir", help=FOLDER_HELP)) -> None:
    """Stop every node `cluster up` started (their process groups only: no other Ray on the machine)."""
    from spectune.cluster import ClusterError
    from spectune.cluster import down as stop

    try:
        stopped = stop(folder)
    except ClusterError as err:
        fail(str(err))
    typer.echo(f"cluster down: stopped {', '.join(stopped)}")
