"""`spectune serve`: host a configuration as an OpenAI-style endpoint on Ray Serve.

Without --address it starts a local Ray, serves in the foreground until Ctrl-C or
`spectune serve --stop`, and records itself in ~/.cache/spectune/serve/PORT.json so that
--stop can find it. With --address it deploys onto that Ray cluster and returns (the app
lives on in the cluster); `spectune serve --stop --address ...` removes it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import typer

from spectune.cli.output import fail
from spectune.validation import one_line

DEFAULT_PORT = 8000
STOP_WAIT_S = 60.0


def serve(
    sweep: str | None = typer.Option(None, help="Serve the best lossless finished trial of this sweep."),
    objective: str = typer.Option("speedup", help="With --sweep: the metric that picks the best trial."),
    mode: str | None = typer.Option(None, help="With --sweep: max or min (default: the spec's mode, else max)."),
    include_unchecked: bool = typer.Option(False, "--include-unchecked", help="With --sweep: sampling trials "
                                           "(lossless by the method's rule, outputs unchecked) may win too."),
    concurrency: int | None = typer.Option(None, min=1, help="With --sweep: the best trial measured at this many "
                                           "requests in flight (a vLLM sweep's load axis)."),
    schedule: bool = typer.Option(False, "--schedule", help="With --sweep (a vLLM load sweep): serve its per-load "
                                  "schedule of speculative tokens (`spectune vllm schedule`)."),
    min_speedup: float = typer.Option(1.0, min=0.0, help="With --schedule: a k serves a load only where its "
                                      "speedup's 95% interval lies above this."),
    trial: int | None = typer.Option(None, help="Serve this trial (id from `spectune results`)."),
    config: Path | None = typer.Option(None, help="YAML file: pair (micro | PAIR_DIR | {target, drafter}), method, knobs."),
    db: str | None = typer.Option(None, help="Store URL or SQLite path (default: $SPECTUNE_DB or ~/.cache/spectune/spectune.db)."),
    host: str = typer.Option("127.0.0.1", help="Address to bind; 0.0.0.0 exposes the endpoint to the network."),
    port: int | None = typer.Option(None, help=f"HTTP port (default {DEFAULT_PORT}); with --stop: only this one."),
    replicas: int = typer.Option(1, min=1, help="Replicas (each loads the pair once)."),
    max_replicas: int | None = typer.Option(None, help="Autoscale from --replicas up to this many under load."),
    max_replicas_per_node: int | None = typer.Option(None, min=1, help="At most this many replicas on one Ray node "
                                                     "(1: losing a node loses one replica)."),
    num_cpus: float = typer.Option(1.0, min=0.0, help="CPUs per replica (also its torch threads)."),
    num_gpus: float = typer.Option(0.0, min=0.0, help="GPUs per replica (fractions share a GPU)."),
    device: str | None = typer.Option(None, help="cpu, cuda, ... (default: cuda when the replica has a GPU)."),
    max_tokens_limit: int = typer.Option(512, min=1, help="Largest max_tokens a request may ask for."),
    decode_threads: int = typer.Option(2, min=1, help="Requests a replica decodes at once; the rest queue."),
    api_key: str | None = typer.Option(None, envvar="SPECTUNE_API_KEY", help="Require 'Authorization: Bearer KEY'."),
    address: str | None = typer.Option(None, help="Deploy onto this Ray cluster (auto, ray://...) and return."),
    stop: bool = typer.Option(False, "--stop", help="Stop the endpoint (this machine's, or the one on --address)."),
) -> None:
    """Serve the best configuration (or a given trial / config file) at /v1/completions."""
    if stop:
        _stop(address, port)
        return
    from pydantic import ValidationError

    from spectune.workers.serve.served_config import ServeArgs, ServeConfigError, choose

    try:
        args = ServeArgs(config=str(config) if config else None, trial=trial, sweep=sweep, objective=objective,
                         mode=mode, include_unchecked=include_unchecked, concurrency=concurrency, schedule=schedule, min_speedup=min_speedup, db=db, device=device, max_tokens_limit=max_tokens_limit,
                         decode_threads=decode_threads, api_key=api_key)
        served = choose(args)
    except ValidationError as err:
        fail(one_line(err, locations=False))
    except ServeConfigError as err:
        fail(str(err))
    if max_replicas is not None and max_replicas < replicas:
        fail(f"--max-replicas ({max_replicas}) is below --replicas ({replicas})")
    port = DEFAULT_PORT if port is None else port
    url = f"http://{host}:{port}"
    from spectune.workers.serve.app import bind

    autoscaling = None if max_replicas is None else {
        "min_replicas": replicas, "max_replicas": max_replicas, "target_ongoing_requests": decode_threads}
    app = bind(served, args.limits, args.resolved_api_key, replicas=replicas, autoscaling=autoscaling,
               num_cpus=num_cpus, num_gpus=num_gpus, max_replicas_per_node=max_replicas_per_node)
    if address is not None:
        _start_ray(address, replicas * num_cpus, replicas * num_gpus)
        _deploy_or_fail(app, host, port)
        typer.echo(f"serving {served.model_id} at {url}/v1/completions on {address}; "
                   f"stop with `spectune serve --stop --address {address}`")
        return
    _check_port_free(host, port)
    stopping = threading.Event()
    _stop_on_signal(stopping)
    record = _record_running(port, url, served.model_id)  # from now on `serve --stop` finds this process
    try:
        _start_ray(None, replicas * num_cpus, replicas * num_gpus)
        _stop_on_signal(stopping)  # again: a local Ray head installs its own SIGTERM handler, which exits at once
        typer.echo(f"loading {served.model_id} ({served.source.kind}) on {replicas} replica(s)...")
        if certificate := _certificate(served.trial_metrics):
            typer.echo(certificate)
        _deploy_or_fail(app, host, port)
        typer.echo(f"serving {served.model_id} at {url}/v1/completions and /v1/chat/completions "
                   "(Ctrl-C or `spectune serve --stop` to stop)")
        while not stopping.wait(0.5):
            pass
    finally:
        _shutdown(record)


def _deploy_or_fail(app: Any, host: str, port: int) -> None:
    from spectune.workers.serve.app import deploy

    try:
        deploy(app, host=host, port=port)
    except RuntimeError as err:  # Serve's "Deploying application ... failed"; the reason is in its status
        fail(f"the endpoint did not start: {_last_error_line(_deployment_message() or str(err))}")


def _deployment_message() -> str:
    from ray import serve

    from spectune.workers.serve.app import APP_NAME, DEPLOYMENT_NAME

    application = serve.status().applications.get(APP_NAME)
    deployment = application.deployments.get(DEPLOYMENT_NAME) if application else None
    return deployment.message if deployment else ""


def _last_error_line(message: str) -> str:
    """The replica's own exception line out of Serve's multi-line failure report (a traceback)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    errors = [line for line in lines if "Error: " in line or "Exception: " in line]
    return errors[-1] if errors else lines[0] if lines else "unknown error"


def _check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as err:
            fail(f"cannot listen on {host}:{port}: {err.strerror} (another `spectune serve`? "
                 f"stop it with `spectune serve --stop`, or pick --port)")


def _start_ray(address: str | None, cpus_needed: float, gpus_needed: float) -> None:
    import ray

    if address is None:
        ray.init(address="local", include_dashboard=False, log_to_driver=True)  # a new cluster, never one found on the machine
    else:
        try:
            ray.init(address=address)
        except ConnectionError as err:
            fail(f"cannot reach the Ray cluster at {address}: {err}")
    resources = ray.cluster_resources()
    for name, needed in (("CPU", cpus_needed), ("GPU", gpus_needed)):
        have = resources.get(name, 0.0)
        if needed > have:
            ray.shutdown()
            fail(f"the replicas need {needed:g} {name}s in all but the Ray cluster has {have:g} "
                 "(lower --replicas, --num-cpus or --num-gpus)")


def _stop_on_signal(stopping: threading.Event) -> None:
    """Ctrl-C and SIGTERM (`serve --stop`) end the wait; the caller then shuts Serve and Ray down."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())


def _record_running(port: int, url: str, model_id: str) -> Path:
    record = _state_file(port)
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"pid": os.getpid(), "url": url, "model": model_id, "started": time.time()}))
    return record


def _shutdown(record: Path) -> None:
    import ray
    from ray import serve

    typer.echo("stopping...")
    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()
    record.unlink(missing_ok=True)
    typer.echo("stopped")


def _stop(address: str | None, port: int | None) -> None:
    if address is not None:
        import ray
        from ray import serve

        from spectune.workers.serve.app import APP_NAME

        ray.init(address=address)
        serve.delete(APP_NAME)
        typer.echo(f"stopped the endpoint on {address}")
        return
    records = [_state_file(port)] if port is not None else sorted(_state_dir().glob("*.json"))
    running = [(path, state) for path in records if (state := _read_state(path)) is not None]
    if not running:
        where = f"on port {port}" if port is not None else "on this machine"
        fail(f"no `spectune serve` is running {where}")
    for path, state in running:
        _terminate(path, state)


def _terminate(path: Path, state: dict[str, Any]) -> None:
    pid = int(state["pid"])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_WAIT_S
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _alive(pid):
        fail(f"the endpoint at {state['url']} (pid {pid}) did not stop within {STOP_WAIT_S:.0f} s")
    path.unlink(missing_ok=True)
    typer.echo(f"stopped the endpoint at {state['url']} (pid {pid})")


def _read_state(path: Path) -> dict[str, Any] | None:
    """The record of a running `spectune serve`, or None (removing a stale one)."""
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not _is_spectune_serve(int(state.get("pid", 0))):
        path.unlink(missing_ok=True)  # the process is gone (or the pid was reused)
        return None
    return state


def _is_spectune_serve(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return _alive(pid) if pid > 0 and not Path("/proc").is_dir() else False
    words = [word.decode(errors="replace") for word in cmdline]
    return any("spectune" in word for word in words) and "serve" in words


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # an exited child its parent has not reaped yet is a zombie: gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _state_dir() -> Path:
    from spectune.paths import cache_dir

    return cache_dir("serve")


def _state_file(port: int) -> Path:
    return _state_dir() / f"{port}.json"


def _certificate(metrics: dict | None) -> str | None:
    """Which greedy certificate the served trial passed: identical to AR, or within its dtype's tolerance."""
    from spectune.lossless import LosslessStatus, lossless_text

    status = (metrics or {}).get("lossless_status")
    if status is None or not LosslessStatus(status).certified:
        return None
    return lossless_text(metrics, long=True)
