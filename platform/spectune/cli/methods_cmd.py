"""`spectune methods`: the registry as a table, or as the Markdown of docs/methods.md."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

COLUMNS = ("method", "summary", "paper", "knobs", "cost per step", "lossless rule")


def methods(markdown: bool = typer.Option(False, "--markdown", help="Print docs/methods.md.")) -> None:
    """List every registered decoding method with its knobs, cost and lossless rule."""
    rows = method_rows()
    if markdown:
        typer.echo(methods_markdown(rows), nl=False)
        return
    table = Table(title="decoding methods")
    for column in COLUMNS:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    Console().print(table)


def method_rows() -> list[tuple[str, ...]]:
    from spectune.methods import METHODS

    rows = []
    for name in METHODS.names():
        method = METHODS.get(name)
        knobs = ", ".join(f"`{k}`={f.default!r}" for k, f in method.knobs.model_fields.items()) or "-"
        rule = method.rule if method.lossless else f"**LOSSY**: {method.rule}"
        rows.append((f"`{name}`", method.summary, method.paper, knobs, method.cost, rule))
    return rows


def methods_markdown(rows: list[tuple[str, ...]]) -> str:
    lines = [
        "# Decoding methods",
        "",
        "Generated from the method registry by `spectune methods --markdown > docs/methods.md`;",
        "a test keeps this file in step with the code. Every method is checked against plain",
        "decoding: greedy outputs identical token for token, sampling by chi-square tests.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
