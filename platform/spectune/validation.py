"""A pydantic `ValidationError` as one line: `field.path: problem; other.field: problem`.

Every boundary (YAML specs, JSON files, CLI options, method knobs, endpoint answers) says what is
wrong the same way: the field's dotted location, then pydantic's message with its "Value error, "
wrapper removed (a validator's own ValueError already says what is wrong), "unknown field" for a
field the model forbids, and each distinct problem once. Torch-free: pydantic only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pydantic import ValidationError

Location = tuple[int | str, ...]
VALUE_ERROR = "Value error, "  # pydantic's prefix on a validator's ValueError


def dotted(location: Location) -> str:
    """`space.sps.draft_len`, `configs.0.method`."""
    return ".".join(map(str, location))


def cli_option(location: Location) -> str:
    """The command-line option a settings field comes from: `max_new_tokens` reads `--max-new-tokens`."""
    return "--" + str(location[0]).replace("_", "-")


def one_line(
    err: ValidationError | Sequence[Mapping[str, Any]],
    *,
    root: str | None = None,
    locations: bool = True,
    limit: int | None = None,
    label: Callable[[Location], str] = dotted,
    verbatim: bool = False,
) -> str:
    """Every problem of `err` (or of a list of its error dicts), joined by "; ".

    root: what a problem of the whole input (no field) is named, e.g. "file"; None: its message alone.
    locations: False gives the messages alone (the caller's own words already name what was validated).
    limit: only the first `limit` problems.
    label: how a location reads (`dotted`; `cli_option` for settings given as options).
    verbatim: pydantic's messages as it writes them (no prefix removed, no "unknown field").
    """
    errors = err.errors() if isinstance(err, ValidationError) else err
    problems = [_problem(error, root, locations, label, verbatim) for error in list(errors)[:limit]]
    return "; ".join(dict.fromkeys(problems))


def _problem(
    error: Mapping[str, Any], root: str | None, locations: bool, label: Callable[[Location], str], verbatim: bool
) -> str:
    message = error["msg"] if verbatim else _message(error)
    if not locations:
        return message
    where = label(tuple(error["loc"])) if error["loc"] else root
    if where is None or _names(message, where):
        return message
    return f"{where}: {message}"


def _names(message: str, where: str) -> bool:
    """Whether a message starts with its field's location already (`space: ...`, `space.sps.k: ...`)."""
    return bool(where) and (message.startswith(where + ":") or message.startswith(where + "."))


def _message(error: Mapping[str, Any]) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown field"
    return error["msg"].removeprefix(VALUE_ERROR)
