"""Timing from outside the algorithm: forward hooks that add up the time spent inside a model."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from collections.abc import Iterator

import torch


class ForwardClock:
    """Seconds spent inside the forward calls of one or more modules while attached.

    Only the outermost call counts: when an attached module's forward runs inside another
    attached module's forward (or its own, re-entrantly), the inner call adds neither time nor
    a call. Nesting is tracked per thread, so a call on one thread never ends another's.
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        self._local = threading.local()  # depth and start time of the calling thread's outermost call

    def _enter(self, module: torch.nn.Module, args: object) -> None:
        depth = getattr(self._local, "depth", 0)
        self._local.depth = depth + 1
        if depth == 0:
            _synchronize(module)
            self._local.started = time.perf_counter()

    def _exit(self, module: torch.nn.Module, args: object, output: object) -> None:
        depth = getattr(self._local, "depth", 0)
        if depth == 0:  # attached while the forward was already running: its start was never seen
            return
        self._local.depth = depth - 1
        if depth == 1:
            _synchronize(module)
            self.seconds += time.perf_counter() - self._local.started
            self.calls += 1

    @contextmanager
    def attached(self, *modules: torch.nn.Module | None) -> Iterator["ForwardClock"]:
        """Time the forwards of `modules` (None entries and repeats are skipped) inside the block."""
        handles = []
        seen: set[int] = set()
        for module in modules:
            if module is None or id(module) in seen:
                continue
            seen.add(id(module))
            handles.append(module.register_forward_pre_hook(self._enter))
            handles.append(module.register_forward_hook(self._exit, always_call=True))  # also when forward raises
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()


def _synchronize(module: torch.nn.Module) -> None:
    device = next(module.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
