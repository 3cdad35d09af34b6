"""`ppd`: parallel prompt decoding: the target itself drafts, through m trained prompt tokens.

Chen et al. 2024 (PPD) append m trainable prompt-token embeddings after the context; in the forward that
verifies a draft, prompt k after a node predicts the token k places after that node's next one. Those m
embeddings are the only trained parameters (`spectune heads train --kind ppd`: the frozen target, the
gradient through it into the prompts).

Here, each step:

- the prompt tokens ride in the verification forward as the engine's extra positions
  (`Drafter.verify_extras`): m chained prompts under *every* tree node, since any node may be the last
  accepted one; they are never accepted nor kept in the cache, and the tree's logits are those without them;
- the prompts under the last accepted node (at the first step: after the prompt, in its prefill) give the
  next step's candidates: depth k's top ranks from
  prompt k (greedy), or drawn without replacement from its distribution (sampling; recorded as q, so the
  engine's recursive rejection keeps it lossless);
- the tree is a static sparse tree: the `budget` best rank paths under the per-position, per-rank
  acceptance the heads' card measured on held-out text (`trees.sparse`), or, given a forward-time
  profile (`spectune trees profile`), PPD's hardware-aware choice: the size whose step (nodes plus
  their prompt tokens) costs least per expected token on that measured t(n).

Where this differs from the paper: PPD's dynamic sparse tree gives less likely candidates fewer prompt
tokens (down to one) and keeps a tree per number of prompts the accepted node carried; here every node
carries all m (one tree, simpler, at most m·(n+1) extra positions a step; on a CPU where t(n) grows from
a few tokens on, the profile then picks a smaller tree instead).
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator

from spectune.engine.drafter import DraftContext, Drafter, StepOutcome
from spectune.engine.runner import ExtraOutputs
from spectune.heads.load import LoadedHeads, load_heads
from spectune.methods.base import Knobs, Models
from spectune.methods.growing import GrowingTree
from spectune.methods.heads_medusa import fill_by_level
from spectune.methods.registry import METHODS
from spectune.models.card import read_card
from spectune.trees.draft import DraftTree, VerifyExtras
from spectune.trees.files import load_profile
from spectune.trees.shapes import TreeShape, chain_shape, paths_shape
from spectune.trees.sparse import SparseTree, hardware_aware_sparse_tree, sparse_tree

# per-rank acceptance per depth for heads whose card has none (rows: depth 1, 2, ...): a fair first prompt, a thin tail
PRIOR_RANKS = (0.3, 0.1, 0.05, 0.03, 0.02, 0.01)


class PpdKnobs(Knobs):
    heads: str | None = Field(None, description="ppd heads folder (default: <pair>/heads/ppd beside the pair's target/)")
    prompts: int | None = Field(None, ge=1, le=16, description="prompt tokens per node (the deepest draft); "
                                                               "default: all the heads were trained with")
    budget: int = Field(16, ge=1, le=512, description="draft nodes per step (root excluded); the tree uses at most this")
    profile_file: str | None = Field(
        None, description="JSON from `spectune trees profile`: pick the tree size by modelled time per token (PPD's "
                          "hardware-aware tree); it must cover (budget+1)·(1+prompts) tokens")

    @model_validator(mode="after")
    def profile_readable(self) -> "PpdKnobs":
        if self.profile_file is not None:
            load_profile(self.profile_file)  # a file that does not parse fails here, not mid-sweep
        return self

    def tree_knobs(self) -> str:
        return f"budget={self.budget}" + (f", prompts={self.prompts}" if self.prompts is not None else "")

    def tree(self, acceptance: tuple[tuple[float, ...], ...], prompts: int) -> SparseTree:
        rows = acceptance[:prompts]
        if self.profile_file is None:
            return sparse_tree(rows, self.budget, prompts)
        return hardware_aware_sparse_tree(rows, self.budget, prompts, load_profile(self.profile_file))


class PositionsAheadDrafter(Drafter):
    """The target itself drafts: m extra positions under every tree node ride in its verification forward, and
    those under the last accepted node give the next tree's depths 1..m (PPD's prompt tokens, Hidden Transfer's
    pseudo states). Subclasses say what the extras are (`extras`)."""

    def __init__(self, heads: LoadedHeads, shape: TreeShape, positions: int) -> None:
        self.heads = heads
        self.shape = shape
        self.prompts = positions  # extra positions per node: the deepest draft
        self.max_tree_size = shape.size + (shape.size + 1) * positions  # nodes + the extras under each (root too)
        self.per_depth: torch.Tensor | None = None  # [m, V] extra logits under the node that gave the root

    def reset(self) -> None:
        self.per_depth = None

    @torch.inference_mode()
    def draft(self, context: DraftContext) -> DraftTree:
        depth_limit = min(self.shape.depth, context.max_depth)
        if depth_limit == 0 or self.per_depth is None:  # a one-token prompt's first step: no extras ran yet
            return DraftTree.root_only(context.sequence[-1])
        return fill_by_level(self.shape, context.sequence[-1], depth_limit, self._level_logits, self.heads, context)

    def _level_logits(self, depth: int, level: list[int], tree: GrowingTree) -> torch.Tensor:
        return self.per_depth[depth - 1].expand(len(level), -1)  # [len(level), V] every node of a depth: extra `depth`

    def verify_extras(self, tree: DraftTree) -> VerifyExtras:
        return self.extras(len(tree.tokens), chained_parents(len(tree.tokens), self.prompts))

    def extras(self, nodes: int, parents: tuple[int, ...]) -> VerifyExtras:
        """The [nodes·m] extras, m chained under each of `nodes` tree nodes (node-major), with these parents."""
        raise NotImplementedError

    def prefilled_extras(self, outputs: ExtraOutputs) -> None:
        self.per_depth = outputs.logits  # [m, V] the extras after the prompt's last token: the first tree's depths

    def observe(self, outcome: StepOutcome) -> None:
        last = outcome.verdict.path[-1]  # its logits gave the bonus, the next root: its extras draft after it
        self.per_depth = outcome.extras.logits[last * self.prompts:(last + 1) * self.prompts]  # [m, V]


def chained_parents(nodes: int, m: int) -> tuple[int, ...]:
    """Parents of m extras chained under each of `nodes` tree nodes: extra k of node i under extra k-1 (k=0: node i)."""
    return tuple(node if k == 0 else nodes + node * m + k - 1 for node in range(nodes) for k in range(m))


class PpdDrafter(PositionsAheadDrafter):
    """Drafts from the prompt tokens' logits under the last accepted node; asks for them under every node."""

    def __init__(self, heads: LoadedHeads, shape: TreeShape, prompts: int) -> None:
        super().__init__(heads, shape, prompts)
        self.embeddings = heads.module.embeddings[:prompts].detach()  # [m, d] in the target's dtype

    def extras(self, nodes: int, parents: tuple[int, ...]) -> VerifyExtras:
        return VerifyExtras(self.embeddings.repeat(nodes, 1), parents)  # [(n+1)·m, d], m chained per node


def rank_acceptance(heads: LoadedHeads) -> tuple[tuple[float, ...], ...]:
    """The heads card's per-depth, per-rank agreement on held-out text; the prior where the card has none."""
    card = read_card(heads.folder) or {}
    rows = card.get("agreement", {}).get("by_rank")
    if not rows:
        return tuple(PRIOR_RANKS for _ in range(heads.spec.n_heads))
    return tuple(tuple(min(float(p), 0.99) for p in row) for row in rows)


@METHODS.register(
    "ppd",
    PpdKnobs,
    needs_drafter=False,
    needs_heads="ppd",
    summary="parallel prompt decoding: m trained prompt tokens make the target itself predict m tokens ahead in the "
    "forward that verifies the previous draft; a sparse tree from measured per-rank acceptance (hardware-aware with a profile)",
    paper="Chen et al. 2024, parallel prompt decoding (PPD; claims up to 2.49x, MobileLlama to Vicuna-13B, with "
    "0.0002% trainable parameters and up to 28% higher acceptance for long-range predictions than heads). Measured "
    "here (docs/benchmarks.md, 1 CPU thread, greedy): tau 1.55-1.76 on tiny and SmolLM2, the second prompt's token "
    "seldom accepted (0.01-0.11); at best 0.91x (tiny) and 0.97x (SmolLM2) of AR in bf16 at budget 6, about half "
    "in fp32",
    cost="0 drafter passes; tree size + 1 tokens verified, plus m prompt tokens under each of them (never kept)",
    rule="greedy match; recursive rejection over siblings drawn without replacement from prompt k's distribution",
    columns={"node_budget": ("budget",), "draft_len": ("prompts",)},
)
def build_ppd(knobs: PpdKnobs, models: Models) -> PpdDrafter:
    heads = load_heads(knobs.heads, "ppd", models.target.model)
    trained = heads.spec.n_heads
    prompts = knobs.prompts or trained
    if prompts > trained:
        raise ValueError(f"ppd: prompts={prompts} but the heads at {heads.folder} hold {trained} prompt tokens")
    tree = knobs.tree(rank_acceptance(heads), prompts)
    shape = paths_shape([list(p) for p in tree.paths]) if tree.paths else chain_shape(1)
    return PpdDrafter(heads, shape, prompts)
