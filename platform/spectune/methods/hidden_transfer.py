"""`hidden-transfer`: the target drafts m tokens ahead from pseudo hidden states made at a middle layer.

Wu et al. 2024 (Parallel Decoding via Hidden Transfer) train transfer layers that map the context's hidden
states at an intermediate layer l of the target to *pseudo* hidden states of the next m positions; those
go through the target's remaining layers l+1..L in the same forward, giving predictions for m future
tokens, and the candidates are verified with tree attention. Only the transfer maps are trained
(`spectune heads train --kind transfer`: the frozen target, the gradient through its layers l+1..L).

Here (the route PPD takes, `methods.ppd`), each step:

- m pseudo positions ride in the verification forward as the engine's extra positions under *every* tree
  node (any node may be the last accepted one), chained as in the paper: pseudo k under a node sits at its
  position + k and sees the context, the node's path and pseudo 1..k-1 of its own group. After block l their
  states are replaced by map k of the node's own block-l output (`engine.layer_transfer`, in the same
  forward: no second pass), so blocks l+1..L, the final norm and the LM head read them out. They are never
  accepted nor kept in the cache (the target's cache ends each step exactly as AR leaves it), and the
  tree's logits are those without them;
- the pseudo positions under the last accepted node (at the first step: after the prompt, in its prefill)
  give the next step's candidates: depth k's top ranks from pseudo k (greedy), or drawn without
  replacement from its distribution (sampling; recorded as q, so the engine's recursive rejection keeps
  it lossless);
- the tree is a static sparse tree: the `budget` best rank paths under the per-position, per-rank
  acceptance the heads' card measured on held-out text (`trees.sparse`).

Where this differs from the paper: the paper feeds pseudo states only at layer l onward and drafts from
the last accepted token's group alone; here the extras also run blocks 1..l (on blank inputs, their
outputs there discarded: HF's forward has no entry at a middle layer) and every node carries its m
pseudo positions, since which node will be accepted is known only after the forward (one forward per
step, at most m·(n+1) extra positions). The maps are one residual linear layer each (h + W_k h + b_k,
zero at init); the paper's transfer layers are linear too.
"""

from __future__ import annotations

from pydantic import Field

from spectune.heads.load import LoadedHeads, load_heads
from spectune.heads.transfer import check_layer, grouped_transfer
from spectune.methods.base import Knobs, Models
from spectune.methods.ppd import PositionsAheadDrafter, rank_acceptance
from spectune.methods.registry import METHODS
from spectune.trees.draft import VerifyExtras
from spectune.trees.shapes import TreeShape, chain_shape, paths_shape
from spectune.trees.sparse import sparse_tree


class HiddenTransferKnobs(Knobs):
    heads: str | None = Field(None, description="transfer heads folder (default: <pair>/heads/transfer beside the "
                                                "pair's target/)")
    positions: int | None = Field(None, ge=1, le=16, description="pseudo positions per node (the deepest draft); "
                                                                 "default: all the heads were trained with")
    budget: int = Field(16, ge=1, le=512, description="draft nodes per step (root excluded); the tree uses at most this")

    def tree_knobs(self) -> str:
        return f"budget={self.budget}" + (f", positions={self.positions}" if self.positions is not None else "")


class HiddenTransferDrafter(PositionsAheadDrafter):
    """Asks for m pseudo positions under every node, their block-l states transferred from the node's."""

    def __init__(self, heads: LoadedHeads, shape: TreeShape, positions: int) -> None:
        super().__init__(heads, shape, positions)
        self.layer = heads.spec.feature_layers[0]
        self.blank = heads.embeddings.weight.new_zeros(1, heads.spec.target.hidden_size)  # [1, d] blocks 1..l's input

    def extras(self, nodes: int, parents: tuple[int, ...]) -> VerifyExtras:
        m = self.prompts
        anchors = tuple(node for node in range(nodes) for _ in range(m))  # pseudo k of node i reads node i's state
        transfer = grouped_transfer(self.heads.module, self.layer, anchors, m)
        return VerifyExtras(self.blank.expand(nodes * m, -1), parents, transfer)  # [(n+1)·m, d]


@METHODS.register(
    "hidden-transfer",
    HiddenTransferKnobs,
    needs_drafter=False,
    needs_heads="transfer",
    summary="Hidden Transfer: trained maps turn the target's layer-l state at a node into pseudo states of the next m "
    "positions, which its layers l+1..L read out in the forward that verifies the previous draft; a sparse tree from "
    "measured per-rank acceptance",
    paper="Wu et al. 2024, Parallel Decoding via Hidden Transfer for lossless LLM acceleration (claims a higher "
    "acceleration ratio and more accurate future-token predictions than the single-model methods it is compared with, "
    "Medusa and self-speculative decoding among them, on LLaMA-2 and Vicuna targets). Measured here on the micro "
    "pair (l = 2 of 4, 3 maps, 100 steps: 4 s on one CPU core; 24 shipped prompts, 64 tokens, spectune bench, "
    "greedy): tau 2.14 at budget 16 (ppd 2.02, medusa 2.15), acceptance by depth 0.69, 0.47; 1.68 at budget 4; "
    "0.55-0.84x of AR on a CPU, where the m pseudo positions under every node cost more than they save. On tiny "
    "and SmolLM2 (docs/benchmarks.md, 1 thread): tau 2.28-2.30 and 1.91-1.92 at budget 16, 1.03-1.04x of AR in bf16 "
    "at budget 4, 0.61-0.65x in fp32",
    cost="0 drafter passes; tree size + 1 tokens verified, plus m pseudo positions under each of them (never kept)",
    rule="greedy match; recursive rejection over siblings drawn without replacement from pseudo position k's distribution",
    columns={"node_budget": ("budget",), "draft_len": ("positions",)},
)
def build_hidden_transfer(knobs: HiddenTransferKnobs, models: Models) -> HiddenTransferDrafter:
    heads = load_heads(knobs.heads, "transfer", models.target.model)
    check_layer(heads.spec.feature_layers[0], models.target.n_layers, heads.folder)
    trained = heads.spec.n_heads
    positions = knobs.positions or trained
    if positions > trained:
        raise ValueError(f"hidden-transfer: positions={positions} but the heads at {heads.folder} hold {trained} "
                         "transfer maps")
    tree = sparse_tree(rank_acceptance(heads)[:positions], knobs.budget, positions)
    shape = paths_shape([list(p) for p in tree.paths]) if tree.paths else chain_shape(1)
    return HiddenTransferDrafter(heads, shape, positions)
