"""Drafting with a small model: fill a tree template level by level, one drafter pass per level.

Greedy fills each node's children with the drafter's top-k; sampling draws them without
replacement (Gumbel-top-k) and records the distribution q they were drawn from, which the
recursive rejection rule needs. A chain is the one-child template, so SpS uses this too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from spectune.engine.drafter import DraftContext, Drafter
from spectune.engine.runner import CausalLM
from spectune.engine.sampling import probabilities, sample_without_replacement
from spectune.trees.shapes import TreeShape
from spectune.trees.draft import DraftTree, additive_mask, ancestor_matrix, tree_layout


class TemplateDrafter(Drafter):
    def __init__(self, lm: CausalLM, shape: TreeShape) -> None:
        self.lm = lm
        self.use_shape(shape)
        self.max_tree_size = shape.size

    def use_shape(self, shape: TreeShape) -> None:
        """Switch template (adaptive methods change it between steps)."""
        self.shape = shape
        self._template_children = _children(shape)

    def reset(self) -> None:
        self.lm.reset()

    def commit(self, sequence: Sequence[int]) -> None:
        self.lm.cache.truncate(self.lm.cache.common_prefix(sequence))

    def draft(self, context: DraftContext) -> DraftTree:
        depth_limit = min(self.shape.depth, context.max_depth)
        if depth_limit == 0:
            return DraftTree.root_only(context.sequence[-1])
        logits = self.lm.extend_to(context.sequence)[None]  # [1, V] after the root
        base = len(self.lm.cache)  # committed tokens, root included
        tree = _Growing(context.sequence[-1])
        level = [0]
        calls = 1
        for depth in range(1, depth_limit + 1):
            level = [child for row, node in enumerate(level) for child in self._expand(tree, node, logits[row], context)]
            if not level or depth == depth_limit:
                break
            logits = self._forward_level(tree, level, base)  # [len(level), V]
            calls += 1
        self._keep_first_child_chain(tree, base)
        q = tree.q_matrix() if not context.sampling.greedy else None
        return DraftTree(tuple(tree.tokens), tuple(tree.parents), q, calls)

    def _expand(self, tree: "_Growing", node: int, logits: torch.Tensor, context: DraftContext) -> list[int]:
        """Add the children the template asks for under `node`; logits: [V] drafter logits after it."""
        slots = self._template_children[tree.template_ids[node]]
        if not slots:
            return []
        if context.sampling.greedy:
            picks = logits.topk(min(len(slots), logits.shape[-1])).indices.tolist()
        else:
            q = probabilities(logits, context.sampling)  # [V]
            picks = sample_without_replacement(q, len(slots), context.rng)
            tree.q_rows[node] = q
        return [tree.add(token, node, slot) for token, slot in zip(picks, slots)]

    def _forward_level(self, tree: "_Growing", level: list[int], base: int) -> torch.Tensor:
        """One drafter pass over a new level; the earlier draft nodes are already in its cache."""
        parents = tuple(tree.parents)
        first, last = level[0], level[-1]  # breadth-first order: a level is contiguous
        positions = torch.tensor([base - 1 + tree.depths[i] for i in level]).unsqueeze(0)  # [1, m]
        mask = None
        if not tree_layout(parents[: last + 1]).is_chain:
            allowed = ancestor_matrix(parents[: last + 1])[first : last + 1, 1:]  # [m, last] over draft nodes
            mask = additive_mask(allowed, base, self.lm.dtype)  # [1, 1, m, base + last]
        return self.lm.forward([tree.tokens[i] for i in level], positions, mask)

    def _keep_first_child_chain(self, tree: "_Growing", base: int) -> None:
        """Keep the drafter's cache only along the best-first path: a chain consistent with the sequence."""
        fed = len(self.lm.cache) - base
        slots, node = [], 0
        while (child := tree.first_child.get(node)) is not None and child - 1 < fed:
            slots.append(child - 1)
            node = child
        if slots:
            self.lm.cache.keep(base, slots)
        else:
            self.lm.cache.truncate(base)


class _Growing:
    """A draft tree under construction (breadth-first), with its template bookkeeping."""

    def __init__(self, root: int) -> None:
        self.tokens, self.parents, self.depths, self.template_ids = [root], [-1], [0], [0]
        self.first_child: dict[int, int] = {}
        self.q_rows: dict[int, torch.Tensor] = {}

    def add(self, token: int, parent: int, template_id: int) -> int:
        index = len(self.tokens)
        self.tokens.append(token)
        self.parents.append(parent)
        self.depths.append(self.depths[parent] + 1)
        self.template_ids.append(template_id)
        self.first_child.setdefault(parent, index)
        return index

    def q_matrix(self) -> torch.Tensor:
        vocab = next(iter(self.q_rows.values())).shape[-1]
        q = torch.zeros(len(self.tokens), vocab)  # [n+1, V]; leaves keep zero rows (never used)
        for node, row in self.q_rows.items():
            q[node] = row
        return q


def _children(shape: TreeShape) -> tuple[tuple[int, ...], ...]:
    """Template children of each template node, in rank order."""
    kids: list[list[int]] = [[] for _ in shape.parents]
    for i, p in enumerate(shape.parents[1:], start=1):
        kids[p].append(i)
    return tuple(tuple(sorted(k, key=lambda c: shape.ranks[c])) for k in kids)
