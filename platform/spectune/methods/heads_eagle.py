"""eagle and eagle3: one trained decoder layer drafting in the target's feature space, grown as EAGLE-2's
dynamic tree (expand where the draft is most confident, under a node budget).

The layer keeps a KV cache of its own over committed positions: entry j pairs the target's feature at
token j with token j+1 (EAGLE) or the fusion of a low, a middle and a high layer there (EAGLE-3), at
position j. The target's features come from the loop (`hidden_layers()`): the prompt's from the
prefill, then each verification's at the accepted path. Each step first feeds the entries the last
verification made known (ending with the one pairing the root's parent with the root, whose output
predicts depth 1), then grows the tree: a new node's entry pairs its parent's predicted feature with
its own token, attends the committed entries and its ancestors, and its output gives its children.
The draft entries are dropped before the next step, whose first pass re-feeds the accepted ones
with the target's true features.

Growth reuses dytree's expansion (best-first by path probability, a pass per round, lossless
sampling: Gumbel-top-k siblings, slot priorities that never look at the drawn token).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from pydantic import Field

from spectune.engine.drafter import DraftContext, Drafter, StepOutcome
from spectune.engine.kvcache import KVCache
from spectune.heads.load import LoadedHeads, load_heads
from spectune.methods.base import HEADS_ON_A_HYBRID, Models
from spectune.methods.draft_cache import DraftCache
from spectune.methods.dytree import DyTreeKnobs, Expansion, grow
from spectune.methods.growing import GrowingTree
from spectune.methods.registry import METHODS
from spectune.trees.draft import DraftTree, additive_mask


class EagleKnobs(DyTreeKnobs):
    """EAGLE-2's tree: node budget, depth, top-k children per node (dytree's growth), and the heads folder."""

    heads: str | None = Field(None, description="heads folder (default: <pair>/heads/<method> beside the pair's target/)")


@dataclass(frozen=True)
class Grown:
    """One step's drafted tree, with what retrieval fusion reads of it (`rasd-eagle3`)."""

    expansion: Expansion  # the growth: its tree and every node's path probability
    tree: DraftTree
    root_logits: torch.Tensor  # [V] the heads' logits after the root


class EagleDrafter(Drafter):
    def __init__(self, heads: LoadedHeads, knobs: EagleKnobs) -> None:
        self.heads = heads
        self.net = heads.module  # EagleDraft
        self.knobs = knobs
        self.max_tree_size = knobs.budget
        self.layers = tuple(heads.spec.feature_layers)
        self.reset()

    def reset(self) -> None:
        self.cache = KVCache(self.net.config)
        self.committed = 0  # entries of committed positions in the cache (those after it are draft nodes)
        self.pending: list[torch.Tensor] = []  # target features of positions committed.. not yet fed, [m, d_in]

    def hidden_layers(self) -> tuple[int, ...]:
        return self.layers

    def prefilled(self, hidden: Mapping[int, torch.Tensor]) -> None:
        self.pending.append(self._features(hidden, slice(None)))

    def observe(self, outcome: StepOutcome) -> None:
        self.pending.append(self._features(outcome.hidden, list(outcome.verdict.path)))

    def _features(self, hidden: Mapping[int, torch.Tensor], rows) -> torch.Tensor:
        return torch.cat([hidden[layer][rows] for layer in self.layers], dim=-1)  # [m, d] or [m, 3d] fused

    def draft_modules(self) -> tuple[torch.nn.Module, ...]:
        return self.heads.modules()

    def draft(self, context: DraftContext) -> DraftTree:
        grown = self.expand(context)
        return DraftTree.root_only(context.sequence[-1]) if grown is None else grown.tree

    @torch.inference_mode()
    def expand(self, context: DraftContext) -> Grown | None:
        """This step's dynamic tree, or None where there is nothing to draft from (no feature yet, no room)."""
        sequence = context.sequence
        depth_limit = min(self.knobs.max_depth, context.max_depth)
        root_state = self._feed(sequence)  # (LM-head input, next hidden) of the entry ending at the root, or None
        if root_state is None or depth_limit == 0:
            return None
        states = {0: root_state[1]}  # node -> its predicted feature (what its children's entries read)
        expansion = Expansion(sequence[-1], self.knobs, depth_limit, context.sampling, context.rng)
        step = DraftCache(self.cache)  # draft nodes follow the committed entries; the next `_feed` drops them
        root_logits = self._logits(root_state[0])  # [V]
        tree = grow(expansion, root_logits, lambda new: self._grow(expansion.tree, states, step, new))
        return Grown(expansion, tree, root_logits)

    def _feed(self, sequence: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Feed the entries of positions the target has verified since the last step; the root's entry's outputs."""
        self.cache.truncate(self.committed)  # last step's draft nodes go: their features were the draft's own
        if not self.pending:
            return None
        features = torch.cat(self.pending)  # [m, d_in] positions committed .. committed+m-1
        self.pending = []
        start, end = self.committed, self.committed + features.shape[0]
        if end != len(sequence) - 1:
            raise RuntimeError(f"eagle: features of {end} positions for a sequence of {len(sequence)} tokens")
        tokens = list(sequence[start + 1 : end + 1])  # entry j pairs feature j with token j+1
        hidden = self.net.combine(features)[None]  # [1, m, d]
        positions = torch.arange(start, end, device=hidden.device)[None]  # [1, m]
        causal = torch.ones(len(tokens), len(tokens), dtype=torch.bool).tril()
        logit_in, next_hidden = self._run(hidden, tokens, positions, additive_mask(causal, start, hidden.dtype))
        self.committed = end
        return logit_in[0, -1], next_hidden[0, -1]

    def _grow(self, tree: GrowingTree, states: dict[int, torch.Tensor], step: DraftCache, new: list[int]
              ) -> torch.Tensor:
        """One pass over a round's new nodes: their entries attend the committed ones and their ancestors."""
        mask = step.mask(tree, new, self.net.fc.weight.dtype)  # [1, 1, m, committed + fed + m]
        hidden = torch.stack([states[tree.parents[n]] for n in new])[None]  # [1, m, d] parents' predicted features
        positions = step.positions(tree, new).to(hidden.device)  # [1, m]
        logit_in, next_hidden = self._run(hidden, [tree.tokens[n] for n in new], positions, mask)
        step.fed_now(new)
        for i, node in enumerate(new):
            states[node] = next_hidden[0, i]
        return self._logits(logit_in[0])  # [m, V]

    def _run(self, hidden: torch.Tensor, tokens: list[int], positions: torch.Tensor, mask: torch.Tensor):
        ids = torch.tensor([tokens], device=hidden.device)  # [1, m]
        embeds = self.heads.embeddings(ids)  # [1, m, d]
        out = self.net(hidden, embeds, positions, mask.to(hidden.device), self.cache.hf)
        self.cache.appended(tokens)
        return out

    def _logits(self, logit_in: torch.Tensor) -> torch.Tensor:
        """[..., d] -> [..., V] over the target's vocabulary (-inf outside a reduced draft vocabulary), as dytree reads."""
        return self.heads.vocab.expand(self.heads.readout(logit_in).float())


def _build(kind: str, knobs: EagleKnobs, models: Models) -> EagleDrafter:
    return EagleDrafter(load_heads(knobs.heads, kind, models.target.model), knobs.sized())


@METHODS.register(
    "eagle",
    EagleKnobs,
    needs_drafter=False,
    hybrid=HEADS_ON_A_HYBRID,
    needs_heads="eagle",
    summary="EAGLE / EAGLE-2: one trained decoder layer drafting in the target's feature space (its final-norm "
    "output), a dynamic tree grown by draft confidence under a node budget",
    paper="Li et al. 2024, EAGLE (feature-level drafting) and EAGLE-2 (dynamic draft trees)",
    cost="one pass of the draft layer (+ LM head rows) per round, at most max_depth; budget + 1 tokens verified",
    rule="greedy: top-k siblings, match; sampling: Gumbel-top-k siblings, recursive rejection",
    columns={"node_budget": ("budget",)},
)
def build_eagle(knobs: EagleKnobs, models: Models) -> EagleDrafter:
    return _build("eagle", knobs, models)


@METHODS.register(
    "eagle3",
    EagleKnobs,
    needs_drafter=False,
    hybrid=HEADS_ON_A_HYBRID,
    needs_heads="eagle3",
    summary="EAGLE-3: the draft layer reads a fusion of a low, a middle and a high target layer and predicts tokens "
    "(trained on its own outputs), with its own LM head over the draft vocabulary; EAGLE-2's dynamic tree",
    paper="Li et al. 2025, EAGLE-3 (training-time test, multi-layer feature fusion)",
    cost="one pass of the draft layer (+ its LM head) per round, at most max_depth; budget + 1 tokens verified",
    rule="greedy: top-k siblings, match; sampling: Gumbel-top-k siblings, recursive rejection",
    columns={"node_budget": ("budget",)},
)
def build_eagle3(knobs: EagleKnobs, models: Models) -> EagleDrafter:
    return _build("eagle3", knobs, models)
