"""Extra positions that enter the target after a middle decoder block (Hidden Transfer's pseudo states).

A forward whose last m positions are extras with a `LayerTransfer` runs blocks 1..l over them as inputs,
then replaces their block-l outputs by the transfer of their anchors' block-l outputs; blocks l+1..L (and
the final norm and LM head) run on those pseudo states, attending like any extra (the tree mask). The real
positions' outputs are never touched, so the tree's logits and the cache's real slots are what they are
without the extras.

How: a forward hook on block l, installed once per block (`enable`), which does nothing unless the forward
runs inside `transferring(...)`; the replacement it should make sits in a ContextVar (as transformers' own
output capture and `ssm_tree`'s tree do), so concurrent forwards of the same model in other threads neither
see nor disturb it. No weights move.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import nn

from spectune.trees.draft import LayerTransfer


@dataclass(frozen=True)
class ActiveTransfer:
    """The replacement the current forward makes after one block."""

    block: nn.Module  # decoder block l
    rows: torch.Tensor  # [m] the sequence rows of each extra's anchor (the extras are the last m rows)
    transfer: Callable[[torch.Tensor], torch.Tensor]  # [B, m, d] -> [B, m, d]


_ACTIVE: ContextVar[ActiveTransfer | None] = ContextVar("spectune_layer_transfer", default=None)


def decoder_block(model: nn.Module, layer: int) -> nn.Module:
    """Decoder block `layer` (1-based) of a causal LM; a ValueError when the model has no such middle block."""
    blocks = model.get_decoder().layers
    if not 1 <= layer < len(blocks):
        raise ValueError(f"a layer transfer needs a block with blocks after it: {layer} is outside 1..{len(blocks) - 1}")
    return blocks[layer - 1]


def enable(block: nn.Module) -> None:
    """Install the (idle) replacement hook on `block`, once."""
    if not any(hook is _replace_extras for hook in block._forward_hooks.values()):
        block.register_forward_hook(_replace_extras)


@contextlib.contextmanager
def transferring(model: nn.Module, transfer: LayerTransfer, offset: int) -> Iterator[None]:
    """Within: a forward of `model` replaces its last m positions' block-l outputs by `transfer.transfer` of
    the outputs at rows `offset + anchor` (offset: the sequence row of tree node 0)."""
    block = decoder_block(model, transfer.layer)
    enable(block)
    rows = torch.tensor(transfer.anchors, dtype=torch.long) + offset  # [m]
    token = _ACTIVE.set(ActiveTransfer(block, rows, transfer.transfer))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def _replace_extras(block: nn.Module, args, output):
    active = _ACTIVE.get()
    if active is None or active.block is not block:
        return None
    hidden = output[0] if isinstance(output, tuple) else output  # [B, N, d] block l's output
    m = active.rows.shape[0]
    pseudo = active.transfer(hidden[:, active.rows.to(hidden.device)]).to(hidden.dtype)  # [B, m, d]
    replaced = torch.cat([hidden[:, : hidden.shape[1] - m], pseudo], dim=1)  # [B, N, d]
    return (replaced, *output[1:]) if isinstance(output, tuple) else replaced
