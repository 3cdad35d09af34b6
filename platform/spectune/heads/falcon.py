"""Falcon's attention rule and its training (Coupled Sequential Glancing Distillation), shared by the trainer
and the drafter (`spectune.methods.heads_falcon`) so both run the draft layers over the same masks.

Entries: entry j pairs the target's feature at token j with token j+1, at position j (EAGLE's input). An
entry's output is the predicted feature `block` (k) positions ahead. Two kinds of rows:

- committed entries, causal (each sees the entries up to itself): the drafter's KV cache over the
  verified sequence, grown a few entries per step, never recomputed;
- a *block* of k entries at positions s..s+k-1: each sees the committed entries before s and the whole
  block, so its k outputs (features s+k..s+2k-1, tokens s+k+1..s+2k) come from one pass, in parallel
  (semi-autoregressive: a block's later tokens never condition on its earlier drafted ones).

Drafting, with n verified positions: pass 1 reads the last k entries (n-k..n-1, the root's token last) as
a block and drafts depths 1..k; pass p >= 2 reads the previous pass's k outputs paired with the k tokens
drafted from them (positions n+(p-2)k ..) and sees every committed entry, the blocks of the earlier
passes >= 2 on its path, and itself; it drafts depths (p-1)k+1..pk.

Training (`falcon_predictions`) unrolls the same passes over windows of the cached feature pass: pass 1
teacher-forced on true entries, pass p >= 2 on pass p-1's own predicted features with the true tokens
(what the accepted path holds). Glancing (GLAT's adaptive rule, as Falcon's CSGD uses it): a share of
the slots of pass p >= 2 gets the true feature instead of the predicted one, the share GLANCE_RATIO times
how often pass p-1 missed the target's argmax, so the block learns its in-block dependencies from
ground truth where its own guesses are worst. Every pass and slot is distilled toward the target's
distribution (and feature), weighted by depth like the other kinds.
"""

from __future__ import annotations

import torch

from spectune.engine.kvcache import KVCache
from spectune.heads.modules import FalconDraft
from spectune.heads.train import Frozen, Predictions
from spectune.trees.draft import additive_mask

TRAIN_PASSES = 3  # passes unrolled in training (pass 1 teacher-forced, each next on its predecessor's outputs):
# as many as the method drafts by default, so pass 3 has seen pass 2's blocks in training
GLANCE_RATIO = 0.5  # share of pass p's slots given the truth, per unit of pass p-1's miss rate


# --- the masks (bool: True = may attend) ---------------------------------------------------------


def own_blocks(n_blocks: int, block: int) -> torch.Tensor:
    """[n_blocks·k, n_blocks·k]: each row sees its own block whole and no other."""
    which = torch.arange(n_blocks * block) // block
    return which[:, None] == which[None, :]


def context_before(visible: torch.Tensor, block: int, n_context: int) -> torch.Tensor:
    """[n_blocks·k, n_context]: the rows of block m see the first visible[m] context columns."""
    return torch.arange(n_context)[None, :] < visible.repeat_interleave(block)[:, None]


def feed_and_block_mask(past: int, new: int, block: int) -> torch.Tensor:
    """Pass 1 of a step: `new` committed entries (causal, after `past` cached ones) and the block of the last
    k committed entries, in one forward. [new + k, past + new + k] bool."""
    n = past + new
    rows_new = torch.cat([torch.ones(new, past, dtype=torch.bool), torch.ones(new, new, dtype=torch.bool).tril(),
                          torch.zeros(new, block, dtype=torch.bool)], dim=1)
    rows_block = torch.cat([torch.arange(n)[None, :].expand(block, -1) < n - block,
                            torch.ones(block, block, dtype=torch.bool)], dim=1)
    return torch.cat([rows_new, rows_block])


def training_masks(n_entries: int, n_blocks: int, block: int, passes: int) -> list[torch.Tensor]:
    """Per pass, [rows, cols] bool over the keys of every earlier pass (the cache) and its own rows.

    Pass 1 rows: the N committed entries (causal) then the blocks starting at 0, k, 2k, ...; pass p >= 2 rows:
    the blocks p-1 blocks further on, which see the entries before pass 2's block start, not pass 1's
    block (a re-read of committed entries), the blocks of passes 2..p-1 of their own chain, and themselves.
    """
    starts = torch.arange(n_blocks) * block
    own = own_blocks(n_blocks, block)
    first = torch.cat([
        torch.cat([torch.ones(n_entries, n_entries, dtype=torch.bool).tril(),
                   torch.zeros(n_entries, n_blocks * block, dtype=torch.bool)], dim=1),
        torch.cat([context_before(starts, block, n_entries), own], dim=1),
    ])
    masks = [first]
    for p in range(2, passes + 1):
        none = torch.zeros_like(own)
        masks.append(torch.cat([context_before(starts + block, block, n_entries), none, *[own] * (p - 1)], dim=1))
    return masks


# --- training -------------------------------------------------------------------------------------


def falcon_predictions(draft: FalconDraft, frozen: Frozen, data: dict[str, torch.Tensor], windows: torch.Tensor,
                       passes: int = TRAIN_PASSES, glance: bool = False) -> Predictions:
    """Draft logits per depth 1..k·passes over every block of a batch of windows; glancing when training.

    Block m starts at entry m·k; its pass-p slot i predicts the token after position m·k + p·k + i.
    """
    tokens = data["tokens"][windows].long()  # [B, T]
    last = data["last"][windows].float()  # [B, T, d]
    top_ids, top_logits = data["top_ids"][windows], data["top_logits"][windows]
    B, T = tokens.shape
    k = draft.block
    N = T - 1  # entries j = 0..T-2 pair feature j with token j+1
    n_blocks = (T - (passes + 1) * k) // k + 1
    if n_blocks < 1:
        raise ValueError(f"falcon: windows of {T} tokens are too short for {passes} passes of blocks of {k}")
    rows = (torch.arange(n_blocks)[:, None] * k + torch.arange(k)[None, :]).flatten()  # [nb·k] pass 1's entries
    masks = [additive_mask(m, 0, last.dtype) for m in training_masks(N, n_blocks, k, passes)]
    cache = KVCache(draft.config).hf
    features = torch.cat([last[:, :N], last[:, rows]], dim=1)  # [B, N + nb·k, d]
    embeds = frozen.embeddings[torch.cat([tokens[:, 1:T], tokens[:, rows + 1]], dim=1)]  # [B, N + nb·k, d]
    positions = torch.cat([torch.arange(N), rows]).expand(B, -1)
    out = draft(features, embeds, positions, masks[0], cache)[:, N:]  # [B, nb·k, d] pass 1's block outputs
    logits, ids, values, feats = [], [], [], []
    for p in range(1, passes + 1):
        at = rows + p * k  # [nb·k] the position whose feature (and next token) each slot predicts
        pass_logits = frozen.logits(out)  # [B, nb·k, V']
        _per_slot(logits, pass_logits, k)
        _per_slot(ids, top_ids[:, at], k)
        _per_slot(values, top_logits[:, at], k)
        for predicted, true in zip(_slots(out, k), _slots(last[:, at], k)):
            feats.append((predicted, true))
        if p == passes:
            break
        given = _glanced(out, last[:, at], pass_logits, top_ids[:, at, 0], frozen) if glance else out
        embeds = frozen.embeddings[tokens[:, at + 1]]  # [B, nb·k, d] the true tokens after them
        out = draft(given, embeds, at.expand(B, -1), masks[p], cache)  # [B, nb·k, d]
    return Predictions(logits, ids, values, feats)


def _slots(x: torch.Tensor, k: int) -> list[torch.Tensor]:
    """[B, nb·k, ...] -> k tensors [B, nb, ...], slot i of every block."""
    return list(x.unflatten(1, (-1, k)).unbind(2))


def _per_slot(out: list[torch.Tensor], x: torch.Tensor, k: int) -> None:
    out.extend(_slots(x, k))


def _glanced(predicted: torch.Tensor, true: torch.Tensor, logits: torch.Tensor, target_best: torch.Tensor,
             frozen: Frozen) -> torch.Tensor:
    """The next pass's features: the predicted ones, but a share of slots (GLANCE_RATIO x the window's miss rate
    of this pass) replaced by the true ones. [B, nb·k, d]."""
    with torch.no_grad():
        best = frozen.vocab.index_of(target_best.long())  # [B, nb·k] the target's argmax in draft-vocab ids (-1: none)
        missed = (logits.argmax(dim=-1) != best).float().mean(dim=1)  # [B]
        reveal = torch.rand(best.shape) < (GLANCE_RATIO * missed)[:, None]  # [B, nb·k]
    return torch.where(reveal[..., None].to(predicted.device), true.to(predicted.dtype), predicted)
