"""Confidence intervals of a speedup (torch-free: the vLLM worker uses them too)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

BOOTSTRAP_SAMPLES = 2000
CI_LEVEL = 0.95


def repeat_interval(ratios: Sequence[float], samples: int = BOOTSTRAP_SAMPLES, level: float = CI_LEVEL,
                    seed: int = 0) -> tuple[float | None, float | None]:
    """A bootstrap interval of the median speedup over repeats (None, None below two repeats), for
    measurements whose prompts run concurrently (a vLLM pass), so per-prompt seconds do not add up.
    With few repeats it is about their range: wide, which is what such a measurement knows."""
    if len(ratios) < 2:
        return None, None
    values = np.asarray(ratios, dtype=float)  # [R]
    picks = np.random.default_rng(seed).integers(0, len(values), size=(samples, len(values)))  # [B, R]
    return percentile_interval(np.median(values[picks], axis=1), level)  # medians: [B]


def percentile_interval(resampled: np.ndarray, level: float = CI_LEVEL) -> tuple[float, float]:
    """The central `level` interval of bootstrap resamples of a speedup ([B])."""
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(resampled, [tail, 100 - tail])
    return float(low), float(high)
