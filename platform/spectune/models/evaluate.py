"""Held-out evaluation: the mean next-token loss per exit layer on fixed windows."""

from __future__ import annotations

import torch

from .losses import layer_losses, sample_windows, windows_per_chunk
from .seeding import seeded_deterministic

#: The held-out windows are drawn with this fixed seed, independent of the build seed,
#: so that pairs built with different seeds are scored on the same text.
EVAL_SEED = 1234


@torch.no_grad()
def evaluate(model, stream: torch.Tensor, n_windows: int, seq_len: int, all_layers: bool) -> list[float]:
    """Mean held-out CE per exit layer (or just the final layer) over fixed windows, fp32."""
    batch = windows_per_chunk(seq_len, model.config.vocab_size)
    gen = torch.Generator().manual_seed(EVAL_SEED)
    windows = sample_windows(stream, n_windows, seq_len, gen)
    model.eval()
    sums: list[float] | None = None
    for i in range(0, n_windows, batch):
        chunk = windows[i : i + batch]
        losses = layer_losses(model, chunk, all_layers=all_layers)
        vals = [float(l) * chunk.shape[0] for l in losses]
        sums = vals if sums is None else [a + b for a, b in zip(sums, vals)]
    assert sums is not None
    return [s / n_windows for s in sums]


def evaluate_seeded(model, stream: torch.Tensor, n_windows: int, seq_len: int, all_layers: bool) -> list[float]:
    """:func:`evaluate` under a fixed global seed and deterministic algorithms, so the
    card's losses do not depend on what ran before."""
    with seeded_deterministic(EVAL_SEED):
        return evaluate(model, stream, n_windows, seq_len, all_layers=all_layers)
