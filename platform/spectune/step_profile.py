"""Where a decoding step's time goes, read from outside the algorithm, beside the machine's floor.

`spectune bench --profile` runs each contender's generations under cProfile and reads, per step, the
time inside each of the loop's five phases (the functions the loop calls for them), the part of the
verification spent in the model's matrix products, and what is left (Python, the loop's own work). The
engine is not touched: the phases are found by their functions' code objects in the profiler's table.

cProfile's per-call overhead inflates Python-heavy parts, so each contender's plain wall time per token
is measured too, in an unprofiled pass, and the phases are given as shares of the profiled step.

The floor is the time of one matrix-vector product over as many weights as the model has, in its dtype,
on the same threads: what decoding one token must cost at least when every weight is read once. The read
floor is one plain streaming read of as many bytes: lower where the product's kernel reads slower than memory.
"""

from __future__ import annotations

import cProfile
import inspect
import pstats
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from spectune.bench import Contender, sampling
from spectune.config import Settings
from spectune.engine.accept import accept
from spectune.engine.loop import Decoder
from spectune.engine.runner import CausalLM
from spectune.trees.draft import tree_inputs

MATMUL = ("~", 0, "<built-in method torch._C._nn.linear>")  # cProfile's key of every nn.Linear's product
FLOOR_REPEATS = 20


@dataclass(frozen=True)
class StepProfile:
    """One contender's decoding, per step: ms in each phase (profiled), and its unprofiled wall ms per token."""

    label: str
    tokens: int  # new tokens decoded in the profiled pass
    steps: int  # target forwards; for a peer, whose loop records none: its tokens
    wall_ms_per_token: float  # unprofiled
    profiled_ms_per_step: float  # everything inside generate(), profiled
    phases_ms: dict[str, float]  # phase -> ms per step (profiled); empty for a peer whose loop is not ours
    matmul_ms: float  # ms per step inside the model's matrix products (profiled)

    @property
    def tokens_per_step(self) -> float:
        return self.tokens / self.steps if self.steps else 0.0

    @property
    def other_ms(self) -> float:
        """Profiled step time outside the named phases (the loop, the cut, the generator's own Python)."""
        return max(self.profiled_ms_per_step - sum(self.phases_ms.values()), 0.0)

    def as_dict(self) -> dict:
        return {"label": self.label, "tokens": self.tokens, "steps": self.steps,
                "tokens_per_step": round(self.tokens_per_step, 3), "wall_ms_per_token": round(self.wall_ms_per_token, 2),
                "profiled_ms_per_step": round(self.profiled_ms_per_step, 2),
                "phases_ms": {k: round(v, 2) for k, v in self.phases_ms.items()}, "matmul_ms": round(self.matmul_ms, 2),
                "other_ms": round(self.other_ms, 2) if self.phases_ms else None}


def _phase_functions(who: Contender) -> dict[str, Callable]:
    """The function each phase of our loop calls, and the prompt's prefill spread over the steps ({} for a runner
    that is not our Decoder: a peer)."""
    if not isinstance(who.runner, Decoder):
        return {}
    drafter = type(who.runner.drafter)
    return {"prefill": Decoder._start, "draft": drafter.draft, "tree inputs": tree_inputs, "verify": CausalLM.verify,
            "accept": accept, "commit": Decoder._commit, "observe": drafter.observe}


def _key(function: Callable) -> tuple[str, int, str]:
    """cProfile's key of the function itself, not of a decorator's wrapper: `torch.inference_mode()` wraps
    `draft` and the runner's forward in one shared wrapper, whose entry adds up both."""
    code = inspect.unwrap(function).__code__
    return code.co_filename, code.co_firstlineno, code.co_name


def profile_contender(who: Contender, encoded: Sequence[list[int]], settings: Settings) -> StepProfile:
    """Decode every prompt once unprofiled (wall time), then once under cProfile (the phases)."""
    chosen = sampling(who.config, settings)
    started = time.perf_counter()
    tokens = sum(len(who.runner.generate(p, settings.max_new_tokens, chosen, settings.seed).tokens) for p in encoded)
    wall = time.perf_counter() - started
    profiler = cProfile.Profile()
    steps = 0
    profiler.enable()
    for prompt in encoded:
        generation = who.runner.generate(prompt, settings.max_new_tokens, chosen, settings.seed)
        steps += generation.target_calls or len(generation.tokens)  # a peer records no steps: one per token
    profiler.disable()
    table = pstats.Stats(profiler).stats  # key -> (primitive calls, calls, own s, cumulative s, callers)
    total = sum(own for _, _, own, _, _ in table.values())
    phases = {name: table.get(_key(f), (0, 0, 0.0, 0.0))[3] for name, f in _phase_functions(who).items()}
    per_step = 1000 / max(steps, 1)
    return StepProfile(who.config.label(), tokens, steps, wall * 1000 / max(tokens, 1), total * per_step,
                       {name: s * per_step for name, s in phases.items()}, table.get(MATMUL, (0, 0, 0.0))[2] * per_step)


def matvec_floor_ms(model: torch.nn.Module, repeats: int = FLOOR_REPEATS) -> float:
    """Median ms of one [1, d] x [d, P/d] product in the model's dtype, P its parameter count (tied weights once)."""
    weights, width = _weights_like(model)  # [P/d, d]
    vector = torch.randn(1, width, dtype=weights.dtype)  # [1, d]
    return _median_ms(lambda: torch.nn.functional.linear(vector, weights), repeats)  # [1, P/d]


def read_floor_ms(model: torch.nn.Module, repeats: int = FLOOR_REPEATS) -> float:
    """Median ms of one streaming read of as many bytes as the model's weights (the max of their bits as integers):
    the memory's own floor, below the matrix-vector product's when the product's kernel reads slower than memory."""
    weights, _ = _weights_like(model)
    bits = weights.view(_INTEGER_OF_SIZE[weights.element_size()])  # [P/d, d], the same bytes as integers
    return _median_ms(lambda: bits.max(), repeats)


_INTEGER_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _weights_like(model: torch.nn.Module) -> tuple[torch.Tensor, int]:
    width = int(model.config.hidden_size)
    parameters = sum(p.numel() for p in model.parameters())
    dtype = next(model.parameters()).dtype
    return torch.randn(parameters // width, width, dtype=dtype), width  # [P/d, d], as many bytes as the model's


def _median_ms(work: Callable[[], object], repeats: int) -> float:
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 3):
            started = time.perf_counter()
            work()
            times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times[3:])  # the first calls warm the allocator and the kernel choice
