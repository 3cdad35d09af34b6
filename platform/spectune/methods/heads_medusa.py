"""medusa and hydra: a static tree drafted by heads trained on the target's own final feature.

The feature is the target's final-norm output at the last accepted node (the one whose logits gave
the root): the loop hands it back from each verification (`hidden_layers()` = (L,)) and from the
prompt's prefill. Head k proposes draft depth k:

- medusa: head k reads that feature alone, so every node of one depth gets the same candidates
  (one pass of all K heads per step);
- hydra: head k also reads the embeddings of the path to the node (root and drafted tokens), so each
  level runs its head over that level's nodes (K small passes per step).

The tree is a static template (Medusa path lists, per-depth branching, or a ranked template of a
size), at most K deep. Greedy: a node's children are its head's top ranks; sampling: drawn without
replacement from the head's distribution q, recorded per parent for the engine's recursive rejection
over siblings (lossless for any q). Tokens outside a reduced draft vocabulary have q = 0.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from pydantic import Field

from spectune.engine.drafter import DraftContext, Drafter, StepOutcome
from spectune.engine.sampling import probabilities, sample_without_replacement
from spectune.heads.load import LoadedHeads, load_heads
from spectune.methods.base import HEADS_ON_A_HYBRID, Models
from spectune.methods.registry import METHODS
from spectune.methods.growing import GrowingTree, template_children
from spectune.methods.template_fill import RANK_WEIGHTS, TEMPLATE_COLUMNS, TemplateKnobs
from spectune.trees.draft import DraftTree
from spectune.trees.shapes import TreeShape, paths_shape, ranked_paths

DEFAULT_HEADS_TREE = 16  # nodes of the default ranked template: wide near the root, deep along rank 0


class HeadsTreeKnobs(TemplateKnobs):
    """A heads folder and the static tree the heads fill (tree_size / branching / paths / paths_file, at most one)."""

    default_tree_size = DEFAULT_HEADS_TREE

    heads: str | None = Field(None, description="heads folder (default: <pair>/heads/<method> beside the pair's target/)")

    def heads_shape(self, n_heads: int) -> TreeShape:
        """The template, at most `n_heads` deep: the ranked default stops there, an explicit shape must fit."""
        shape = self.given_shape()
        if shape is None:
            return paths_shape(ranked_paths(self.tree_size or self.default_tree_size, n_heads, RANK_WEIGHTS))
        if shape.depth > n_heads:
            raise ValueError(f"{self.template_knob()} is {shape.depth} deep; these heads propose {n_heads} depths")
        return shape


# level_logits(depth, nodes, tree) -> [m, V'] draft logits for the children (at `depth`) of each node of a level
LevelLogits = Callable[[int, list[int], GrowingTree], torch.Tensor]


def fill_by_level(shape: TreeShape, root: int, depth_limit: int, level_logits: LevelLogits, heads: LoadedHeads,
                  context: DraftContext) -> DraftTree:
    """Level by level: the template's children of each node, from its row of `level_logits` (one call per level)."""
    children = template_children(shape)
    tree, level, calls = GrowingTree(root), [0], 0
    for depth in range(1, depth_limit + 1):
        level = [n for n in level if children[tree.template[n]]]
        if not level:
            break
        rows = level_logits(depth, level, tree)  # [m, V']
        calls += 1
        level = [child for node, row in zip(level, rows) for child in _expand(tree, node, row, children, heads, context)]
    return tree.draft_tree(calls)


def _expand(tree: GrowingTree, node: int, row: torch.Tensor, children: tuple[tuple[int, ...], ...], heads: LoadedHeads,
            context: DraftContext) -> list[int]:
    slots = children[tree.template[node]]
    if context.sampling.greedy:
        picks = heads.vocab.token_ids(row.topk(min(len(slots), row.shape[-1])).indices).tolist()
    else:
        q = probabilities(heads.vocab.expand(row), context.sampling)  # [V], zero outside the draft vocabulary
        tree.q_rows[node] = q
        picks = sample_without_replacement(q, len(slots), context.rng)
    return [tree.add(token, node, slot) for token, slot in zip(picks, slots)]


class FeatureHeadsDrafter(Drafter):
    """Holds the target's final feature at the root's parent; subclasses say how a level's logits come."""

    def __init__(self, heads: LoadedHeads, shape: TreeShape) -> None:
        self.heads = heads
        self.shape = shape
        self.max_tree_size = shape.size
        self.layer = heads.spec.feature_layers[-1]  # L: the final norm's output
        self.feature: torch.Tensor | None = None  # [d] at the node whose logits gave the root

    def reset(self) -> None:
        self.feature = None

    def hidden_layers(self) -> tuple[int, ...]:
        return (self.layer,)

    def prefilled(self, hidden: Mapping[int, torch.Tensor]) -> None:
        self.feature = hidden[self.layer][-1]

    def observe(self, outcome: StepOutcome) -> None:
        self.feature = outcome.hidden[self.layer][outcome.verdict.path[-1]]

    def draft_modules(self) -> tuple[torch.nn.Module, ...]:
        return self.heads.modules()

    @torch.inference_mode()
    def draft(self, context: DraftContext) -> DraftTree:
        depth_limit = min(self.shape.depth, context.max_depth)
        if depth_limit == 0 or self.feature is None:  # a one-token prompt: no feature before the first root
            return DraftTree.root_only(context.sequence[-1])
        self.start()
        return fill_by_level(self.shape, context.sequence[-1], depth_limit, self.level_logits, self.heads, context)

    def start(self) -> None:
        """Before a step's levels: what every level shares."""

    def level_logits(self, depth: int, level: list[int], tree: GrowingTree) -> torch.Tensor:
        raise NotImplementedError


class MedusaDrafter(FeatureHeadsDrafter):
    def start(self) -> None:
        self._per_depth = self.heads.readout(self.heads.module(self.feature))  # [K, V'] one pass of every head

    def level_logits(self, depth: int, level: list[int], tree: GrowingTree) -> torch.Tensor:
        return self._per_depth[depth - 1].expand(len(level), -1)  # every node of a depth: the same head


class HydraDrafter(FeatureHeadsDrafter):
    def level_logits(self, depth: int, level: list[int], tree: GrowingTree) -> torch.Tensor:
        paths = torch.tensor([tree.path_tokens(n) for n in level], device=self.feature.device)  # [m, depth]
        embeds = self.heads.embeddings(paths)  # [m, depth, d] the root and the tokens drafted after it
        hidden = self.heads.module.head(depth, self.feature.expand(len(level), -1), embeds)  # [m, d]
        return self.heads.readout(hidden)  # [m, V']


def _build(kind: str, drafter: type[FeatureHeadsDrafter], knobs: HeadsTreeKnobs, models: Models) -> FeatureHeadsDrafter:
    heads = load_heads(knobs.heads, kind, models.target.model)
    return drafter(heads, knobs.heads_shape(heads.spec.n_heads))


@METHODS.register(
    "medusa",
    HeadsTreeKnobs,
    needs_drafter=False,
    hybrid=HEADS_ON_A_HYBRID,
    needs_heads="medusa",
    summary="Medusa-1: K residual heads on the target's final feature, head k proposing depth k of a static tree",
    paper="Cai et al. 2024, Medusa (multiple decoding heads)",
    cost="one pass of the K heads (+ LM head rows) per step; tree size + 1 tokens verified",
    rule="greedy match; recursive rejection over siblings drawn without replacement from head k's distribution",
    columns=TEMPLATE_COLUMNS,
)
def build_medusa(knobs: HeadsTreeKnobs, models: Models) -> MedusaDrafter:
    return _build("medusa", MedusaDrafter, knobs, models)


@METHODS.register(
    "hydra",
    HeadsTreeKnobs,
    needs_drafter=False,
    hybrid=HEADS_ON_A_HYBRID,
    needs_heads="hydra",
    summary="Hydra: heads on the target's final feature that also read the tokens drafted before them (a static tree)",
    paper="Ankner et al. 2024, Hydra (sequentially-dependent draft heads)",
    cost="one head pass per tree level (over that level's nodes) per step; tree size + 1 tokens verified",
    rule="greedy match; recursive rejection over siblings drawn without replacement from each node's head distribution",
    columns=TEMPLATE_COLUMNS,
)
def build_hydra(knobs: HeadsTreeKnobs, models: Models) -> HydraDrafter:
    return _build("hydra", HydraDrafter, knobs, models)
