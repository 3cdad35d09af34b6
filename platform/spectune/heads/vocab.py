"""The draft vocabulary: which tokens the heads may propose.

With a large vocabulary (the real model's 49152) most of a head's cost is its LM-head matmul.
FR-Spec's observation: a corpus's few thousand most frequent tokens carry nearly all of its
mass, so a head that scores only those loses little acceptance and saves most of that matmul.
The target still verifies over its whole vocabulary, so decoding stays lossless: a token
outside the draft vocabulary is simply never drafted (q = 0 there).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DraftVocab:
    ids: torch.Tensor  # [V'] ascending token ids the heads score (all V when not reduced)
    full_size: int  # V, the target's vocabulary

    @property
    def size(self) -> int:
        return int(self.ids.numel())

    @property
    def reduced(self) -> bool:
        return self.size < self.full_size

    @classmethod
    def full(cls, vocab_size: int) -> DraftVocab:
        return cls(torch.arange(vocab_size), vocab_size)

    def rows(self, weight: torch.Tensor) -> torch.Tensor:
        """The LM head's rows of the draft tokens: [V, d] -> [V', d] (the same tensor when not reduced)."""
        return weight[self.ids.to(weight.device)] if self.reduced else weight

    def expand(self, logits: torch.Tensor) -> torch.Tensor:
        """[..., V'] draft logits -> [..., V] with -inf outside the draft vocabulary."""
        if not self.reduced:
            return logits
        full = logits.new_full((*logits.shape[:-1], self.full_size), float("-inf"))
        full[..., self.ids.to(logits.device)] = logits
        return full

    def token_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Positions in the draft vocabulary -> the target's token ids."""
        return self.ids.to(draft_ids.device)[draft_ids] if self.reduced else draft_ids

    def index_of(self, token_ids: torch.Tensor) -> torch.Tensor:
        """The target's token ids -> positions in the draft vocabulary (-1 for tokens outside it)."""
        if not self.reduced:
            return token_ids
        lookup = torch.full((self.full_size,), -1, dtype=torch.long)
        lookup[self.ids] = torch.arange(self.size)
        return lookup.to(token_ids.device)[token_ids]


def frequent_tokens(tokens: torch.Tensor, size: int, vocab_size: int) -> DraftVocab:
    """The `size` most frequent ids of a token stream (ties: the lower id), ascending; all when size >= V."""
    if size >= vocab_size:
        return DraftVocab.full(vocab_size)
    counts = torch.bincount(tokens.flatten().long(), minlength=vocab_size)[:vocab_size]  # [V]
    order = torch.sort(-counts, stable=True).indices  # [V] most frequent first; a stable sort keeps ties by id
    return DraftVocab(order[:size].sort().values, vocab_size)
