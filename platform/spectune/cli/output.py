"""Shared CLI output: errors as one line, results as a rich table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table


def fail(message: str, code: int = 2) -> NoReturn:
    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def _fmt(value: Any, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def results_table(rows: Sequence[dict[str, Any]], title: str) -> None:
    table = Table(title=title)
    for column in ("configuration", "speedup", "± std", "tok/s", "tau", "accept", "tree tok/step", "draft share", "overhead", "lossless"):
        table.add_column(column, justify="left" if column == "configuration" else "right")
    for row in rows:
        lossless = {True: "yes", False: f"NO ({row['mismatches']})", None: "n/a (sampling)"}[row["lossless"]]
        if row.get("lossy_method"):
            lossless += " [lossy method]"
        table.add_row(
            row["label"],
            _fmt(row["speedup"]) + "x",
            _fmt(row["speedup_std"]),
            _fmt(row["tokens_per_s"], ".1f"),
            _fmt(row["mean_accepted_tokens"]),
            _fmt(row["acceptance_rate"]),
            _fmt(row["tree_tokens_per_step"], ".1f"),
            _fmt(row["draft_share"], ".0%"),
            _fmt(row["engine_overhead_share"], ".0%"),
            lossless,
        )
    Console().print(table)
