"""What a batch is and how it is scored: token windows and the loss per exit layer.

Training and evaluation share these, so the held-out losses in the card measure
exactly the quantity the models were trained on.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

#: Batches are split into chunks whose fp32 logits stay under this size, and gradients
#: are accumulated over the chunks. Larger tensors exceed glibc's mmap threshold (32 MiB
#: at most), so every step would map and unmap them afresh: measured on the tiny target
#: (8 x 256 tokens, vocab 4096) that is 168k page faults per step against 4k when split.
LOGITS_CHUNK_BYTES = 16 * 2**20


def windows_per_chunk(seq_len: int, vocab_size: int) -> int:
    """How many windows fit in one chunk of at most ``LOGITS_CHUNK_BYTES`` of fp32 logits."""
    return max(1, LOGITS_CHUNK_BYTES // (seq_len * vocab_size * 4))


def sample_windows(stream: torch.Tensor, batch: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """``batch`` random windows of ``seq_len + 1`` consecutive tokens, ``[batch, seq_len+1]``."""
    n_starts = stream.numel() - seq_len
    if n_starts < 1:
        raise ValueError(f"token stream of {stream.numel()} tokens is too short for windows of {seq_len + 1}")
    starts = torch.randint(0, n_starts, (batch,), generator=generator)
    return stream[starts[:, None] + torch.arange(seq_len + 1)]


def exit_loss_weights(n_layers: int) -> list[float]:
    """Weights of the per-layer losses in the target's training loss.

    ``w_l ∝ l`` for the intermediate exits ``l = 1..L-1`` (deeper exits matter more:
    they are the ones self-speculation uses), and the final layer gets as much as all
    intermediate exits together (``w_L ∝ sum_{l<L} l``), i.e. half the total, because the
    final layer's quality is the target's quality. Normalised to sum to 1. For L=6:
    1,2,3,4,5,15 / 30; for L=4: 1,2,3,6 / 12; for L=1: [1.0].
    """
    if n_layers < 1:
        raise ValueError("n_layers must be >= 1")
    if n_layers == 1:
        return [1.0]
    raw = [float(l) for l in range(1, n_layers)]
    raw.append(sum(raw))
    total = sum(raw)
    return [r / total for r in raw]


def exit_logits(model, hidden_states: Sequence[torch.Tensor], layer: int) -> torch.Tensor:
    """Logits when exiting after decoder layer ``layer`` (1-based) of a Llama-style model.

    ``hidden_states`` is ``outputs.hidden_states`` from a forward with
    ``output_hidden_states=True``: index 0 is the embeddings, index ``l`` the output of
    layer ``l``. In transformers the *last* entry is already passed through the final
    norm (it is ``last_hidden_state``); the intermediate ones are not, so those get
    ``model.model.norm`` here. Both then go through the shared ``lm_head``.
    """
    n_layers = len(hidden_states) - 1
    if not 1 <= layer <= n_layers:
        raise ValueError(f"exit layer must be in 1..{n_layers}, got {layer}")
    h = hidden_states[layer]
    if layer < n_layers:
        h = model.model.norm(h)
    return model.lm_head(h)


def layer_losses(model, windows: torch.Tensor, all_layers: bool = True) -> list[torch.Tensor]:
    """Mean next-token cross-entropy per exit layer on ``windows`` ``[B, T+1]``.

    Inputs are ``windows[:, :-1]``, targets ``windows[:, 1:]``. With ``all_layers`` the
    list has one loss per decoder layer (index i = exit after layer i+1); otherwise only
    the final layer's loss. The final entry equals the model's own ``outputs.loss`` for
    ``model(input_ids=windows, labels=windows)``.
    """
    inputs, targets = windows[:, :-1], windows[:, 1:].reshape(-1)
    vocab = model.config.vocab_size
    if not all_layers:
        out = model.model(input_ids=inputs, use_cache=False)
        logits = model.lm_head(out.last_hidden_state)
        return [F.cross_entropy(logits.reshape(-1, vocab).float(), targets)]
    out = model.model(input_ids=inputs, use_cache=False, output_hidden_states=True)
    hs = out.hidden_states
    n_layers = model.config.num_hidden_layers
    if len(hs) != n_layers + 1:
        raise RuntimeError(f"expected {n_layers + 1} hidden states, got {len(hs)}")
    losses = []
    for layer in range(1, n_layers + 1):
        logits = exit_logits(model, hs, layer)
        losses.append(F.cross_entropy(logits.reshape(-1, vocab).float(), targets))
    return losses
