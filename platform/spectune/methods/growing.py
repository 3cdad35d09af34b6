"""A draft tree under construction, and the q matrix the engine's rejection rule reads from it.

Every drafter that grows its tree node by node (static templates filled by a model or by heads,
dytree's and EAGLE's best-first growth, PEARL's chain) builds it here: nodes are appended
parents first, and when sampling each opened node records the distribution q its children were
drawn from. `draft_tree` hands the result over as plain data. A static template's nodes remember
the template node they fill (`template_children` lists what each template node asks for).
"""

from __future__ import annotations

import torch

from spectune.trees.draft import DraftTree
from spectune.trees.shapes import TreeShape


class GrowingTree:
    """Nodes in insertion order (parents before children); node 0 is the root."""

    def __init__(self, root: int) -> None:
        self.tokens, self.parents, self.depths = [root], [-1], [0]
        self.template = [0]  # the template node each node fills (static templates; -1 where there is none)
        self.first_child: dict[int, int] = {}  # node -> its first-drawn child
        self.q_rows: dict[int, torch.Tensor] = {}  # node -> [V] q its children were drawn from (sampling only)

    def add(self, token: int, parent: int, template: int = -1) -> int:
        index = len(self.tokens)
        self.tokens.append(token)
        self.parents.append(parent)
        self.depths.append(self.depths[parent] + 1)
        self.template.append(template)
        self.first_child.setdefault(parent, index)
        return index

    @property
    def size(self) -> int:
        """Draft nodes, root excluded."""
        return len(self.tokens) - 1

    def path_tokens(self, node: int) -> list[int]:
        """Tokens from the root down to `node`, both included."""
        path = []
        while node >= 0:
            path.append(self.tokens[node])
            node = self.parents[node]
        return path[::-1]

    def first_child_chain(self) -> list[int]:
        """The nodes reached from the root by first-drawn children: the likeliest path to be accepted."""
        chain, node = [], 0
        while (child := self.first_child.get(node)) is not None:
            chain.append(child)
            node = child
        return chain

    def draft_tree(self, draft_calls: int) -> DraftTree:
        """The tree as plain data; q only when some node recorded one (sampling)."""
        q = self.q_matrix() if self.q_rows else None
        return DraftTree(tuple(self.tokens), tuple(self.parents), q, draft_calls)

    def q_matrix(self) -> torch.Tensor:
        vocab = next(iter(self.q_rows.values())).shape[-1]
        q = torch.zeros(len(self.tokens), vocab)  # [n+1, V]; rows of unopened nodes and leaves stay zero (never used)
        for node, row in self.q_rows.items():
            q[node] = row
        return q


def template_children(shape: TreeShape) -> tuple[tuple[int, ...], ...]:
    """Template children of each template node, in rank order."""
    kids: list[list[int]] = [[] for _ in shape.parents]
    for i, p in enumerate(shape.parents[1:], start=1):
        kids[p].append(i)
    return tuple(tuple(sorted(k, key=lambda c: shape.ranks[c])) for k in kids)
