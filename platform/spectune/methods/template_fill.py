"""Filling a static tree template from a lookup structure (model-free drafting), and the template knobs.

Token Recycling (adjacency matrix) and the online n-gram table share this: each template
node asks "what are the ranked candidate tokens after this path?" and takes the one at its
rank. A node whose rank has no candidate is dropped together with its subtree, so a sparse
table gives a small tree. Candidates are distinct tokens, so siblings are distinct, which
sample-and-match verification of deterministic drafts needs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from pydantic import Field, model_validator

from spectune.trees.shapes import TreeShape, branching_shape, paths_shape, ranked_paths
from spectune.trees.draft import DraftTree
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
        self.at_most_one_of("tree_size", "branching", "paths")
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

    def template_knob(self) -> str:
        """That knob with its value, for messages: `branching=[4, 2]`, `tree_size=64` (default: 32)."""
        field = self.template_field()
        value = getattr(self, field)
        return f"{field}={value if value is not None else DEFAULT_TREE_SIZE}"


def fill_template(shape: TreeShape, root: int, candidates: Candidates, max_depth: int) -> DraftTree:
    """Breadth-first fill: template node i takes candidates(path to its parent)[rank i], if present.

    Nodes deeper than `max_depth`, and nodes whose parent was dropped, are dropped.
    """
    depths = shape.depths
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
