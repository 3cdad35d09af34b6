"""Model-free drafting from a lookup structure: fill a static tree template breadth first.

Token Recycling (adjacency matrix) and the online n-gram table share this: each template
node asks "what are the ranked candidate tokens after this path?" and takes the one at its
rank. A node whose rank has no candidate is dropped together with its subtree, so a sparse
table gives a small tree. Candidates are distinct tokens, so siblings are distinct, which
sample-and-match verification of deterministic drafts needs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from pydantic import Field, model_validator

from spectune.engine.shapes import TreeShape, branching_shape, paths_shape
from spectune.engine.tree import DraftTree
from spectune.methods.base import Knobs

# candidates(path) -> ranked distinct tokens that may follow `path` (root first, root included)
Candidates = Callable[[tuple[int, ...]], Sequence[int]]


#: Guessed chance that the r-th ranked candidate is the right next token: the built-in template
#: spends its nodes where these products are highest (see ranked_paths).
RANK_WEIGHTS = (0.6, 0.25, 0.12, 0.07, 0.05, 0.035, 0.025, 0.02)
DEFAULT_TREE_SIZE = 32
MAX_TEMPLATE_DEPTH = 8


class TemplateKnobs(Knobs):
    """The tree template of a retrieval method: a ranked template of a given size, per-depth
    branching, or a Medusa-style path list (at most one; none = the ranked template of 32 nodes)."""

    tree_size: int | None = Field(
        None, ge=1, le=1024, description="nodes of the built-in ranked template (wide at the root, deep along rank 0)"
    )
    branching: list[int] | None = Field(None, description="per-depth branching instead, e.g. [4, 2, 2, 1]")
    paths: list[list[int]] | None = Field(None, description="Medusa-style path list instead, e.g. [[0], [0, 0], [1]]")

    @model_validator(mode="after")
    def one_template(self) -> "TemplateKnobs":
        given = [k for k in ("tree_size", "branching", "paths") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of tree_size, branching, paths (got {', '.join(given)})")
        self.shape()  # surface a malformed template at validation time
        return self

    def shape(self, max_rank: int = len(RANK_WEIGHTS)) -> TreeShape:
        """The template; `max_rank` caps the ranks the ranked template may use (k candidates -> ranks < k)."""
        if self.branching is not None:
            return branching_shape(self.branching)
        if self.paths is not None:
            return paths_shape(self.paths)
        size = self.tree_size or DEFAULT_TREE_SIZE
        return paths_shape(ranked_paths(size, MAX_TEMPLATE_DEPTH, RANK_WEIGHTS[:max_rank]))

    def template_field(self) -> str:
        """The knob that set the template, for error messages."""
        return next((k for k in ("branching", "paths") if getattr(self, k) is not None), "tree_size")


def template_depths(shape: TreeShape) -> tuple[int, ...]:
    depths = [0] * len(shape.parents)
    for i, parent in enumerate(shape.parents[1:], start=1):
        depths[i] = depths[parent] + 1
    return tuple(depths)


def check_template_fits(shape: TreeShape, max_positions: int, field: str) -> None:
    """A template the target could never verify is a knob error, reported at build time."""
    if shape.size + 1 >= max_positions:
        raise ValueError(
            f"{field}: the template has {shape.size} nodes; it must have at most {max_positions - 2} "
            f"to fit the target's context of {max_positions} positions"
        )


def fill_template(shape: TreeShape, root: int, candidates: Candidates, max_depth: int) -> DraftTree:
    """Breadth-first fill: template node i takes candidates(path to its parent)[rank i], if present.

    Nodes deeper than `max_depth`, and nodes whose parent was dropped, are dropped.
    """
    depths = template_depths(shape)
    tokens, parents = [root], [-1]
    placed = {0: 0}  # template node -> tree node
    paths: dict[int, tuple[int, ...]] = {0: (root,)}
    ranked: dict[int, Sequence[int]] = {}  # template node -> its candidate list (asked once)
    for node in range(1, len(shape.parents)):
        parent = shape.parents[node]
        if parent not in placed or depths[node] > max_depth:
            continue
        if parent not in ranked:
            ranked[parent] = candidates(paths[parent])
        options, rank = ranked[parent], shape.ranks[node]
        if rank >= len(options):
            continue
        token = int(options[rank])
        placed[node] = len(tokens)
        tokens.append(token)
        parents.append(placed[parent])
        paths[node] = paths[parent] + (token,)
    return DraftTree(tuple(tokens), tuple(parents))


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
