"""A drafter's own KV cache: its life across steps, and where a step's draft nodes sit in it.

The engine owns the target's cache and verification; a drafter only proposes (vLLM v1's split).
A drafter with a model of its own keeps that model's cache in step with the committed sequence:

- `ModelDrafter`: `reset` empties the cache, `start` brings it to the committed sequence (reusing the
  longest matching prefix) and gives the root's logits, `commit` keeps what the accepted sequence shares.
- `DraftCache`: during one step, the draft nodes fed after the committed entries, in slot order; how a
  round of new nodes attends (the committed entries, its ancestors, itself); and, once the tree is
  drafted, only the first-child chain is kept: the likeliest path to be accepted, which `commit` then
  trims to what the target accepted.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from spectune.engine.drafter import Drafter
from spectune.engine.kvcache import KVCache
from spectune.engine.runner import CausalLM
from spectune.methods.growing import GrowingTree
from spectune.trees.draft import additive_mask, ancestor_matrix


class DraftCache:
    """One step's draft nodes in a drafter's KV cache, after its `base` committed entries."""

    def __init__(self, cache: KVCache) -> None:
        self.cache = cache
        self.base = len(cache)  # committed entries, the root's included; draft nodes follow
        self.fed: list[int] = []  # draft nodes in the cache, in slot order after `base`

    def positions(self, tree: GrowingTree, new: Sequence[int]) -> torch.Tensor:
        """[1, m] positions of a round's new nodes: the root sits at base - 1."""
        return torch.tensor([self.base - 1 + tree.depths[n] for n in new]).unsqueeze(0)  # [1, m]

    def mask(self, tree: GrowingTree, new: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """[1, 1, m, base + fed + m] additive: each new node sees the committed entries, its ancestors and itself."""
        columns = self.fed + list(new)  # cache slots base, base+1, ... hold these nodes
        allowed = ancestor_matrix(tuple(tree.parents))[list(new)][:, columns]  # [m, fed + m]
        return additive_mask(allowed, self.base, dtype)

    def chained(self, tree: GrowingTree, new: Sequence[int]) -> bool:
        """The fed nodes and `new` form one chain in slot order: the causal mask is the tree mask."""
        columns = self.fed + list(new)
        return all(tree.parents[n] == (columns[i - 1] if i else 0) for i, n in enumerate(columns))

    def fed_now(self, new: Sequence[int]) -> None:
        """Record a round's new nodes as appended to the cache."""
        self.fed.extend(new)

    def keep_first_child_chain(self, tree: GrowingTree) -> None:
        """Keep only the fed nodes along the first-drawn path, packed after `base`; drop the others."""
        slot_of = {node: slot for slot, node in enumerate(self.fed)}
        slots = []
        for node in tree.first_child_chain():
            if node not in slot_of:
                break
            slots.append(slot_of[node])  # deeper nodes were fed in later rounds: slots ascend
        if slots:
            self.cache.keep(self.base, slots)
        else:
            self.cache.truncate(self.base)


class ModelDrafter(Drafter):
    """A drafter with a model of its own (`lm`, with the cache it owns); subclasses say how a tree grows."""

    def __init__(self, lm: CausalLM) -> None:
        self.lm = lm
        self.step: DraftCache | None = None  # the step under way

    def reset(self) -> None:
        self.lm.reset()

    def commit(self, sequence: Sequence[int]) -> None:
        self.lm.cache.truncate(self.lm.cache.common_prefix(sequence))

    def start(self, sequence: Sequence[int]) -> torch.Tensor:
        """Bring the cache to `sequence` (root included); [V] the drafter's logits after the root."""
        logits = self.lm.extend_to(sequence)  # [V]
        self.step = DraftCache(self.lm.cache)
        return logits

    def feed(self, tree: GrowingTree, new: Sequence[int]) -> torch.Tensor:
        """One drafter pass over a round's new nodes, whose ancestors are already fed; [m, V] their logits."""
        step = self.step
        mask = None if step.chained(tree, new) else step.mask(tree, new, self.lm.dtype)  # [1, 1, m, base+fed+m]
        logits = self.lm.forward([tree.tokens[n] for n in new], step.positions(tree, new), mask)  # [m, V]
        step.fed_now(new)
        return logits

    def finish(self, tree: GrowingTree) -> None:
        """After drafting: the cache keeps the committed sequence and the tree's first-child chain."""
        self.step.keep_first_child_chain(tree)
        self.step = None
