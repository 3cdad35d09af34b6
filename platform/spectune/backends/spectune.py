"""spectune's own engine as a backend: every method of `spectune methods`, one request at a time.

Its methods import the engine (torch), so they are reached lazily; its workers (pair workers,
`spectune.workers.trials.pair_worker`) and its completion service (`spectune.workers.serve.completion`)
are named by path and imported only where they run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from spectune.backends.registry import BACKENDS, Backend, MethodTable, Serving
from spectune.config import DEFAULT_BACKEND, DecodeConfig
from spectune.pair_ref import PairRef


def _methods() -> MethodTable:
    from spectune.methods import METHODS

    return METHODS


def _config(method: str, knobs: Mapping[str, Any], temperature: float) -> DecodeConfig:
    from spectune.methods import METHODS

    return METHODS.config(method, knobs, temperature)


def _check_pair(method: str, knobs: Mapping[str, Any], pair: PairRef) -> None:
    """A method drafting with trained heads: they exist for the pair's target and fit it (torch-free)."""
    from spectune.heads.spec import check_pair_heads
    from spectune.methods import METHODS

    kind = METHODS.get(method).needs_heads
    if kind:
        check_pair_heads(kind, knobs.get("heads"), pair.target)


BACKENDS.register(Backend(
    name=DEFAULT_BACKEND,
    summary="spectune's own engine: every method of `spectune methods`, one request at a time, certified lossless",
    methods=_methods,
    make_config=_config,
    workers="spectune.workers.trials.pair_worker:start_pool",
    # a replica decodes `decode_threads` requests at once and queues the rest; one whose pair fails to load fails again
    serving=Serving("spectune.workers.serve.completion:start_service", max_ongoing_requests=32,
                    max_constructor_retry_count=3),
    check_pair=_check_pair,
    worker_counters={"pair_loads": "pair load(s)"},
    dtype_axis=True,
))
