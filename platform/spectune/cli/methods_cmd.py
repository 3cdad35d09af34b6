"""`spectune methods`: the registry, one block per method, or as the Markdown of docs/methods.md.

The terminal view is a block per method (heading, then label/value rows) rather than one
six-column table: a table squeezes every cell to a few characters at 80 columns, while
blocks wrap their text to whatever width the terminal has.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer
from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from spectune.methods.base import Method

COLUMNS = ("method", "summary", "paper", "knobs", "cost per step", "lossless rule", "hybrid SSM-attention target")


def methods(markdown: bool = typer.Option(False, "--markdown", help="Print docs/methods.md.")) -> None:
    """List every registered decoding method with its knobs, cost and lossless rule."""
    if markdown:
        typer.echo(methods_markdown(method_rows()), nl=False)
        return
    print_methods(Console())


def print_methods(console: Console) -> None:
    """Every registered method as a block, wrapped to the console's width."""
    from spectune.methods import METHODS

    console.print(Text("decoding methods", style="bold underline"))
    for name in METHODS.names():
        console.print()
        console.print(method_block(METHODS.get(name)))


def method_block(method: Method) -> Group:
    """A heading (the name, and LOSSY when the method is not lossless) over label/value
    rows; the label column never wraps, the values wrap at word boundaries."""
    heading = Text(method.name, style="bold cyan")
    if not method.lossless:
        heading.append("  LOSSY", style="bold red")
    rows = Table.grid(padding=(0, 2))
    rows.add_column(style="dim", no_wrap=True)
    rows.add_column(ratio=1, overflow="fold")
    rows.add_row("summary", method.summary)
    rows.add_row("paper", method.paper)
    rows.add_row("knobs", _knob_rows(method))
    rows.add_row("cost", method.cost)
    rows.add_row("rule", method.rule)
    rows.add_row("hybrid", method.hybrid_support())
    return Group(heading, rows)


def _knob_rows(method: Method) -> _Knobs | str:
    fields = method.knobs.model_fields
    if not fields:
        return "-"
    return _Knobs([(Text.assemble((key, "bold"), f" = {field.default!r}"), field.description or "")
                   for key, field in fields.items()])


class _Knobs:
    """One knob per line: ``name = default`` (never wrapped) and its description.

    The description sits beside the name while that leaves it a readable width
    (``MIN_DESCRIPTION`` columns), else on the lines below, indented, so narrow
    terminals do not squeeze it to a few characters per line.
    """

    MIN_DESCRIPTION = 30

    def __init__(self, knobs: list[tuple[Text, str]]) -> None:
        self.knobs = knobs

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        name_width = max(name.cell_len for name, _ in self.knobs)
        side_by_side = options.max_width - name_width - 2 >= self.MIN_DESCRIPTION
        grid = Table.grid(padding=(0, 2) if side_by_side else (0, 0))
        if side_by_side:
            grid.add_column(no_wrap=True)
            grid.add_column(ratio=1, overflow="fold")
            for name, description in self.knobs:
                grid.add_row(name, description)
        else:
            grid.add_column(ratio=1, overflow="fold")
            for name, description in self.knobs:
                grid.add_row(name)
                if description:
                    grid.add_row(Padding(description, (0, 0, 0, 2)))
        yield grid


def method_rows() -> list[tuple[str, ...]]:
    from spectune.methods import METHODS

    rows = []
    for name in METHODS.names():
        method = METHODS.get(name)
        knobs = ", ".join(f"`{k}`={f.default!r}" for k, f in method.knobs.model_fields.items()) or "-"
        rule = method.rule if method.lossless else f"**LOSSY**: {method.rule}"
        rows.append((f"`{name}`", method.summary, method.paper, knobs, method.cost, rule, method.hybrid_support()))
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
