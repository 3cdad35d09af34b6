"""One registry of named plug-ins: spectune's methods, vLLM's methods and the backends are each one.

    BACKENDS = Registry[Backend]("backend")
    BACKENDS.register(backend)          # keyed by backend.name; a name registered twice is an error
    BACKENDS.get("vllm")                # ValueError: unknown backend 'x'; known backends: spectune, vllm
    BACKENDS.names()                    # sorted

Errors are one line naming the noun, the name asked for and every known one.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Generic, Protocol, TypeVar


class Named(Protocol):
    @property
    def name(self) -> str: ...


T = TypeVar("T", bound=Named)


class Registry(Generic[T]):
    """Plug-ins of one kind (`noun`, e.g. "method"), each under its own name."""

    def __init__(self, noun: str, items: Iterable[T] = ()) -> None:
        self.noun = noun
        self._items: dict[str, T] = {}
        for item in items:
            self.register(item)

    def register(self, item: T) -> T:
        if item.name in self._items:
            raise ValueError(f"{self.noun} {item.name!r} is registered twice")
        self._items[item.name] = item
        return item

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise ValueError(f"unknown {self.noun} {name!r}; known {self.noun}s: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items
