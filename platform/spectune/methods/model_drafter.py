"""Drafting with a small model: fill a tree template level by level, one drafter pass per level.

Greedy fills each node's children with the drafter's top-k; sampling draws them without
replacement (Gumbel-top-k) and records the distribution q they were drawn from, which the
recursive rejection rule needs. A chain is the one-child template, so SpS uses this too.
"""

from __future__ import annotations

import torch

from spectune.engine.drafter import DraftContext
from spectune.engine.runner import CausalLM
from spectune.engine.sampling import probabilities, sample_without_replacement
from spectune.methods.draft_cache import ModelDrafter
from spectune.methods.growing import GrowingTree, template_children
from spectune.trees.shapes import TreeShape
from spectune.trees.draft import DraftTree


class TemplateDrafter(ModelDrafter):
    def __init__(self, lm: CausalLM, shape: TreeShape) -> None:
        super().__init__(lm)
        self.use_shape(shape)
        self.max_tree_size = shape.size

    def use_shape(self, shape: TreeShape) -> None:
        """Switch template (adaptive methods change it between steps)."""
        self.shape = shape
        self._template_children = template_children(shape)

    def draft(self, context: DraftContext) -> DraftTree:
        depth_limit = min(self.shape.depth, context.max_depth)
        if depth_limit == 0:
            return DraftTree.root_only(context.sequence[-1])
        logits = self.start(context.sequence)[None]  # [1, V] after the root
        tree = GrowingTree(context.sequence[-1])
        level = [0]
        calls = 1
        for depth in range(1, depth_limit + 1):
            level = [child for row, node in enumerate(level) for child in self._expand(tree, node, logits[row], context)]
            if not level or depth == depth_limit:
                break
            logits = self.feed(tree, level)  # [len(level), V]; breadth first, so the level's ancestors are fed
            calls += 1
        self.finish(tree)
        return tree.draft_tree(calls)

    def _expand(self, tree: GrowingTree, node: int, logits: torch.Tensor, context: DraftContext) -> list[int]:
        """Add the children the template asks for under `node`; logits: [V] drafter logits after it."""
        slots = self._template_children[tree.template[node]]
        if not slots:
            return []
        if context.sampling.greedy:
            picks = logits.topk(min(len(slots), logits.shape[-1])).indices.tolist()
        else:
            q = probabilities(logits, context.sampling)  # [V]
            picks = sample_without_replacement(q, len(slots), context.rng)
            tree.q_rows[node] = q
        return [tree.add(token, node, slot) for token, slot in zip(picks, slots)]

