"""falcon: a semi-autoregressive drafter of a few decoder layers reading the target's features, drafting a
block of k tokens per pass into a static tree, several passes per step.

The drafter keeps a KV cache of committed entries (entry j: the target's feature at token j with token
j+1, causal), fed as verifications make features known (`hidden_layers()` = the final norm's output, as
EAGLE reads). Each step (the attention rule: `spectune.heads.falcon`):

- pass 1, one forward with the newly committed entries: the last k entries read as a block give k
  distributions, for depths 1..k (one per block position);
- pass p >= 2, one forward for every node at depth (p-1)k the tree opens: its block pairs pass p-1's k
  predicted features with the k tokens on its path, giving depths (p-1)k+1..pk below it.

The tree is a static template (ranked by `budget` and `topk`, or an explicit branching / path list), at
most k x passes deep. Every node of one depth under one block anchor shares that block position's
distribution (like Medusa's heads): greedy children are its top ranks; sampling draws them without
replacement, q recorded per parent for the engine's recursive rejection (lossless for any q).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from pydantic import Field, model_validator

from spectune.engine.drafter import DraftContext, Drafter, StepOutcome
from spectune.engine.kvcache import KVCache
from spectune.engine.sampling import probabilities, sample_without_replacement
from spectune.heads.falcon import context_before, feed_and_block_mask, own_blocks
from spectune.heads.load import LoadedHeads, load_heads
from spectune.methods.base import Knobs, Models
from spectune.methods.growing import GrowingTree, template_children
from spectune.methods.registry import METHODS
from spectune.methods.template_fill import RANK_WEIGHTS
from spectune.trees.draft import DraftTree, additive_mask
from spectune.trees.shapes import TreeShape, branching_shape, paths_shape, ranked_paths

TREE_KNOBS = ("branching", "paths")


class FalconKnobs(Knobs):
    """Block size and passes per step, and the tree: a ranked template of `budget` nodes with at most `topk`
    children per node, or an explicit branching / path list (at most one)."""

    heads: str | None = Field(None, description="heads folder (default: <pair>/heads/falcon beside the pair's target/)")
    block: int | None = Field(None, ge=1, le=16, description="tokens drafted per pass: the block the heads were "
                              "trained for (default: theirs; another is refused)")
    passes: int = Field(3, ge=1, le=8, description="drafter passes per step: the tree is at most block x passes deep")
    budget: int = Field(24, ge=1, le=512, description="draft nodes per step (the ranked template's size)")
    topk: int = Field(4, ge=1, le=len(RANK_WEIGHTS),
                      description="most children under one node (a block position's top-k)")
    branching: list[int] | None = Field(None, description="per-depth branching instead of the ranked template")
    paths: list[list[int]] | None = Field(None, description="Medusa-style path list instead of the ranked template")

    @model_validator(mode="after")
    def one_tree(self) -> "FalconKnobs":
        self.at_most_one_of(*TREE_KNOBS)
        ranked = [name for name in ("budget", "topk") if name in self.model_fields_set]
        if self.given_shape() is not None and ranked:
            raise ValueError(f"{self.tree_field()} gives the tree; {' and '.join(ranked)} apply to the ranked "
                             "template only: give one or the other")
        return self

    def given_shape(self) -> TreeShape | None:
        if self.branching is not None:
            return branching_shape(self.branching)
        if self.paths is not None:
            return paths_shape(self.paths)
        return None

    def tree_field(self) -> str:
        return next((name for name in TREE_KNOBS if getattr(self, name) is not None), "budget")

    def shape(self, block: int) -> TreeShape:
        """The template for blocks of `block`: at most block x passes deep."""
        depth = block * self.passes
        shape = self.given_shape()
        if shape is None:
            return paths_shape(ranked_paths(self.budget, depth, RANK_WEIGHTS[: self.topk]))
        if shape.depth > depth:
            raise ValueError(f"{self.tree_knobs()} is {shape.depth} deep; falcon drafts at most block x passes = "
                             f"{block} x {self.passes} = {depth} deep")
        return shape

    def tree_knobs(self) -> str:
        field = self.tree_field()
        return f"{field}={getattr(self, field)}"

    def derived_columns(self) -> dict[str, int | str]:
        """draft_len: the tree's depth, known before the heads load when the shape or the block is given."""
        shape = self.given_shape()
        if shape is not None:
            return {"draft_len": shape.depth}
        return {"draft_len": self.shape(self.block).depth} if self.block is not None else {}


@dataclass(frozen=True)
class BlockOut:
    """One block's pass: per block position, the predicted feature (the next block's input) and the draft logits."""

    features: torch.Tensor  # [k, d]
    logits: torch.Tensor  # [k, V] over the target's vocabulary (-inf outside a reduced draft vocabulary)
    slots: tuple[int, ...] = ()  # where its k entries sit in the cache (passes >= 2; pass 1's are dropped from view)


class FalconDrafter(Drafter):
    def __init__(self, heads: LoadedHeads, knobs: FalconKnobs) -> None:
        self.heads = heads
        self.net = heads.module  # FalconDraft
        self.block = heads.spec.n_heads
        self.knobs = knobs
        self.shape = knobs.shape(self.block)
        self.children = template_children(self.shape)
        self.max_tree_size = self.shape.size
        self.layer = heads.spec.feature_layers[-1]
        self.reset()

    def reset(self) -> None:
        self.cache = KVCache(self.net.config)
        self.committed = 0  # committed entries in the cache; draft blocks follow and are dropped each step
        self.pending: list[torch.Tensor] = []  # target features of positions not yet fed, [m, d]
        self.recent: torch.Tensor | None = None  # [<= k, d] the features of the last committed entries

    def hidden_layers(self) -> tuple[int, ...]:
        return (self.layer,)

    def prefilled(self, hidden: Mapping[int, torch.Tensor]) -> None:
        self.pending.append(hidden[self.layer])

    def observe(self, outcome: StepOutcome) -> None:
        self.pending.append(outcome.hidden[self.layer][list(outcome.verdict.path)])

    def draft_modules(self) -> tuple[torch.nn.Module, ...]:
        return self.heads.modules()

    @torch.inference_mode()
    def draft(self, context: DraftContext) -> DraftTree:
        sequence = context.sequence
        depth_limit = min(self.shape.depth, context.max_depth)
        first = self._feed_and_first_block(sequence)
        if first is None or depth_limit == 0:
            return DraftTree.root_only(sequence[-1])
        tree = GrowingTree(sequence[-1])
        outs = {0: first}  # anchor node (root, or a node at depth p·k) -> its block's pass
        anchor = {0: 0}  # node -> the anchor whose pass gives its children
        level, calls = [0], 1
        for depth in range(1, depth_limit + 1):
            level = [n for n in level if self.children[tree.template[n]]]
            if not level:
                break
            if depth > 1 and (depth - 1) % self.block == 0:  # a new block: one pass for every node opening one
                outs.update(self._next_blocks(tree, level, outs, anchor, len(sequence) - 1))
                calls += 1
            level = [child for node in level for child in self._expand(tree, node, outs, anchor, context)]
        self.cache.truncate(self.committed)  # the blocks were the draft's own: the next step re-reads from truth
        return tree.draft_tree(calls)

    def _feed_and_first_block(self, sequence: Sequence[int]) -> BlockOut | None:
        """Feed the entries verified since the last step (causal) and read the last k as a block, one forward."""
        self.cache.truncate(self.committed)
        features = torch.cat(self.pending) if self.pending else None  # [m, d]
        self.pending = []
        n = self.committed + (0 if features is None else features.shape[0])  # entries once fed: 0..n-1
        if n != len(sequence) - 1:
            raise RuntimeError(f"falcon: features of {n} positions for a sequence of {len(sequence)} tokens")
        if features is not None:
            known = features if self.recent is None else torch.cat([self.recent, features])
            self.recent = known[-self.block:]  # [<= k, d]
        if n < self.block:  # too short a sequence for a block: feed what there is and draft nothing
            if features is not None:
                self._run(features, sequence[self.committed + 1 : n + 1], list(range(self.committed, n)),
                          feed_and_block_mask(self.committed, n - self.committed, 0))
                self.committed = n
            return None
        new = n - self.committed
        block_tokens = list(sequence[n - self.block + 1 : n + 1])  # the root's token last
        rows = ([] if features is None else [features]) + [self.recent]
        tokens = list(sequence[self.committed + 1 : n + 1]) + block_tokens
        positions = list(range(self.committed, n)) + list(range(n - self.block, n))
        out = self._run(torch.cat(rows), tokens, positions, feed_and_block_mask(self.committed, new, self.block))
        self.committed = n
        return BlockOut(out[new:], self._logits(out[new:]))

    def _next_blocks(self, tree: GrowingTree, anchors: list[int], outs: dict[int, BlockOut], anchor: dict[int, int],
                     committed: int) -> dict[int, BlockOut]:
        """One forward over the block of every anchor: its path's last k tokens with the previous pass's features."""
        k = self.block
        start = len(self.cache)  # this pass's blocks go here, anchor after anchor
        features, tokens, positions, views = [], [], [], []
        for a in anchors:
            previous = outs[anchor[tree.parents[a]]]  # the pass that drafted this block's tokens
            features.append(previous.features)
            tokens += tree.path_tokens(a)[-k:]
            depth = tree.depths[a]
            positions += list(range(committed + depth - k, committed + depth))
            views.append(self._visible(tree, a, outs, anchor))
        visible = torch.stack(views)  # [A, start] which cache slots each anchor's block sees
        allowed = torch.cat([visible.repeat_interleave(k, dim=0), own_blocks(len(anchors), k)], dim=1)
        out = self._run(torch.cat(features), tokens, positions, allowed)  # [A·k, d]
        logits = self._logits(out)
        return {a: BlockOut(out[i * k : (i + 1) * k], logits[i * k : (i + 1) * k],
                            tuple(range(start + i * k, start + (i + 1) * k))) for i, a in enumerate(anchors)}

    def _visible(self, tree: GrowingTree, node: int, outs: dict[int, BlockOut], anchor: dict[int, int]) -> torch.Tensor:
        """[cache length] bool: the committed entries and the blocks of passes >= 2 on `node`'s path."""
        seen = context_before(torch.tensor([self.committed]), 1, len(self.cache))[0]  # [cache length]
        ancestor = anchor[tree.parents[node]]
        while ancestor != 0:  # pass 1's block (the root's) re-reads committed entries: not seen again
            seen[list(outs[ancestor].slots)] = True
            ancestor = anchor[tree.parents[ancestor]]
        return seen

    def _expand(self, tree: GrowingTree, node: int, outs: dict[int, BlockOut], anchor: dict[int, int],
                context: DraftContext) -> list[int]:
        """The template's children of `node`, from its anchor's distribution at the next block position."""
        slots = self.children[tree.template[node]]
        mine = node if tree.depths[node] % self.block == 0 else anchor[tree.parents[node]]
        anchor[node] = mine
        row = outs[mine].logits[tree.depths[node] % self.block]  # [V]
        if context.sampling.greedy:
            picks = row.topk(min(len(slots), row.shape[-1])).indices.tolist()
        else:
            q = probabilities(row, context.sampling)  # [V], zero outside the draft vocabulary
            tree.q_rows[node] = q
            picks = sample_without_replacement(q, len(slots), context.rng)
        return [tree.add(token, node, slot) for token, slot in zip(picks, slots)]

    def _run(self, features: torch.Tensor, tokens: list[int], positions: list[int], allowed: torch.Tensor
             ) -> torch.Tensor:
        """One forward of the draft layers over rows appended to the cache; [rows, d] predicted features."""
        device = features.device
        embeds = self.heads.embeddings(torch.tensor([tokens], device=device))  # [1, m, d]
        mask = additive_mask(allowed, 0, features.dtype).to(device)  # [1, 1, m, cache + m]
        at = torch.tensor([positions], device=device)  # [1, m]
        out = self.net(features[None].to(embeds.dtype), embeds, at, mask, self.cache.hf)  # [1, m, d]
        self.cache.appended(tokens)
        return out[0]

    def _logits(self, features: torch.Tensor) -> torch.Tensor:
        """[k, d] -> [k, V] over the target's vocabulary (-inf outside a reduced draft vocabulary)."""
        return self.heads.vocab.expand(self.heads.readout(features).float())


@METHODS.register(
    "falcon",
    FalconKnobs,
    needs_drafter=False,
    needs_heads="falcon",
    summary="Falcon: two trained decoder layers on the target's features draft a block of k tokens per pass "
    "(semi-autoregressive), several passes per step into a static tree (top-k per block position)",
    paper="Gao et al. 2024, Falcon (semi-autoregressive drafting, Coupled Sequential Glancing Distillation, "
    "custom decoding tree); claims 2.91-3.51x lossless on Vicuna and LLaMA2-Chat, ahead of EAGLE and Medusa. "
    "Measured here (docs/benchmarks.md, 1 CPU thread, greedy): tiny, tau 2.95 at budget 24 (EAGLE-3 2.93 at 6), "
    "0.94x bf16 / 0.62x fp32, at budget 8 with 2 passes 1.19x / 0.86x (EAGLE-3 1.34x / 0.96x); SmolLM2, tau 1.32-1.37, "
    "0.70-0.94x bf16: two drafter layers are not cheap beside a small target on a CPU",
    cost="one pass of the draft layers (+ LM head rows) per block level, at most passes; tree size + 1 tokens verified",
    rule="greedy match; recursive rejection over siblings drawn without replacement from their block position's "
    "distribution",
    columns={"node_budget": ("budget",), "tree_shape": TREE_KNOBS},
)
def build_falcon(knobs: FalconKnobs, models: Models) -> FalconDrafter:
    heads = load_heads(knobs.heads, "falcon", models.target.model)
    if knobs.block is not None and knobs.block != heads.spec.n_heads:
        raise ValueError(f"falcon: block={knobs.block}, but the heads at {heads.folder} were trained for blocks of "
                         f"{heads.spec.n_heads}")
    return FalconDrafter(heads, knobs)
