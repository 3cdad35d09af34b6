"""The method registry: methods plug in by name, the loop never branches on them."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import ValidationError

from spectune.config import DecodeConfig, KnobColumns
from spectune.engine.budget import check_tree_fits
from spectune.engine.drafter import Drafter
from spectune.methods.base import Knobs, Method, Models
from spectune.registry import Registry
from spectune.validation import one_line

COLUMNS = tuple(f.name for f in dataclasses.fields(KnobColumns))
INT_COLUMNS = ("draft_len", "node_budget", "exit_layer")


class MethodRegistry:
    def __init__(self) -> None:
        self._methods = Registry[Method]("method")

    def register(
        self,
        name: str,
        knobs: type[Knobs],
        *,
        needs_drafter: bool,
        summary: str,
        paper: str,
        cost: str,
        rule: str,
        lossless: bool = True,
        columns: Mapping[str, tuple[str, ...]] | None = None,
        needs_heads: str | None = None,
        hybrid: bool | str = "it was not checked against a hybrid target's SSM states",
    ) -> Callable[[Callable[[Knobs, Models], Drafter]], Callable[[Knobs, Models], Drafter]]:
        """Register a method's factory; the texts feed `spectune methods` and docs/methods.md.

        `columns` maps a store knob column (a `spectune.config.KnobColumns` field) to the
        method's knobs that fill it, first non-None wins: {"draft_len": ("gamma",)}.
        `needs_heads` names the kind of heads trained for the target the method drafts with
        (`spectune heads train --kind KIND`; the factory finds and checks them).
        `hybrid`: True when it decodes a hybrid SSM-attention target (chains roll the SSM states back,
        trees go through STree), else why not (one clause); a hybrid target refuses it at build.
        """
        columns = {column: tuple(names) for column, names in (columns or {}).items()}
        for column, names in columns.items():
            if column not in COLUMNS:
                raise ValueError(f"method {name!r}: {column!r} is no knob column (known: {', '.join(COLUMNS)})")
            unknown = [k for k in names if k not in knobs.model_fields]
            if unknown or not names:
                raise ValueError(f"method {name!r}: column {column!r} names no knob of {knobs.__name__}: {unknown or names}")

        def decorate(build: Callable[[Knobs, Models], Drafter]) -> Callable[[Knobs, Models], Drafter]:
            self._methods.register(Method(name, knobs, build, needs_drafter, lossless, summary, paper, cost, rule,
                                          columns, needs_heads, hybrid is True, "" if hybrid is True else hybrid))
            return build

        return decorate

    def get(self, name: str) -> Method:
        return self._methods.get(name)

    def names(self) -> list[str]:
        return self._methods.names()

    def knobs(self, name: str, values: Mapping[str, Any]) -> Knobs:
        """Validate a method's knobs, naming the method and field on error."""
        method = self.get(name)
        try:
            return method.knobs.model_validate(dict(values))
        except ValidationError as err:
            problems = one_line(err, root=name)
            raise ValueError(f"bad knobs for method {name!r}: {problems}") from None

    def config(
        self, method: str, knobs: Mapping[str, Any], temperature: float = 0.0, name: str | None = None
    ) -> DecodeConfig:
        """A validated configuration: the knobs kept exactly as given, the store's knob columns filled."""
        values = dict(knobs)
        validated = self.knobs(method, values)
        return DecodeConfig(method, values, temperature, name, knob_columns(self.get(method), values, validated))

    def build(self, name: str, values: Mapping[str, Any], models: Models | None) -> Drafter:
        """The method's drafter, refused here, before any decoding, when its largest tree cannot fit the context.

        `models` may be None only for a method that drafts without any model (pld, ngram), built on its own:
        then there is no context to check against.
        """
        method = self.get(name)
        knobs = self.knobs(name, values)
        if method.needs_drafter and (models is None or models.drafter is None):
            raise ValueError(f"method {name!r} drafts with a drafter model; pass --drafter")
        if models is not None and models.target.cache.hybrid and not method.hybrid:
            raise ValueError(f"method {name!r} cannot decode a hybrid SSM-attention target: {method.hybrid_refusal}")
        drafter = method.build(knobs, models)
        if models is not None:
            check_tree_fits(f"{name}: {knobs.tree_knobs()}", drafter.max_tree_size, models.context)
        return drafter


def knob_columns(method: Method, given: Mapping[str, Any], validated: Knobs) -> KnobColumns:
    """Each column from the first of its knobs the user gave a non-None value (as validated: ints as int,
    a branching or path list as compact JSON, a paths file as its name), else from the knobs'
    `derived_columns()`; None where neither gives one."""
    filled: dict[str, Any] = {}
    for column, names in method.columns.items():
        knob = next((k for k in names if given.get(k) is not None), None)
        if knob is None:
            continue
        value = getattr(validated, knob)
        if column in INT_COLUMNS:
            filled[column] = int(value)
        else:
            filled[column] = value if isinstance(value, str) else json.dumps(_plain(value), separators=(",", ":"))
    for column, value in validated.derived_columns().items():
        if column not in COLUMNS:
            raise ValueError(f"method {method.name!r}: derived column {column!r} is no knob column")
        filled.setdefault(column, value)
    return KnobColumns(**filled)


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


METHODS = MethodRegistry()
