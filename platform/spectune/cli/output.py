"""Shared CLI output: errors as one line, results as a rich table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from spectune.lossless import FACTS, lossless_text
from spectune.results import DecodeResult


def fail(message: str, code: int = 2) -> NoReturn:
    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def _fmt(value: Any, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


COLUMNS = ("configuration", "speedup", "± std", "tok/s", "tau", "accept", "tree tok/step", "draft share", "overhead", "lossless")


def _cells(row: DecodeResult) -> list[str]:
    return [
        row.label,
        _fmt(row.speedup) + "x",
        _fmt(row.speedup_std),
        _fmt(row.tokens_per_s, ".1f"),
        _fmt(row.counts.mean_accepted_tokens),
        _fmt(row.counts.acceptance_rate),
        _fmt(row.counts.tree_tokens_per_step, ".1f"),
        _fmt(row.draft_share, ".0%"),
        _fmt(row.engine_overhead_share, ".0%"),
        lossless_text({key: getattr(row, key) for key in FACTS}),
    ]


def results_table(rows: Sequence[DecodeResult], title: str) -> None:
    table = Table(title=title)
    for column in COLUMNS:
        table.add_column(column, justify="left" if column == "configuration" else "right")
    for row in rows:
        table.add_row(*_cells(row))
    Console().print(table)


def results_markdown(rows: Sequence[DecodeResult]) -> str:
    """The same columns as a Markdown table (for docs/benchmarks.md), plus every repeat's speedup."""
    header = [*COLUMNS[:3], "repeats", *COLUMNS[3:]]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 2) + "---|"]
    for row in rows:
        cells = _cells(row)
        repeats = ", ".join(f"{s:.2f}" for s in row.speedups)
        cells = [f"`{cells[0]}`", *cells[1:3], repeats, *cells[3:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
