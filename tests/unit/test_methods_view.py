"""`spectune methods` in a terminal: one block per method, readable at 80 columns and narrower."""

from __future__ import annotations

import dataclasses
import io
import re

import pytest
from rich.cells import cell_len
from rich.console import Console

from spectune.cli.methods_cmd import method_block, print_methods
from spectune.methods import METHODS


def _console(width: int) -> Console:
    return Console(width=width, record=True, file=io.StringIO(), color_system=None)


def _lines(console: Console) -> list[str]:
    return console.export_text().splitlines()


@pytest.mark.parametrize("width", [80, 40])
def test_terminal_view_fits_the_width_and_names_every_method(width: int) -> None:
    console = _console(width)
    print_methods(console)
    lines = _lines(console)
    too_wide = [line for line in lines if cell_len(line) > width]
    assert not too_wide, too_wide
    headings = [line.strip() for line in lines if line and not line.startswith(" ")]
    for name in METHODS.names():
        assert name in headings, name  # the heading line holds the whole name


@pytest.mark.parametrize("width", [80, 40])
@pytest.mark.parametrize("name", METHODS.names())
def test_every_knob_name_is_whole_on_one_line(name: str, width: int) -> None:
    method = METHODS.get(name)
    console = _console(width)
    console.print(method_block(method))
    lines = _lines(console)
    assert all(cell_len(line) <= width for line in lines), lines
    assert lines[0].strip() == name
    for knob, field in method.knobs.model_fields.items():
        # "name = default" together on one line: the name is not split or folded
        pattern = re.compile(rf"(^|\s){re.escape(knob)} = {re.escape(repr(field.default))}(\s|$)")
        assert any(pattern.search(line) for line in lines), (knob, lines)
    for label in ("summary", "paper", "knobs", "cost", "rule"):
        assert any(line.startswith(label + " ") or line == label for line in lines), label


def test_a_lossy_method_is_marked_in_its_heading() -> None:
    lossless = METHODS.get("sps")
    for method, marked in ((lossless, False), (dataclasses.replace(lossless, lossless=False), True)):
        console = _console(80)
        console.print(method_block(method))
        assert ("LOSSY" in _lines(console)[0]) is marked


def test_the_command_prints_blocks_at_80_columns() -> None:
    from typer.testing import CliRunner

    from spectune.cli import app

    result = CliRunner().invoke(app, ["methods"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "decoding methods"
    assert all(cell_len(line) <= 80 for line in lines)
    assert "sps" in [line.strip() for line in lines]
