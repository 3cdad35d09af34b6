"""Multi-draft trees: RSD (siblings without replacement) and SpecInfer (siblings with replacement).

Both draft the same tree shape with the drafter model, so a sweep compares only the sibling
rule. RSD draws each node's children by Gumbel-top-k and verifies them by recursive
rejection sampling; SpecInfer draws them i.i.d. from q (duplicates possible) and verifies by
multi-round rejection, where q stays the same after each rejection. At temperature 0 both
take the drafter's top-k: the rules differ only when sampling.
"""

from __future__ import annotations

import dataclasses

import torch
from pydantic import Field, model_validator

from spectune.engine.drafter import DraftContext
from spectune.engine.sampling import probabilities, sample_with_replacement
from spectune.trees.shapes import TreeShape, branching_shape
from spectune.trees.draft import DraftTree
from spectune.methods.base import Knobs, Models
from spectune.methods.growing import GrowingTree
from spectune.methods.model_drafter import TemplateDrafter
from spectune.methods.registry import METHODS


class MultiDraftKnobs(Knobs):
    width: int = Field(3, ge=1, le=32, description="drafts under the root (siblings drawn by the method's rule)")
    depth: int = Field(4, ge=1, le=64, description="tokens per draft: the tree's depth")
    branching: list[int] | None = Field(
        None, description="per-level widths instead of [width, 1, 1, ...] (RSD-C style), e.g. [3, 2, 1]"
    )

    @model_validator(mode="after")
    def valid_branching(self) -> "MultiDraftKnobs":
        self.shape()  # surface malformed widths at validation time
        return self

    def shape(self) -> TreeShape:
        """[width, 1, 1, ...]: `width` independent drafts of `depth` tokens, or the explicit per-level widths."""
        return branching_shape(self.branching if self.branching is not None else [self.width] + [1] * (self.depth - 1))

    def tree_knobs(self) -> str:
        """The knobs that set the shape, for messages: `branching=[3, 2, 1]` or `width=3, depth=4`."""
        return f"branching={self.branching}" if self.branching is not None else f"width={self.width}, depth={self.depth}"


class WithReplacementDrafter(TemplateDrafter):
    """SpecInfer's sampling: every sibling an independent draw from q, so the same token may repeat."""

    def draft(self, context: DraftContext) -> DraftTree:
        tree = super().draft(context)
        return tree if context.sampling.greedy else dataclasses.replace(tree, with_replacement=True)

    def _expand(self, tree: GrowingTree, node: int, logits: torch.Tensor, context: DraftContext) -> list[int]:
        if context.sampling.greedy:  # i.i.d. draws from a one-hot law would all repeat the argmax
            return super()._expand(tree, node, logits, context)
        slots = self._template_children[tree.template[node]]
        if not slots:
            return []
        q = probabilities(logits, context.sampling)  # [V]
        picks = sample_with_replacement(q, len(slots), context.rng)
        tree.q_rows[node] = q
        return [tree.add(token, node, slot) for token, slot in zip(picks, slots)]


@METHODS.register(
    "rsd",
    MultiDraftKnobs,
    needs_drafter=True,
    hybrid=True,
    summary="multi-draft tree ([width, 1, 1, ...] or per-level widths); siblings sampled without replacement",
    paper="Jeon et al. 2024, Recursive Speculative Decoding (RSD-C)",
    cost="depth drafter passes (one per level); tree size + 1 tokens verified",
    rule="greedy: top-k siblings, match; sampling: Gumbel-top-k siblings, recursive rejection (q loses each rejected token)",
    columns={"tree_shape": ("branching",)},
)
def build_rsd(knobs: MultiDraftKnobs, models: Models) -> TemplateDrafter:
    return TemplateDrafter(models.drafter, knobs.shape())


@METHODS.register(
    "specinfer",
    MultiDraftKnobs,
    needs_drafter=True,
    hybrid=True,
    summary="multi-draft tree like rsd, but siblings sampled with replacement (duplicates possible)",
    paper="Miao et al. 2024, SpecInfer (multi-step speculative sampling)",
    cost="depth drafter passes (one per level); tree size + 1 tokens verified",
    rule="greedy: top-k siblings, match; sampling: i.i.d. siblings, multi-round rejection (q unchanged after a rejection)",
    columns={"tree_shape": ("branching",)},
)
def build_specinfer(knobs: MultiDraftKnobs, models: Models) -> WithReplacementDrafter:
    return WithReplacementDrafter(models.drafter, knobs.shape())
