"""The backend registry: whose engine decodes a configuration, and everything that engine brings.

A backend is a whole plug-in. It declares its methods (each with a pydantic knob model and whether
it drafts with the pair's drafter), how a validated `DecodeConfig` is made (with the store's knob
columns), whether it measures under load (`max_concurrency` None), whether it takes a sweep's dtype
axis, its spec section (a settings model under the backend's own name, e.g. `vllm:`), the workers a
sweep starts, the counters they report, and how Ray Serve serves one of its configurations. Sweep
specs, the launcher, the sweep callback and the endpoint ask this registry and never branch on a
backend's name:

    BACKENDS.get("vllm").method("ngram").knobs       # the pydantic model of its knobs
    BACKENDS.config(DecodeConfig(...))               # validated, store columns filled
    BACKENDS.get(spec.backend).start_workers(...)    # its worker pool

Torch-free, and free of worker modules: what runs in a worker or a replica is named by a
"module:attr" path (`resolve`), imported only where it runs. A new backend is one module that
registers a `Backend` (see `spectune.backends.vllm`), imported by `spectune.backends`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from pydantic import BaseModel

from spectune.config import DecodeConfig
from spectune.pair_ref import PairRef
from spectune.registry import Registry


class BackendMethod(Protocol):
    """What a sweep spec needs to know about one method (spectune's `Method` has these too)."""

    name: str
    knobs: type[BaseModel]
    needs_drafter: bool


class MethodTable(Protocol):
    def get(self, name: str) -> BackendMethod: ...
    def names(self) -> list[str]: ...


def resolve(path: str) -> Any:
    """The object a "package.module:attr" path names, imported now (where it runs, not where it is declared)."""
    module, _, attr = path.partition(":")
    if not module or not attr:
        raise ValueError(f"{path!r} is no plug-in path: write it as package.module:attr")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class Serving:
    """How Ray Serve hosts one configuration of a backend: each replica runs one completion service."""

    # "module:attr" of start(served: ServedConfig, limits: Limits, replica: Replica) -> CompletionService
    service: str
    max_ongoing_requests: int  # requests one replica takes before Serve queues them
    max_constructor_retry_count: int  # a replica that fails to start fails again: a few tries, not Serve's 20

    def deployment_options(self) -> dict[str, int]:
        return {"max_ongoing_requests": self.max_ongoing_requests,
                "max_constructor_retry_count": self.max_constructor_retry_count}


@dataclass(frozen=True)
class Backend:
    """One engine that decodes configurations: spectune's own, or vLLM."""

    name: str
    summary: str
    methods: Callable[[], MethodTable]  # lazily: spectune's method table imports torch
    # (method, knobs as given, temperature) -> validated DecodeConfig with store columns (concurrency set later)
    make_config: Callable[[str, Mapping[str, Any], float], DecodeConfig]
    # "module:attr" of start(pair, size, cpus, gpus[, settings]) -> WorkerPool: one worker per sweep slot
    workers: str
    serving: Serving
    max_concurrency: int | None = 1  # requests in flight while measured; None = any (measured under load)
    # checks that need the pair (a drafter, trained heads): (method, one combination of knobs, pair) -> raise ValueError
    check_pair: Callable[[str, Mapping[str, Any], PairRef], None] | None = None
    # the counters its workers report (stats() keys) that the sweep's closing line sums: key -> what it counts
    worker_counters: Mapping[str, str] = field(default_factory=dict)
    # its section of a sweep spec (and of a served config file), under the backend's name; None: it has none
    settings: type[BaseModel] | None = None
    dtype_axis: bool = False  # whether it decodes a sweep's `dtypes` axis (else the pair's dtype only)

    @property
    def under_load(self) -> bool:
        """Measured with several requests in flight (a serving engine): its sweeps take a load axis."""
        return self.max_concurrency != 1

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

    def settings_of(self, spec: Any) -> BaseModel | None:
        """Its section of a validated sweep spec (the field named after it), or None when it declares none."""
        return None if self.settings is None else getattr(spec, self.name)

    def start_workers(self, pair: PairRef, size: int, cpus: float, gpus: float, settings: BaseModel | None) -> Any:
        """`size` workers for a sweep on `pair` (a `WorkerPool`), each holding `cpus` and `gpus`."""
        start = resolve(self.workers)
        return start(pair, size, cpus, gpus) if self.settings is None else start(pair, size, cpus, gpus, settings)


class BackendRegistry(Registry[Backend]):
    def __init__(self) -> None:
        super().__init__("backend")

    def config(self, config: DecodeConfig) -> DecodeConfig:
        """`config` validated by its backend, with the store's knob columns."""
        made = self.get(config.backend).config(config.method, config.knobs, config.temperature, config.concurrency)
        return replace(made, dtype=config.dtype)  # the dtype axis is the sweep's, not the backend's

    def names_where(self, test: Callable[[Backend], bool]) -> list[str]:
        """The backends that pass `test` (for messages: "a load axis needs backend: vllm")."""
        return [name for name in self.names() if test(self.get(name))]


BACKENDS = BackendRegistry()
