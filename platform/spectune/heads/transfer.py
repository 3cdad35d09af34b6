"""Hidden Transfer's transfer layer and its training, shared by the trainer and the drafter
(`spectune.methods.hidden_transfer`) so both run the target over the same layout.

Training, teacher-forced through the frozen target: each window runs once with m pseudo positions after
each of A anchors (PPD's layout, `train.ppd_inputs`: pseudo k of anchor t at position t+k, seeing tokens
0..t and its anchor's pseudo 1..k); after block l the pseudo positions' states are replaced by the transfer
maps of the anchor's block-l output (`engine.layer_transfer`, the very hook drafting uses), and blocks
l+1..L, the final norm and the LM head read them out. Pseudo k at anchor t learns the target's own
distribution at t+k (the token t+k+1 given the true text); the gradient flows through blocks l+1..L into
the maps only.
"""

from __future__ import annotations

import torch

from spectune.engine.layer_transfer import transferring
from spectune.heads.modules import TransferMaps
from spectune.heads.spec import HeadsError
from spectune.heads.train import Predictions, positions_ahead_predictions
from spectune.trees.draft import LayerTransfer


def transfer_layer(requested: int, n_layers: int) -> int:
    """The block l after which the pseudo states enter: `requested`, or L//2 when 0; checked (`check_layer`)."""
    layer = requested or n_layers // 2
    check_layer(layer, n_layers)
    return layer


def check_layer(layer: int, n_layers: int, folder: object = None) -> None:
    """l must leave blocks after it to read the pseudo states: 1..L-1; a HeadsError in one line otherwise."""
    if not 1 <= layer <= n_layers - 1:
        where = f" (heads at {folder})" if folder is not None else ""
        raise HeadsError(f"transfer layer {layer}{where} is outside the target's 1..{n_layers - 1}: the pseudo states "
                         f"need blocks after it (the target has {n_layers})")


def grouped_transfer(maps: TransferMaps, layer: int, anchors: tuple[int, ...], per_anchor: int) -> LayerTransfer:
    """The engine's layer transfer for extras laid out anchor-major, `per_anchor` chained after each anchor
    (extra j of an anchor reads map j+1)."""

    def transfer(states: torch.Tensor) -> torch.Tensor:  # [B, G·k, d] each extra's anchor state -> [B, G·k, d]
        return maps(states.unflatten(1, (-1, per_anchor))).flatten(1, 2)

    return LayerTransfer(layer, anchors, transfer)


def transfer_predictions(maps: TransferMaps, model, data: dict[str, torch.Tensor], windows: torch.Tensor,
                         layer: int) -> Predictions:
    """The frozen target over each window with m pseudo positions after every anchor, their block-l states
    transferred from the anchor's; pseudo k's logits at anchor t against the target's distribution at t+k."""
    m = maps.n_heads

    def blank(embeds: torch.Tensor, anchors: int) -> torch.Tensor:  # [B, A·m, d], replaced after block l
        return embeds.new_zeros(embeds.shape[0], anchors * m, embeds.shape[-1])

    def transferred(anchors: torch.Tensor):  # each pseudo state from its anchor's block-l output
        return transferring(model, grouped_transfer(maps, layer, tuple(anchors.repeat_interleave(m).tolist()), m), 0)

    return positions_ahead_predictions(model, data, windows, m, blank, transferred)
