"""DySpec's dynamic tree: grow the draft where the drafter is most confident, under a node budget.

Every not-yet-drafted child slot waits in a max-heap keyed by its estimated path probability
(product of draft probabilities along the path). Expansion runs in rounds: pop the best
slots and add their tokens, then ONE drafter forward over the new nodes (tree mask) opens
their own child slots. A round keeps popping while the next slot beats what a child of this
round's new nodes is expected to score (their value times the typical best-child estimate
seen so far), up to `per_pass` nodes: a confident drafter grows a chain one pass per level,
a hesitant one adds many siblings per pass. Passes are capped at the depth limit, like a
static tree's: the last round fills what is left of the budget from the open slots.

Siblings come in draw order: slot j of a node becomes poppable only after slot j-1 was
added. Greedy fills slots with the drafter's top-k; sampling with one Gumbel-top-k draw per
node (without replacement), q recorded per parent for recursive rejection.

Lossless sampling needs one care: whether slot j is drafted must not depend on the token
drawn into it (keeping a draw only when it came out likely biases the proposal, and the
rejection rule no longer corrects it). So when sampling, a slot's priority uses the
*expected* draft probability of its draw given the earlier siblings, sum_x q_j(x) q(x);
the token's own q(x) enters only the priorities of its descendants.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from pydantic import Field, model_validator

from spectune.engine.drafter import DraftContext
from spectune.engine.runner import CausalLM
from spectune.engine.sampling import Sampling, probabilities, sample_without_replacement
from spectune.trees.draft import DraftTree
from spectune.trees.files import load_profile
from spectune.trees.sequoia import PRIOR_ACCEPTANCE, check_acceptance, hardware_aware_tree
from spectune.methods.base import Knobs, Models
from spectune.methods.draft_cache import ModelDrafter
from spectune.methods.growing import GrowingTree
from spectune.methods.registry import METHODS


class DyTreeKnobs(Knobs):
    budget: int = Field(16, ge=1, le=512, description="draft nodes per step (root excluded); with profile_file, the cap")
    max_depth: int = Field(6, ge=1, le=64, description="deepest draft position; with profile_file, the cap")
    topk: int = Field(4, ge=1, le=64, description="most children drafted under one node")
    per_pass: int = Field(8, ge=1, le=512, description="most nodes added per drafter forward (one round)")
    profile_file: str | None = Field(
        None, description="JSON from `spectune trees profile` (this worker's t(n)): budget and depth become the "
                          "size and depth fastest per token on it (Sequoia's model), at most budget and max_depth")
    acceptance: list[float] | None = Field(
        None, description="with profile_file: p[k] per child rank (`spectune trees measure`; default: Sequoia's prior)")

    @model_validator(mode="after")
    def profile_readable(self) -> DyTreeKnobs:
        if self.acceptance is not None:
            check_acceptance(self.acceptance)
        if self.acceptance is not None and self.profile_file is None:
            raise ValueError("acceptance sizes the tree from a profile: give profile_file with it")
        self.sized()  # an unreadable profile, or one too short for the cap, fails here, not mid-sweep
        return self

    def sized(self) -> DyTreeKnobs:
        """These knobs with budget and max_depth taken from the profile's t(n) when one is given: the
        hardware's answer to how wide a tree pays (wide in bf16 on CPUs with cheap wide forwards)."""
        if self.profile_file is None:
            return self
        tree = hardware_aware_tree(tuple(self.acceptance or PRIOR_ACCEPTANCE), self.budget, self.max_depth,
                                   load_profile(self.profile_file))
        return self.model_copy(update={"budget": tree.size, "max_depth": tree.depth, "profile_file": None,
                                       "acceptance": None})

    def tree_knobs(self) -> str:
        sized = self.sized()
        chosen = f" (sized from {self.profile_file})" if self.profile_file else ""
        return f"budget={sized.budget}{chosen}"


@dataclass(frozen=True)
class Candidates:
    """A node's ordered child draws and what the heap needs to rank them."""

    tokens: tuple[int, ...]  # draw order (greedy: rank order)
    priorities: tuple[float, ...]  # estimated acceptance of each slot, known before its token is drawn
    token_probs: tuple[float, ...]  # draft probability of each drawn token (for its descendants' priorities)


def greedy_candidates(logits: torch.Tensor, topk: int) -> Candidates:
    """The drafter's top-k; a slot's priority is its token's probability (no sampling, no bias to avoid)."""
    probs = torch.softmax(logits.float(), dim=-1)  # [V]
    top = probs.topk(min(topk, probs.shape[-1]))
    values = tuple(top.values.tolist())
    return Candidates(tuple(top.indices.tolist()), values, values)


def sampled_candidates(q: torch.Tensor, topk: int, rng: torch.Generator) -> Candidates:
    """Gumbel-top-k draws from q; slot j's priority is the expected q of a draw after removing slots < j."""
    tokens = sample_without_replacement(q, topk, rng)
    token_probs = tuple(float(q[t]) for t in tokens)
    return Candidates(tuple(tokens), expected_draw_probs(q, token_probs), token_probs)


def expected_draw_probs(q: torch.Tensor, drawn_probs: Sequence[float]) -> tuple[float, ...]:
    """E[q(x_j) | x_<j] for draws without replacement: (sum q^2 - sum_{i<j} q_i^2) / (1 - sum_{i<j} q_i).

    Depends only on the earlier draws, never on x_j itself.
    """
    square_mass = float((q * q).sum())
    removed, removed_squares, out = 0.0, 0.0, []
    for prob in drawn_probs:
        remaining = 1.0 - removed
        out.append(max(square_mass - removed_squares, 0.0) / remaining if remaining > 1e-12 else 0.0)
        removed += prob
        removed_squares += prob * prob
    return tuple(out)


@dataclass(order=True, frozen=True)
class _Slot:
    neg_priority: float
    order: int  # ties: first pushed first (deterministic)
    parent: int
    index: int  # position among the parent's candidates


class Expansion:
    """One step's growth, without any model: the tree, the heap of open slots, the q rows.

    `grow` drives it; the drafter supplies logits for each round's new nodes.
    """

    def __init__(self, root: int, knobs: DyTreeKnobs, depth_limit: int, sampling: Sampling, rng: torch.Generator) -> None:
        self.knobs = knobs
        self.depth_limit = depth_limit
        self.sampling = sampling
        self.rng = rng
        self.tree = GrowingTree(root)
        self.values = [1.0]  # per node: its estimated path probability (product of draft probabilities)
        self.candidates: dict[int, Candidates] = {}
        self.heap: list[_Slot] = []
        self._order = itertools.count()
        self._best_child_estimates: list[float] = []  # first-slot estimate of every opened node

    def open(self, node: int, logits: torch.Tensor) -> None:
        """Draw `node`'s children (all of them, in order) and make the first slot poppable."""
        if self.sampling.greedy:
            found = greedy_candidates(logits, self.knobs.topk)
        else:
            q = probabilities(logits, self.sampling)  # [V]
            self.tree.q_rows[node] = q
            found = sampled_candidates(q, self.knobs.topk, self.rng)
        self.candidates[node] = found
        if found.priorities:
            self._best_child_estimates.append(found.priorities[0])
        self._push(node, 0)

    def _push(self, parent: int, index: int) -> None:
        found = self.candidates[parent]
        if index < len(found.tokens):
            priority = self.values[parent] * found.priorities[index]
            heapq.heappush(self.heap, _Slot(-priority, next(self._order), parent, index))

    @property
    def full(self) -> bool:
        return self.tree.size >= self.knobs.budget

    def pop_round(self, last: bool = False) -> list[int]:
        """Add the best slots until a new node's child would likely rank first; return the expandable new nodes.

        The last round (no drafter pass follows) fills the budget from whatever slots are open.
        """
        expandable: list[int] = []
        added = 0
        estimates = self._best_child_estimates
        child_guess = sum(estimates) / len(estimates) if estimates else 1.0
        awaited = 0.0  # the priority a child of this round's new nodes is expected to have
        while self.heap and (last or added < self.knobs.per_pass) and not self.full:
            if added and not last and -self.heap[0].neg_priority < awaited:
                break  # best-first would likely take a child we cannot see yet: run the drafter first
            slot = heapq.heappop(self.heap)
            found = self.candidates[slot.parent]
            value = self.values[slot.parent] * found.token_probs[slot.index]
            node = self.tree.add(found.tokens[slot.index], slot.parent)
            self.values.append(value)
            added += 1
            self._push(slot.parent, slot.index + 1)  # the next sibling in draw order
            if self.tree.depths[node] < self.depth_limit:
                expandable.append(node)
                awaited = max(awaited, value * child_guess)
        return expandable

    def draft_tree(self, draft_calls: int) -> DraftTree:
        return self.tree.draft_tree(draft_calls)


def grow(expansion: Expansion, root_logits: torch.Tensor, forward: Callable[[list[int]], torch.Tensor]) -> DraftTree:
    """Expand in rounds until the budget is spent; `forward(nodes)` gives their drafter logits [m, V].

    At most `depth_limit` drafter passes (the root's included), as many as a static tree that deep.
    """
    expansion.open(0, root_logits)
    calls = 1
    while expansion.heap and not expansion.full:
        last = calls >= expansion.depth_limit
        new = expansion.pop_round(last)
        if last:
            break
        if new and not expansion.full:  # a full tree has no room for their children: skip the pass
            for node, logits in zip(new, forward(new)):
                expansion.open(node, logits)
            calls += 1
    return expansion.draft_tree(calls)


class DyTreeDrafter(ModelDrafter):
    """Rebuilds the tree from the drafter's confidence each step: nothing to learn across steps."""

    def __init__(self, lm: CausalLM, knobs: DyTreeKnobs) -> None:
        super().__init__(lm)
        self.knobs = knobs
        self.max_tree_size = knobs.budget

    def draft(self, context: DraftContext) -> DraftTree:
        depth_limit = min(self.knobs.max_depth, context.max_depth)
        if depth_limit == 0:
            return DraftTree.root_only(context.sequence[-1])
        root_logits = self.start(context.sequence)  # [V] after the root
        expansion = Expansion(context.sequence[-1], self.knobs, depth_limit, context.sampling, context.rng)
        tree = grow(expansion, root_logits, lambda new: self.feed(expansion.tree, new))
        self.finish(expansion.tree)
        return tree


@METHODS.register(
    "dytree",
    DyTreeKnobs,
    needs_drafter=True,
    hybrid=True,
    summary="dynamic tree: expand the slot with the highest path probability (heap) until the node budget is spent",
    paper="Xiong et al. 2024, DySpec (dynamic token trees)",
    cost="one drafter pass per round, at most max_depth (like a static tree that deep); budget + 1 tokens verified",
    rule="greedy: top-k siblings, match; sampling: Gumbel-top-k siblings, recursive rejection",
    columns={"node_budget": ("budget",)},
)
def build_dytree(knobs: DyTreeKnobs, models: Models) -> DyTreeDrafter:
    return DyTreeDrafter(models.drafter, knobs.sized())
