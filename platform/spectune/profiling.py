"""Timing from outside the algorithm: forward hooks that add up the time spent inside a model, and
a forward timer (`profile_forwards`) for Sequoia's hardware-aware tree and the drafter cost check.

Profilers hook into the engine from outside: the engine never imports this module.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from collections.abc import Iterator, Sequence

import torch

from spectune.engine.runner import CausalLM
from spectune.trees.draft import tree_inputs


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
            _synchronize(_device(module))
            self._local.started = time.perf_counter()

    def _exit(self, module: torch.nn.Module, args: object, output: object) -> None:
        depth = getattr(self._local, "depth", 0)
        if depth == 0:  # attached while the forward was already running: its start was never seen
            return
        self._local.depth = depth - 1
        if depth == 1:
            _synchronize(_device(module))
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


def profile_forwards(
    model: torch.nn.Module, filler: Sequence[int], past: int, max_tokens: int, repeats: int
) -> list[float]:
    """Fastest ms of one forward over n tree tokens (a root and n-1 children) after `past` cached tokens."""
    lm = CausalLM(model)
    if past:
        lm.forward(filler[:past], last_only=True)
    for n in (1, max_tokens, 1):  # the first calls pay one-off costs (allocator, kernel selection)
        lm.forward(filler[past : past + n], tree_inputs((-1,) + (0,) * (n - 1), past, lm.dtype).positions)
        lm.cache.truncate(past)
    times = []
    for n in range(1, max_tokens + 1):
        parents = (-1,) + (0,) * (n - 1)  # a star: a real tree mask for n >= 3
        inputs = tree_inputs(parents, past, lm.dtype)
        tokens = list(filler[past : past + n])
        samples = []
        for _ in range(repeats + 1):  # the first call of each size warms up
            _synchronize(lm.device)
            started = time.perf_counter()
            lm.forward(tokens, inputs.positions, inputs.mask)
            _synchronize(lm.device)
            samples.append((time.perf_counter() - started) * 1000)
            lm.cache.truncate(past)
        times.append(min(samples[1:]))  # other processes only ever add time: the fastest is the model's cost
    return times


def _device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def _synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a clock read after it counts that work (CPU work is synchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
