"""Timing from outside the algorithm: forward hooks that add up the time spent inside a model."""

from __future__ import annotations

import time
from contextlib import contextmanager
from collections.abc import Iterator

import torch


class ForwardClock:
    """Seconds spent inside a module's forward calls while attached."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        self._started: float | None = None

    def _enter(self, module: torch.nn.Module, args: object) -> None:
        _synchronize(module)
        self._started = time.perf_counter()

    def _exit(self, module: torch.nn.Module, args: object, output: object) -> None:
        _synchronize(module)
        if self._started is not None:
            self.seconds += time.perf_counter() - self._started
            self.calls += 1
            self._started = None

    @contextmanager
    def attached(self, module: torch.nn.Module | None) -> Iterator["ForwardClock"]:
        if module is None:
            yield self
            return
        handles = [module.register_forward_pre_hook(self._enter), module.register_forward_hook(self._exit)]
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
