"""Static tree templates: which child ranks to draft under which node, built by pure functions.

A template says "under the root, draft the 4 best tokens; under the best of those, 2 more; ...".
The drafter fills it with real tokens each step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class TreeShape:
    """Template nodes in breadth-first order; node 0 is the root."""

    parents: tuple[int, ...]  # parents[0] = -1
    ranks: tuple[int, ...]  # rank of each node among its siblings (0 = drafter's best); ranks[0] = 0

    @property
    def size(self) -> int:
        """Draft nodes, root excluded."""
        return len(self.parents) - 1

    @property
    def depths(self) -> tuple[int, ...]:
        """Depth of every template node (root 0)."""
        depths = [0] * len(self.parents)
        for i, p in enumerate(self.parents[1:], start=1):
            depths[i] = depths[p] + 1
        return tuple(depths)

    @property
    def depth(self) -> int:
        return max(self.depths)

    def n_children(self) -> tuple[int, ...]:
        counts = [0] * len(self.parents)
        for p in self.parents[1:]:
            counts[p] += 1
        return tuple(counts)

    def as_paths(self) -> list[list[int]]:
        """The Medusa-style path list this template is built from (rank sequences, root excluded)."""
        paths: list[list[int]] = [[]]
        for i in range(1, len(self.parents)):
            paths.append(paths[self.parents[i]] + [self.ranks[i]])
        return paths[1:]


def chain_shape(length: int) -> TreeShape:
    if length < 0:
        raise ValueError(f"chain length must be >= 0, got {length}")
    return TreeShape(tuple(range(-1, length)), (0,) * (length + 1))


def branching_shape(branching: Sequence[int]) -> TreeShape:
    """Per-depth branching: [4, 2, 2, 1] gives every depth-d node branching[d] children."""
    if not branching:
        raise ValueError("branching must list at least one depth, e.g. [4, 2, 2, 1]")
    if any(not isinstance(b, int) or b < 1 for b in branching):
        raise ValueError(f"branching entries must be integers >= 1, got {list(branching)}")
    paths: list[list[int]] = []
    frontier: list[list[int]] = [[]]
    for width in branching:
        frontier = [prefix + [r] for prefix in frontier for r in range(width)]
        paths.extend(frontier)
    return paths_shape(paths)


def paths_shape(paths: Sequence[Sequence[int]]) -> TreeShape:
    """Medusa's form: [[0], [0, 0], [1], [0, 1], ...], each path a sequence of child ranks from the root.

    Every prefix of a path must be listed too, and the ranks under one node must be 0..k-1.
    """
    unique = {tuple(_check_path(p, i)) for i, p in enumerate(paths)}
    if not unique:
        raise ValueError("a tree needs at least one path, e.g. [[0], [0, 0], [1]]")
    for path in unique:
        if len(path) > 1 and path[:-1] not in unique:
            raise ValueError(f"path {list(path)} is listed but its prefix {list(path[:-1])} is not")
        if path[-1] > 0 and path[:-1] + (path[-1] - 1,) not in unique:
            raise ValueError(f"path {list(path)} skips rank {path[-1] - 1} under the same parent")
    ordered = sorted(unique, key=lambda p: (len(p), p))  # breadth first, best ranks first
    index = {(): 0}
    parents, ranks = [-1], [0]
    for path in ordered:
        index[path] = len(parents)
        parents.append(index[path[:-1]])
        ranks.append(path[-1])
    return TreeShape(tuple(parents), tuple(ranks))


def _check_path(path: Sequence[int], position: int) -> list[int]:
    if isinstance(path, (str, bytes)) or not isinstance(path, Sequence) or not path:
        raise ValueError(f"path #{position} must be a non-empty list of ranks, got {path!r}")
    if any(not isinstance(r, int) or isinstance(r, bool) or r < 0 for r in path):
        raise ValueError(f"path #{position} must hold integer ranks >= 0, got {list(path)}")
    return list(path)


def ranked_paths(size: int, max_depth: int, rank_weights: Sequence[float]) -> list[list[int]]:
    """The `size` rank paths with the highest product of per-rank weights (ties: shorter, then smaller ranks).

    With weights read as "chance the r-th candidate is the right one", this is the static tree
    that maximises expected accepted tokens (Sequoia's objective, under independence); it is
    wide near the root and deep along the best ranks, like the hand-built template of the
    Token Recycling paper. Weights must be < 1 and non-increasing so the set is prefix-closed.
    """
    if any(not 0 < w < 1 for w in rank_weights) or list(rank_weights) != sorted(rank_weights, reverse=True):
        raise ValueError(f"rank weights must be in (0, 1) and non-increasing, got {list(rank_weights)}")
    frontier: list[tuple[float, list[int]]] = [(w, [r]) for r, w in enumerate(rank_weights)]
    chosen: list[list[int]] = []
    while frontier and len(chosen) < size:
        frontier.sort(key=lambda item: (-item[0], len(item[1]), item[1]))
        score, path = frontier.pop(0)
        chosen.append(path)
        if len(path) < max_depth:
            frontier += [(score * w, path + [r]) for r, w in enumerate(rank_weights)]
    return chosen
