"""Filling a static tree template from a lookup structure (model-free drafting), and the template knobs
every static-template method takes (tree, ngram, recycling, medusa, hydra).

Token Recycling (adjacency matrix) and the online n-gram table share this: each template
node asks "what are the ranked candidate tokens after this path?" and takes the one at its
rank. A node whose rank has no candidate is dropped together with its subtree, so a sparse
table gives a small tree. Candidates are distinct tokens, so siblings are distinct, which
sample-and-match verification of deterministic drafts needs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

from pydantic import Field, model_validator

from spectune.trees.shapes import TreeShape, branching_shape, paths_shape, ranked_paths
from spectune.trees.draft import DraftTree
from spectune.trees.files import load_paths
from spectune.methods.base import Knobs

# candidates(path) -> ranked distinct tokens that may follow `path` (root first, root included)
Candidates = Callable[[tuple[int, ...]], Sequence[int]]


#: Guessed chance that the r-th ranked candidate is the right next token: the built-in template
#: spends its nodes where these products are highest (see ranked_paths).
RANK_WEIGHTS = (0.6, 0.25, 0.12, 0.07, 0.05, 0.035, 0.025, 0.02)
DEFAULT_TREE_SIZE = 32
MAX_TEMPLATE_DEPTH = 8


class TemplateKnobs(Knobs):
    """The static tree template of a method: a ranked template of a given size, per-depth branching, a
    Medusa-style path list, or a path-list file (at most one; none = the method's default template:
    the ranked template of `default_tree_size` nodes unless the method says otherwise)."""

    default_tree_size: ClassVar[int] = DEFAULT_TREE_SIZE
    default_branching: ClassVar[tuple[int, ...] | None] = None  # a method whose default is per-depth branching

    tree_size: int | None = Field(
        None, ge=1, le=1024, description="nodes of the built-in ranked template (wide at the root, deep along rank 0)"
    )
    branching: list[int] | None = Field(None, description="per-depth branching instead, e.g. [4, 2, 2, 1]")
    paths: list[list[int]] | None = Field(None, description="Medusa-style path list instead, e.g. [[0], [0, 0], [1]]")
    paths_file: str | None = Field(None, description="JSON file holding a path list (spectune trees optimize)")

    @model_validator(mode="after")
    def one_template(self) -> "TemplateKnobs":
        self.at_most_one_of(*SHAPE_KNOBS)
        self.shape()  # surface a malformed template (or an unreadable file) at validation time
        return self

    def shape(self, max_rank: int = len(RANK_WEIGHTS)) -> TreeShape:
        """The template; `max_rank` caps the ranks the ranked template may use (k candidates -> ranks < k)."""
        return self.given_shape() or self.default_shape(max_rank)

    def given_shape(self) -> TreeShape | None:
        """The template an explicit shape knob gives (branching, paths, paths_file); None when none is given."""
        if self.branching is not None:
            return branching_shape(self.branching)
        if self.paths is not None:
            return paths_shape(self.paths)
        if self.paths_file is not None:
            return paths_shape(load_paths(self.paths_file))
        return None

    def default_shape(self, max_rank: int) -> TreeShape:
        """With no explicit shape: the ranked template of `tree_size` nodes, or the method's default."""
        if self.tree_size is None and self.default_branching is not None:
            return branching_shape(self.default_branching)
        size = self.tree_size or self.default_tree_size
        return paths_shape(ranked_paths(size, MAX_TEMPLATE_DEPTH, RANK_WEIGHTS[:max_rank]))

    def template_field(self) -> str:
        """The knob that set the template, for error messages."""
        return next((k for k in SHAPE_KNOBS[1:] if getattr(self, k) is not None), "tree_size")

    def template_knob(self) -> str:
        """The knob that set the template with its value, for messages: `branching=[4, 2]`, `tree_size=64`;
        with none given, the method's default (`tree_size=32`)."""
        given = next((k for k in SHAPE_KNOBS if getattr(self, k) is not None), None)
        if given is not None:
            return f"{given}={getattr(self, given)}"
        if self.default_branching is not None:
            return f"branching={list(self.default_branching)}"
        return f"tree_size={self.default_tree_size}"

    def tree_knobs(self) -> str:
        return self.template_knob()


SHAPE_KNOBS = ("tree_size", "branching", "paths", "paths_file")
#: the store's tree_shape column for every template method: the explicit shape knob given
TEMPLATE_COLUMNS = {"tree_shape": ("branching", "paths", "paths_file")}


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
