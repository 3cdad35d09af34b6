"""`recycling`: Token Recycling (Luo et al. 2024): draft from the candidates the target already produced.

Every verification forward yields target logits at every tree node; decoding keeps only the
argmax and throws the rest away. Token Recycling keeps, for every token t, the top-k tokens
the target last predicted after t (an adjacency matrix [V, k]) and drafts by filling a
static tree template breadth first from the last committed token: child r of a node holding
token t is adjacency[t][r]. No drafter model, no training; the matrix is tiny.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from pydantic import Field, model_validator

from spectune.engine.drafter import DraftContext, Drafter, StepOutcome
from spectune.trees.shapes import TreeShape
from spectune.trees.draft import DraftTree
from spectune.methods.base import Models
from spectune.methods.registry import METHODS
from spectune.methods.template_fill import TEMPLATE_COLUMNS, TemplateKnobs, fill_template

UNSEEN = -1  # an adjacency row for a token the target has not been seen predicting after


class AdjacencyMatrix:
    """For each token, the top-k next tokens of the latest target logits computed after it."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.rows: np.ndarray | None = None  # [V, k] int64, UNSEEN until a row is written; sized on first update

    def update(self, tokens: Sequence[int], logits: torch.Tensor) -> None:
        """Row tokens[i] <- top-k of logits[i]; logits: [n, V]. Later entries win for repeated tokens."""
        if self.rows is None:
            self.rows = np.full((logits.shape[-1], self.k), UNSEEN, dtype=np.int64)
        top = logits.topk(self.k, dim=-1).indices.numpy()  # [n, k] distinct within each row
        self.rows[np.asarray(tokens, dtype=np.int64)] = top

    def candidates(self, token: int) -> list[int]:
        """Ranked next-token candidates after `token` (empty for a token never seen)."""
        if self.rows is None or self.rows[token, 0] == UNSEEN:
            return []
        return self.rows[token].tolist()

    def known(self) -> int:
        return 0 if self.rows is None else int((self.rows[:, 0] != UNSEEN).sum())


def recycle_order(outcome: StepOutcome) -> list[int]:
    """Node indices in update order: off-path nodes first, the accepted path last, so that when a
    token appears twice in the tree the row written last comes from the context that was kept."""
    on_path = set(outcome.verdict.path)
    return [i for i in range(len(outcome.tree.tokens)) if i not in on_path] + list(outcome.verdict.path)


class RecyclingKnobs(TemplateKnobs):
    k: int = Field(8, ge=1, le=64, description="candidate next tokens stored per token (adjacency width)")
    hot_start: bool = Field(
        False,
        description="keep the matrix across prompts (the paper inherits it; off: each prompt starts empty, "
        "so a benchmark that replays its prompts cannot learn them)",
    )

    @model_validator(mode="after")
    def ranks_within_k(self) -> "RecyclingKnobs":
        deepest_rank = max(self.shape(self.k).ranks)
        if deepest_rank >= self.k:
            raise ValueError(
                f"{self.template_field()}: the template asks for candidate rank {deepest_rank} but k={self.k} "
                f"stores ranks 0..{self.k - 1}; raise k to at least {deepest_rank + 1}"
            )
        return self


class TokenRecycling(Drafter):
    """The drafter: BFS over the template on the adjacency matrix; learns from every verification."""

    def __init__(self, knobs: RecyclingKnobs, shape: TreeShape) -> None:
        self.knobs = knobs
        self.shape = shape
        self.max_tree_size = shape.size
        self.matrix = AdjacencyMatrix(knobs.k)

    def reset(self) -> None:
        if not self.knobs.hot_start:
            self.matrix = AdjacencyMatrix(self.knobs.k)

    def draft(self, context: DraftContext) -> DraftTree:
        # deterministic draft (q = None): sample-and-match at temperature > 0; top-k rows keep siblings distinct
        return fill_template(self.shape, context.sequence[-1], self._after_last, context.max_depth)

    def _after_last(self, path: tuple[int, ...]) -> list[int]:
        return self.matrix.candidates(path[-1])

    def observe(self, outcome: StepOutcome) -> None:
        order = recycle_order(outcome)
        self.matrix.update([outcome.tree.tokens[i] for i in order], outcome.target_logits[order])


@METHODS.register(
    "recycling",
    RecyclingKnobs,
    needs_drafter=False,
    hybrid=True,
    summary="Token Recycling: a [V, k] matrix of the target's top-k next tokens per token, "
    "read by BFS over a static tree template",
    paper="Luo et al. 2024, Turning Trash into Treasure (Token Recycling)",
    cost="0 drafter passes (table lookups); up to template size + 1 tokens verified",
    rule="greedy match; sample-and-match (deterministic draft, distinct siblings)",
    columns=TEMPLATE_COLUMNS,
)
def build_recycling(knobs: RecyclingKnobs, models: Models) -> TokenRecycling:
    vocab = int(models.target.model.config.vocab_size)
    if knobs.k > vocab:
        raise ValueError(f"k: {knobs.k} candidates per token exceeds the vocabulary; allowed range 1..{vocab}")
    return TokenRecycling(knobs, knobs.shape(knobs.k))
