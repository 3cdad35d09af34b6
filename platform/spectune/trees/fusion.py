"""RASD's tree fusion and pruning: a drafter's scored tree and retrieved continuations become one tree.

Pure functions over plain data (no model):

    fuse(drafted, retrieved)  insert every retrieved continuation into the drafter's tree by longest
                              prefix match: where a continuation follows a drafter branch it shares
                              its nodes, and only the part after the first mismatch adds nodes
    prune(tree, budget)       keep the `budget` nodes of highest score, best first from the root, so
                              the kept nodes always form a tree (a node is kept only with its parent)
    extend_leaves(drafted, retrieved, room)
                              the sampling form of fusion: a continuation follows the drafter's sampled
                              branches and adds nodes only as a one-child chain below a leaf, so every
                              node's children are either the drafter's draws or one retrieved token

A node's score is the larger of its two estimates that it is accepted: the drafter's path
probability (the product of draft probabilities from the root, as EAGLE-2 and DySpec rank
nodes) and its retrieval weight, the summed weights of the continuations passing through it
(the method weighs a continuation by its share of the retrieval counts times the drafter's
probability of its first token: RASD's pruning of the retrieval tree by the draft model's
distribution). Both estimates shrink from a node to its children, so pruning keeps the
highest-scoring nodes of the whole fused tree.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

from spectune.trees.draft import DraftTree, validate_parents


@dataclass(frozen=True)
class Retrieved:
    """One retrieved continuation of the committed sequence (the root excluded) and its weight."""

    tokens: tuple[int, ...]
    weight: float  # share of the retrieval counts x the drafter's probability of tokens[0]


@dataclass(frozen=True)
class ScoredTree:
    """A candidate tree: tokens and parents as a DraftTree's, a score and a source per node."""

    tokens: tuple[int, ...]  # [n+1] node 0 = root
    parents: tuple[int, ...]  # [n+1] parents[0] = -1, parents[i] < i
    draft_scores: tuple[float, ...]  # [n+1] drafter path probability (0 where the drafter never proposed it)
    retrieval_scores: tuple[float, ...]  # [n+1] summed weights of the continuations through the node

    def __post_init__(self) -> None:
        validate_parents(self.parents)
        lengths = {len(self.tokens), len(self.draft_scores), len(self.retrieval_scores)}
        if lengths != {len(self.parents)}:
            raise ValueError(f"a scored tree needs one token and two scores per node, got lengths {sorted(lengths)}")

    @classmethod
    def drafted(cls, tokens: Sequence[int], parents: Sequence[int], probabilities: Sequence[float]) -> ScoredTree:
        """A drafter's tree: each node's path probability (the root's is 1)."""
        return cls(tuple(tokens), tuple(parents), tuple(float(p) for p in probabilities), (0.0,) * len(tokens))

    @property
    def size(self) -> int:
        """Draft nodes, root excluded."""
        return len(self.tokens) - 1

    def score(self, node: int) -> float:
        return max(self.draft_scores[node], self.retrieval_scores[node])

    def from_retrieval(self) -> tuple[bool, ...]:
        """Per node: only retrieval proposed it (the drafter did not)."""
        return tuple(d == 0.0 and r > 0.0 for d, r in zip(self.draft_scores, self.retrieval_scores))

    def draft_tree(self, draft_calls: int = 0) -> DraftTree:
        """The tree the loop verifies. Deterministic (q = None): retrieved tokens were not drawn from any
        distribution, so every node is a one-hot proposal and sampling verifies by sample-and-match."""
        return DraftTree(self.tokens, self.parents, None, draft_calls)


def fuse(drafted: ScoredTree, retrieved: Sequence[Retrieved]) -> ScoredTree:
    """Merge the continuations into the drafter's tree by longest prefix match (siblings stay distinct).

    Node order: the drafter's nodes keep their indices; retrieval adds nodes after them, each after
    its parent. Weights must be >= 0.
    """
    tokens, parents = list(drafted.tokens), list(drafted.parents)
    draft_scores, retrieval_scores = list(drafted.draft_scores), list(drafted.retrieval_scores)
    child_of: dict[tuple[int, int], int] = {}  # (parent node, token) -> node; the first of equal siblings
    for node in range(len(tokens) - 1, 0, -1):
        child_of[parents[node], tokens[node]] = node
    for continuation in retrieved:
        if continuation.weight < 0:
            raise ValueError(f"a retrieved continuation's weight must be >= 0, got {continuation.weight}")
        node = 0
        for token in continuation.tokens:
            child = child_of.get((node, token))
            if child is None:
                child = child_of[node, token] = len(tokens)
                tokens.append(token)
                parents.append(node)
                draft_scores.append(0.0)
                retrieval_scores.append(0.0)
            retrieval_scores[child] += continuation.weight
            node = child
    return ScoredTree(tuple(tokens), tuple(parents), tuple(draft_scores), tuple(retrieval_scores))


def prune(tree: ScoredTree, budget: int) -> ScoredTree:
    """The `budget` best nodes (root excluded), grown best first from the root: a node becomes a
    candidate once its parent is kept. Ties: the shallower node, then the lower index (drafter first).
    Kept nodes are renumbered in the order they were kept, so parents still come first."""
    if budget < 0:
        raise ValueError(f"a node budget must be >= 0, got {budget}")
    children: list[list[int]] = [[] for _ in tree.tokens]
    depths = [0] * len(tree.tokens)
    for node in range(1, len(tree.tokens)):
        children[tree.parents[node]].append(node)
        depths[node] = depths[tree.parents[node]] + 1
    kept, new_index = [0], {0: 0}
    frontier = [(-tree.score(c), depths[c], c) for c in children[0]]
    heapq.heapify(frontier)
    while frontier and len(kept) <= budget:
        _, _, node = heapq.heappop(frontier)
        new_index[node] = len(kept)
        kept.append(node)
        for child in children[node]:
            heapq.heappush(frontier, (-tree.score(child), depths[child], child))
    return ScoredTree(
        tuple(tree.tokens[n] for n in kept),
        tuple(new_index[tree.parents[n]] if n else -1 for n in kept),
        tuple(tree.draft_scores[n] for n in kept),
        tuple(tree.retrieval_scores[n] for n in kept),
    )


def extend_leaves(drafted: ScoredTree, retrieved: Sequence[Retrieved], room: int) -> ScoredTree:
    """Fuse for a tree whose drafter nodes were sampled (verified against the drafter's q): each continuation,
    in the order given, follows matching nodes; where it first differs, its rest hangs below that node as a
    chain only if the node has no child yet (a drafter leaf, or the end of a chain), else it is dropped;
    at most `room` nodes are added in all. A drafter node never gains a sibling of its draws, so the
    rejection rule sees, under every node, either the draws from its q or one deterministic token (a
    one-hot proposal); which nodes get a chain depends on their path, never on draws below them.
    """
    tokens, parents = list(drafted.tokens), list(drafted.parents)
    draft_scores, retrieval_scores = list(drafted.draft_scores), list(drafted.retrieval_scores)
    children: list[list[int]] = [[] for _ in tokens]
    for node in range(1, len(tokens)):
        children[parents[node]].append(node)
    for continuation in retrieved:
        node, rest = 0, list(continuation.tokens)
        while rest and (child := next((c for c in children[node] if tokens[c] == rest[0]), None)) is not None:
            retrieval_scores[child] += continuation.weight
            node, rest = child, rest[1:]
        if children[node]:
            continue  # it leaves the tree beside a drafted child: no room for a sibling of the draws
        for token in rest[: room - (len(tokens) - len(drafted.tokens))]:
            tokens.append(token)
            parents.append(node)
            draft_scores.append(0.0)
            retrieval_scores.append(continuation.weight)
            children.append([])
            children[node].append(len(tokens) - 1)
            node = len(tokens) - 1
    return ScoredTree(tuple(tokens), tuple(parents), tuple(draft_scores), tuple(retrieval_scores))
