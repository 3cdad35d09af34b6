"""Draft trees as plain data, and the pure functions that turn them into model inputs.

Node 0 is the root: the last committed token, not yet in the target's cache. A chain
(SpS, prompt lookup) is a tree whose parents are -1, 0, 1, 2, ...
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch


@dataclass(frozen=True)
class DraftTree:
    """What a drafter proposes: tokens, their parents, and (when sampling) the draft distributions."""

    tokens: tuple[int, ...]  # [n+1] node 0 = root
    parents: tuple[int, ...]  # [n+1] parents[0] = -1, parents[i] < i
    q: torch.Tensor | None = None  # [n+1, V] distribution each node's children were drawn from; None = deterministic
    draft_calls: int = 0  # drafter forward passes spent building it
    with_replacement: bool = False  # siblings are i.i.d. draws from q (SpecInfer), not draws without replacement

    @property
    def size(self) -> int:
        """Draft nodes, root excluded."""
        return len(self.tokens) - 1

    @classmethod
    def root_only(cls, root: int) -> DraftTree:
        """The empty draft: the target just decodes one token after the root."""
        return cls(tokens=(root,), parents=(-1,))


@dataclass(frozen=True)
class LayerTransfer:
    """Extras that enter the target at a middle layer (Hidden Transfer's pseudo states) rather than as inputs:
    after decoder block `layer`, the extras' outputs are replaced by `transfer` of their anchors' outputs
    there, so blocks layer+1..L run on the pseudo states (blocks 1..layer ran on the extras' input embeddings
    and are discarded for them)."""

    layer: int  # l in 1..L-1: the block after which the extras' states are replaced
    anchors: tuple[int, ...]  # [m] per extra, the tree node whose block-l output it is made from
    transfer: Callable[[torch.Tensor], torch.Tensor]  # [B, m, d] those anchors' block-l outputs -> [B, m, d]


@dataclass(frozen=True)
class VerifyExtras:
    """Non-candidate positions a drafter adds to the verification forward (PPD's prompt tokens): each hangs
    under a tree node (or an earlier extra), attends its ancestors like a node would, and its outputs go back
    to the drafter. They are never accepted, and never kept in the cache (they are on no accepted path)."""

    embeddings: torch.Tensor  # [m, d] input embeddings, in the target's dtype
    parents: tuple[int, ...]  # [m] extra j hangs under node parents[j]: a tree node 0..n, or n+1+i for extra i < j
    transfer: LayerTransfer | None = None  # states replaced after a middle block (Hidden Transfer); None: inputs only

    def __post_init__(self) -> None:
        if self.embeddings.dim() != 2 or self.embeddings.shape[0] != len(self.parents) or not self.parents:
            raise ValueError(f"extras need one [d] embedding per parent: {tuple(self.embeddings.shape)} "
                             f"for {len(self.parents)} parents")
        if self.transfer is not None and len(self.transfer.anchors) != len(self.parents):
            raise ValueError(f"a layer transfer needs one anchor per extra: {len(self.transfer.anchors)} "
                             f"for {len(self.parents)} extras")

    def joined(self, tree_parents: tuple[int, ...]) -> tuple[int, ...]:
        """The tree's parents and the extras' as one tree (the extras after the n+1 nodes), checked."""
        parents = tuple(tree_parents) + self.parents
        validate_parents(parents)
        return parents


@dataclass(frozen=True)
class TreeLayout:
    """Structure derived from `parents` alone: depths, ordered children, root-to-leaf paths."""

    depths: tuple[int, ...]
    children: tuple[tuple[int, ...], ...]
    paths: tuple[tuple[int, ...], ...]  # each root-to-leaf path as node indices
    is_chain: bool

    @property
    def depth(self) -> int:
        return max(self.depths)


@dataclass(frozen=True)
class TreeInputs:
    """Arguments of the verification forward call."""

    positions: torch.Tensor  # [1, n+1] past_len + depth
    mask: torch.Tensor | None  # [1, 1, n+1, past_len+n+1] additive; None for a chain (the causal mask is the same)


def validate_parents(parents: tuple[int, ...]) -> None:
    if not parents or parents[0] != -1:
        raise ValueError("a draft tree starts with its root, whose parent is -1")
    for i, p in enumerate(parents[1:], start=1):
        if not 0 <= p < i:
            raise ValueError(f"node {i} has parent {p}; parents must come before their children")


@lru_cache(maxsize=256)
def tree_layout(parents: tuple[int, ...]) -> TreeLayout:
    validate_parents(parents)
    depths = [0] * len(parents)
    children: list[list[int]] = [[] for _ in parents]
    for i, p in enumerate(parents[1:], start=1):
        depths[i] = depths[p] + 1
        children[p].append(i)
    paths = tuple(_path_to(i, parents) for i, kids in enumerate(children) if not kids)
    is_chain = all(p == i - 1 for i, p in enumerate(parents))
    return TreeLayout(tuple(depths), tuple(tuple(c) for c in children), paths, is_chain)


def _path_to(node: int, parents: tuple[int, ...]) -> tuple[int, ...]:
    path = [node]
    while parents[path[-1]] != -1:
        path.append(parents[path[-1]])
    return tuple(reversed(path))


@lru_cache(maxsize=256)
def ancestor_matrix(parents: tuple[int, ...]) -> torch.Tensor:
    """[n+1, n+1] bool: row i is True at i and at every ancestor of i."""
    n = len(parents)
    allowed = torch.eye(n, dtype=torch.bool)
    for i, p in enumerate(parents[1:], start=1):
        allowed[i] |= allowed[p]  # parents come first, so row p is complete
    return allowed


def retrieve_paths(parents: tuple[int, ...]) -> torch.Tensor:
    """[n_leaves, depth+1] node indices of every root-to-leaf path, right-padded with -1 (Medusa's layout)."""
    layout = tree_layout(parents)
    table = torch.full((len(layout.paths), layout.depth + 1), -1, dtype=torch.long)
    for row, path in enumerate(layout.paths):
        table[row, : len(path)] = torch.tensor(path)
    return table


def tree_inputs(parents: tuple[int, ...], past_len: int, dtype: torch.dtype = torch.float32) -> TreeInputs:
    """Positions and attention mask for verifying the tree after `past_len` cached tokens."""
    layout = tree_layout(parents)
    positions = torch.tensor([past_len + d for d in layout.depths]).unsqueeze(0)  # [1, n+1]
    if layout.is_chain:
        return TreeInputs(positions, None)
    return TreeInputs(positions, additive_mask(ancestor_matrix(parents), past_len, dtype))


def additive_mask(allowed: torch.Tensor, past_len: int, dtype: torch.dtype) -> torch.Tensor:
    """[n, m] bool of allowed tree attention -> [1, 1, n, past_len+m] float (0 = attend, min = blocked)."""
    n, m = allowed.shape
    blocked = torch.finfo(dtype).min
    tree_part = torch.zeros(n, m, dtype=dtype).masked_fill(~allowed, blocked)  # [n, m]
    past_part = torch.zeros(n, past_len, dtype=dtype)  # [n, past_len] every node sees the whole past
    return torch.cat([past_part, tree_part], dim=1)[None, None]  # [1, 1, n, past_len+m]
