"""The backend registry: whose engine decodes a configuration, with which methods and knobs.

A backend declares its methods (each with a pydantic knob model and whether it drafts with the
pair's drafter), whether it measures under load (`concurrency` above 1), and how a validated
`DecodeConfig` is made (with the store's knob columns). Sweep specs, the sweep callback and the
endpoint ask this registry, never a backend's module directly:

    BACKENDS.get("vllm").method("ngram").knobs       # the pydantic model of its knobs
    BACKENDS.config(DecodeConfig(...))               # validated, store columns filled

Torch-free: spectune's own methods (which import the engine) are reached lazily.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from pydantic import BaseModel

from spectune.config import DEFAULT_BACKEND, DecodeConfig
from spectune.pair_ref import PairRef


class BackendMethod(Protocol):
    """What a sweep spec needs to know about one method (spectune's `Method` has these too)."""

    name: str
    knobs: type[BaseModel]
    needs_drafter: bool


class MethodTable(Protocol):
    def get(self, name: str) -> BackendMethod: ...
    def names(self) -> list[str]: ...


@dataclass(frozen=True)
class Backend:
    """One engine that decodes configurations: spectune's own, or vLLM."""

    name: str
    summary: str
    methods: Callable[[], MethodTable]  # lazily: spectune's method table imports torch
    # (method, knobs as given, temperature) -> validated DecodeConfig with store columns (concurrency set later)
    make_config: Callable[[str, Mapping[str, Any], float], DecodeConfig]
    max_concurrency: int | None = 1  # requests in flight while measured; None = any (a serving engine)
    # checks that need the pair (a drafter, trained heads): (method, one combination of knobs, pair) -> raise ValueError
    check_pair: Callable[[str, Mapping[str, Any], PairRef], None] | None = None
    # the counters its workers report (stats() keys) that the sweep's closing line sums: key -> what it counts
    worker_counters: Mapping[str, str] = field(default_factory=dict)

    def method(self, name: str) -> BackendMethod:
        return self.methods().get(name)

    def config(self, method: str, knobs: Mapping[str, Any], temperature: float = 0.0,
               concurrency: int = 1) -> DecodeConfig:
        """A validated configuration of this backend at `concurrency` requests in flight."""
        if self.max_concurrency is not None and concurrency > self.max_concurrency:
            raise ValueError(f"backend {self.name} decodes one request at a time (concurrency 1), got {concurrency}")
        made = self.make_config(method, knobs, temperature)
        return DecodeConfig(made.method, made.knobs, made.temperature, made.name, made.columns, self.name,
                            int(concurrency))


class BackendRegistry:
    def __init__(self) -> None:
        self._backends: dict[str, Backend] = {}

    def register(self, backend: Backend) -> Backend:
        if backend.name in self._backends:
            raise ValueError(f"backend {backend.name!r} is registered twice")
        self._backends[backend.name] = backend
        return backend

    def get(self, name: str) -> Backend:
        try:
            return self._backends[name]
        except KeyError:
            raise ValueError(f"unknown backend {name!r}; known backends: {', '.join(sorted(self._backends))}") from None

    def names(self) -> list[str]:
        return sorted(self._backends)

    def config(self, config: DecodeConfig) -> DecodeConfig:
        """`config` validated by its backend, with the store's knob columns."""
        made = self.get(config.backend).config(config.method, config.knobs, config.temperature, config.concurrency)
        return replace(made, dtype=config.dtype)  # the dtype axis is the sweep's, not the backend's


BACKENDS = BackendRegistry()


def _spectune_methods() -> MethodTable:
    from spectune.methods import METHODS

    return METHODS


def _spectune_config(method: str, knobs: Mapping[str, Any], temperature: float) -> DecodeConfig:
    from spectune.methods import METHODS

    return METHODS.config(method, knobs, temperature)


def _spectune_check_pair(method: str, knobs: Mapping[str, Any], pair: PairRef) -> None:
    """A method drafting with trained heads: they exist for the pair's target and fit it (torch-free)."""
    from spectune.heads.spec import check_pair_heads
    from spectune.methods import METHODS

    kind = METHODS.get(method).needs_heads
    if kind:
        check_pair_heads(kind, knobs.get("heads"), pair.target)


BACKENDS.register(Backend(
    name=DEFAULT_BACKEND,
    summary="spectune's own engine: every method of `spectune methods`, one request at a time, certified lossless",
    methods=_spectune_methods,
    make_config=_spectune_config,
    check_pair=_spectune_check_pair,
    worker_counters={"pair_loads": "pair load(s)"},
))
