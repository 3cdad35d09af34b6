"""Seeds and the deterministic-algorithms switch a reproducible build runs under.

Each random draw of a build (a model's init, its batches, its training) gets its own
seed derived from the build seed and a role name, so adding or reordering one draw
does not shift the others.
"""

from __future__ import annotations

import contextlib
import hashlib

import torch


def derive_seed(seed: int, role: str) -> int:
    """A 56-bit seed for ``role`` (e.g. ``"target:init"``) from the build seed."""
    return int.from_bytes(hashlib.sha256(f"{int(seed)}:{role}".encode()).digest()[:7], "big")


@contextlib.contextmanager
def seeded_deterministic(seed: int):
    """Seed torch's global RNG and enable deterministic algorithms, restoring both after."""
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(prev, warn_only=prev_warn)
