"""The method registry: methods plug in by name, the loop never branches on them."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from pydantic import ValidationError

from spectune.methods.base import Drafter, Knobs, Method, Models


class MethodRegistry:
    def __init__(self) -> None:
        self._methods: dict[str, Method] = {}

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
    ) -> Callable[[Callable[[Knobs, Models], Drafter]], Callable[[Knobs, Models], Drafter]]:
        """Register a method's factory; the texts feed `spectune methods` and docs/methods.md."""

        def decorate(build: Callable[[Knobs, Models], Drafter]) -> Callable[[Knobs, Models], Drafter]:
            if name in self._methods:
                raise ValueError(f"method {name!r} is registered twice")
            self._methods[name] = Method(name, knobs, build, needs_drafter, lossless, summary, paper, cost, rule)
            return build

        return decorate

    def get(self, name: str) -> Method:
        try:
            return self._methods[name]
        except KeyError:
            raise ValueError(f"unknown method {name!r}; known methods: {', '.join(sorted(self._methods))}") from None

    def names(self) -> list[str]:
        return sorted(self._methods)

    def knobs(self, name: str, values: Mapping[str, Any]) -> Knobs:
        """Validate a method's knobs, naming the method and field on error."""
        method = self.get(name)
        try:
            return method.knobs.model_validate(dict(values))
        except ValidationError as err:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or name}: {e['msg']}" for e in err.errors())
            raise ValueError(f"bad knobs for method {name!r}: {problems}") from None

    def build(self, name: str, values: Mapping[str, Any], models: Models) -> Drafter:
        method = self.get(name)
        knobs = self.knobs(name, values)
        if method.needs_drafter and models.drafter is None:
            raise ValueError(f"method {name!r} drafts with a drafter model; pass --drafter")
        return method.build(knobs, models)


METHODS = MethodRegistry()
