"""`spectune results SWEEP` and `spectune sweeps list`: read the results store."""

from __future__ import annotations

import json
import math
from datetime import datetime
from typing import Any

import pandas as pd
import typer

from spectune.cli.output import fail

DEFAULT_OBJECTIVES = {"speedup": "max", "tree_tokens_per_step": "min"}
_TABLE_COLUMNS = ("method", "draft_len", "tree_shape", "node_budget", "exit_layer", "temperature")
_SHOWN_METRICS = ("mean_accepted_tokens", "speedup", "tree_tokens_per_step", "lossless")
_LABELS = {"draft_len": "k", "tree_shape": "shape", "node_budget": "budget", "exit_layer": "exit",
           "temperature": "temp", "mean_accepted_tokens": "tau",
           "tree_tokens_per_step": "tree tok", "draft_calls_per_step": "drafts/step", "speedup_ci": "95% CI"}

sweeps_app = typer.Typer(help="Sweeps recorded in the results store.", no_args_is_help=True)

_DB_HELP = "Database URL or SQLite path (default: $SPECTUNE_DB or ~/.cache/spectune/spectune.db)."


def open_store(db: str | None) -> Any:
    """The store, or exit 2 with one line when the database cannot be reached."""
    from spectune.store import StoreUnavailable, connect

    try:
        return connect(db)
    except StoreUnavailable as err:
        fail(str(err))


def parse_objectives(items: list[str]) -> dict[str, str]:
    """``["speedup:max", "tree_tokens_per_step:min"]`` -> ``{"speedup": "max", ...}``."""
    from spectune.store import NUMERIC_METRICS

    out: dict[str, str] = {}
    for item in items:
        metric, _, mode = item.partition(":")
        mode = mode or "max"
        if metric not in NUMERIC_METRICS or mode not in ("max", "min"):
            raise typer.BadParameter(
                f"{item!r}: expected METRIC:max|min with METRIC one of {', '.join(NUMERIC_METRICS)}",
                param_hint="--objective")
        out[metric] = mode
    return out


def spec_objectives(spec: dict[str, Any]) -> dict[str, str]:
    """Objectives stored in a sweep spec (``objectives: [{metric, mode}]``), else the defaults."""
    found = {o["metric"]: o.get("mode", "max") for o in spec.get("objectives") or []
             if isinstance(o, dict) and o.get("metric")}
    return found or dict(DEFAULT_OBJECTIVES)


def _plain(value: Any) -> Any:
    """A JSON-ready value: NaN/NaT/NA -> None, timestamps -> ISO strings, numpy -> Python."""
    if value is None or isinstance(value, (str, bool, dict, list)):
        return value
    if pd.isna(value):
        return None
    if isinstance(value, datetime):  # pandas Timestamp included
        return value.isoformat()
    if hasattr(value, "item"):
        value = value.item()
    return None if isinstance(value, float) and math.isinf(value) else value


def _fmt(value: Any) -> str:
    value = _plain(value)
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def results(
    sweep_arg: str | None = typer.Argument(None, metavar="SWEEP", help="Sweep name (or --sweep)."),
    sweep_opt: str | None = typer.Option(None, "--sweep", help="Sweep name."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    db: str | None = typer.Option(None, "--db", help=_DB_HELP),
    objective: list[str] | None = typer.Option(
        None, "--objective", help="METRIC:max|min, repeatable (default: the sweep spec's "
        "objectives, else speedup:max and tree_tokens_per_step:min)."),
    include_unchecked: bool = typer.Option(False, "--include-unchecked", help="Let sampling trials (lossless by "
                                           "the method's rule, outputs unchecked) on the front."),
) -> None:
    """Trials of a sweep with its Pareto front (certified lossless trials only) marked ★; ≈ marks a
    speedup within noise (95% intervals overlap) of a front point no more costly."""
    from spectune.pareto import pareto_front, unchecked_rows

    sweep = sweep_opt or sweep_arg
    if sweep is None:
        fail("name the sweep: spectune results --sweep NAME (spectune sweeps list shows them)")
    store = open_store(db)
    row = store.get_sweep(sweep)
    if row is None:
        known = ", ".join(s.name for s in store.list_sweeps()) or "none"
        typer.echo(f"error: no sweep named {sweep!r} (known: {known})", err=True)
        raise typer.Exit(1)
    objectives = parse_objectives(objective) if objective else spec_objectives(row.spec)
    df = store.trials_frame(sweep)
    missing = [m for m in objectives if m not in df.columns]
    if missing:
        typer.echo(f"error: objective(s) {', '.join(missing)} are not stored metrics", err=True)
        raise typer.Exit(1)
    front = pareto_front(df, objectives, include_unchecked=include_unchecked)
    front_ids = [int(i) for i in df.loc[front.to_numpy(), "trial_id"]]
    if json_out:
        trials = [{k: _plain(v) for k, v in rec.items()} for rec in df.to_dict("records")]
        for t in trials:
            t["on_front"] = t["trial_id"] in front_ids
        typer.echo(json.dumps({"sweep": sweep, "objectives": [
            {"metric": m, "mode": mode} for m, mode in objectives.items()],
            "trials": trials, "front": front_ids}, default=str))
        return
    _print_results(sweep, row.status, df, front, objectives)
    if not include_unchecked and unchecked_rows(df).any():
        typer.echo(f"{int(unchecked_rows(df).sum())} sampling trial(s) unchecked, kept off the front "
                   "(--include-unchecked lets them on)")


def _print_results(sweep: str, status: str, df: Any, front: Any, objectives: dict[str, str]) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    metrics = list(objectives) + [m for m in _SHOWN_METRICS if m not in objectives]
    if "speedup" in metrics and df["speedup_ci_low"].notna().any():
        metrics.insert(metrics.index("speedup") + 1, "speedup_ci")
    knobs = [c for c in _TABLE_COLUMNS if df[c].notna().any()]  # only knobs this sweep turns
    knobs += ["node"] if df["node"].notna().any() else []  # a sweep spread over a cluster: where each ran
    table = Table(title=f"{sweep} ({status}): " + ", ".join(f"{m} {v}" for m, v in objectives.items()),
                  box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for col in ("", "id", "status", *knobs, *metrics):
        label = _LABELS.get(col, col.replace("_", " "))
        width = None if col == "tree_shape" else len("0.00-0.00") if col == "speedup_ci" else len(label)
        table.add_column(label, overflow="fold", min_width=width,
                         justify="right" if col in metrics or col == "id" else "left")
    noise = _within_noise(df, front, objectives)
    for (_, rec), on, tied in zip(df.iterrows(), front.to_numpy(), noise, strict=True):
        cells = [("★" if on else "") + ("≈" if tied else ""), str(rec["trial_id"]), str(rec["status"])]
        cells += [_cell(rec, c) for c in (*knobs, *metrics)]
        table.add_row(*cells, style="bold" if on else None)
    Console().print(table)
    n_err = int((df["status"] == "error").sum())
    typer.echo(f"{len(df)} trials, {int(front.sum())} on the front"
               + (f", {n_err} failed" if n_err else ""))
    for line in failed_nodes(df):
        typer.echo(line)
    _print_by_load(df)


def failed_nodes(df: Any) -> list[str]:
    """One line per node whose worker died under a trial (its trials failed with "worker ... died")."""
    died = df[(df["status"] == "error") & df["node"].notna() & df["error"].fillna("").str.contains(" died ")]
    return [f"node {node}: its worker died, {n} trial(s) failed there (see their errors)"
            for node, n in died.groupby("node").size().items()]


def _print_by_load(df: Any) -> None:
    """Sweeps with a load axis (vLLM): speedup per configuration and concurrency, and the best at each load."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from spectune.backends.load_table import best_per_load, speedup_table

    by_load = speedup_table(df)
    if by_load.empty:
        return
    table = Table(title="speedup by load (requests in flight)", box=box.SIMPLE_HEAD, show_edge=False)
    table.add_column("configuration", overflow="fold")
    for column in by_load.columns:
        table.add_column(column, justify="right")
    best = best_per_load(df).set_index("concurrency")["best configuration"]
    for label, values in by_load.iterrows():
        cells = [f"{v:.2f}" + ("★" if best.get(int(c[2:])) == label else "") if v == v else "-"
                 for c, v in values.items()]
        table.add_row(label, *cells)
    Console().print(table)


def _cell(rec: Any, column: str) -> str:
    if column == "speedup_ci":
        return _ci(rec)
    if column == "lossless" and rec["status"] == "done":
        from spectune.lossless import FACTS, lossless_text

        return lossless_text({key: _plain(rec.get(key)) for key in FACTS})
    return _fmt(rec[column])


def _ci(rec: Any) -> str:
    low, high = _plain(rec["speedup_ci_low"]), _plain(rec["speedup_ci_high"])
    return "-" if low is None or high is None else f"{low:.2f}-{high:.2f}"


def _within_noise(df: Any, front: Any, objectives: dict[str, str]) -> list[bool]:
    """≈ marks: the speedup's interval overlaps a front point no more costly (one cost objective besides speedup)."""
    from spectune.pareto import within_noise

    costs = [m for m in objectives if m != "speedup"]
    if "speedup" not in objectives or len(costs) != 1:
        return [False] * len(df)
    return within_noise(df, front, costs[0], x_mode=objectives[costs[0]]).tolist()


@sweeps_app.command("list")
def list_sweeps(
    db: str | None = typer.Option(None, "--db", help=_DB_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Every sweep, newest first, with trial counts by status."""
    store = open_store(db)
    sweeps = store.list_sweeps()
    if json_out:
        typer.echo(json.dumps([{
            "name": s.name, "status": s.status, "n_trials": s.n_trials, "total": s.total,
            "created_at": _plain(s.created_at), "started_at": _plain(s.started_at),
            "finished_at": _plain(s.finished_at), "hardware": s.hardware} for s in sweeps]))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"sweeps in {store.url}")
    for col in ("name", "status", "trials", "done", "running", "pending", "error", "started",
                "hardware"):
        table.add_column(col)
    for s in sweeps:
        started = s.started_at.strftime("%Y-%m-%d %H:%M") if s.started_at else "-"
        table.add_row(s.name, s.status, str(s.total), *(str(s.n_trials[k]) for k in (
            "done", "running", "pending", "error")), started, s.hardware or "-")
    Console().print(table)
