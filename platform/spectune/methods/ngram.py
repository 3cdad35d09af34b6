"""`ngram`: an online n-gram table built from the prompt and the target's own outputs (ADED / STAND style).

For every context of 1..n-1 tokens seen so far the table counts which token came next. A
draft fills a static tree template breadth first: the children of a node are the most
frequent continuations of the last n-1 tokens on its path (backing off to shorter contexts
when the long one was never seen). No drafter model; the table grows as decoding proceeds.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from pydantic import Field

from spectune.engine.drafter import DraftContext, Drafter
from spectune.trees.shapes import TreeShape
from spectune.trees.draft import DraftTree
from spectune.methods.base import Models
from spectune.methods.registry import METHODS
from spectune.methods.template_fill import TEMPLATE_COLUMNS, TemplateKnobs, fill_template


class NgramTable:
    """context (tuple of 1..n-1 tokens) -> {next token: [count, last seen]}; least recently updated evicted."""

    def __init__(self, n: int, max_entries: int) -> None:
        self.n = n
        self.max_entries = max_entries
        self._next: OrderedDict[tuple[int, ...], dict[int, list[int]]] = OrderedDict()
        self._clock = 0  # counts additions: recency breaks ties between equal counts

    def __len__(self) -> int:
        return len(self._next)

    def add(self, sequence: Sequence[int], start: int) -> None:
        """Count every (context -> next) pair whose next token sits at a position >= start."""
        for position in range(max(start, 1), len(sequence)):
            token = sequence[position]
            for length in range(1, min(self.n - 1, position) + 1):
                self._count(tuple(sequence[position - length : position]), token)

    def _count(self, context: tuple[int, ...], token: int) -> None:
        self._clock += 1
        followers = self._next.get(context)
        if followers is None:
            followers = self._next[context] = {}
            if len(self._next) > self.max_entries:
                self._next.popitem(last=False)
        else:
            self._next.move_to_end(context)
        entry = followers.setdefault(token, [0, 0])
        entry[0] += 1
        entry[1] = self._clock

    def continuations(self, history: Sequence[int]) -> list[int]:
        """Next tokens after the longest seen suffix of `history` (up to n-1 tokens), most frequent first."""
        for length in range(min(self.n - 1, len(history)), 0, -1):
            followers = self._next.get(tuple(history[-length:]))
            if followers:
                return sorted(followers, key=lambda t: (-followers[t][0], -followers[t][1]))
        return []


class NgramKnobs(TemplateKnobs):
    n: int = Field(3, ge=2, le=8, description="n-gram order: continuations keyed on the last n-1 tokens (3 = tri-gram)")
    max_entries: int = Field(
        200_000, ge=1, le=10_000_000, description="table size cap in contexts (least recently updated evicted first)"
    )
    keep_table: bool = Field(
        False,
        description="keep the table across prompts (off: each prompt starts from its own text, so a benchmark "
        "that replays its prompts cannot memorise the outputs)",
    )


class NgramDrafter(Drafter):
    def __init__(self, knobs: NgramKnobs, shape: TreeShape) -> None:
        self.knobs = knobs
        self.shape = shape
        self.max_tree_size = shape.size
        self.table = NgramTable(knobs.n, knobs.max_entries)
        self._indexed = 0  # tokens of the current sequence already counted
        self._sequence: tuple[int, ...] = ()

    def reset(self) -> None:
        if not self.knobs.keep_table:
            self.table = NgramTable(self.knobs.n, self.knobs.max_entries)
        self._indexed = 0

    def draft(self, context: DraftContext) -> DraftTree:
        self._index(context.sequence)  # the prompt on the first step, nothing new afterwards
        self._sequence = context.sequence
        # deterministic draft (q = None): sample-and-match at temperature > 0; dict keys keep siblings distinct
        return fill_template(self.shape, context.sequence[-1], self._after_path, context.max_depth)

    def _after_path(self, path: tuple[int, ...]) -> list[int]:
        history = self._sequence[-(self.knobs.n - 1) :] + path[1:]  # path[0] is the root = sequence[-1]
        return self.table.continuations(history)

    def commit(self, sequence: Sequence[int]) -> None:
        self._index(sequence)

    def _index(self, sequence: Sequence[int]) -> None:
        self.table.add(sequence, self._indexed)
        self._indexed = len(sequence)


@METHODS.register(
    "ngram",
    NgramKnobs,
    needs_drafter=False,
    hybrid=True,
    summary="online n-gram table over the prompt and the target's outputs; a tree of the most frequent "
    "continuations, backing off to shorter contexts",
    paper="ADED (Liu et al. 2024, adaptive n-gram drafting); STAND (Song et al. 2025)",
    cost="0 drafter passes (table lookups); up to template size + 1 tokens verified",
    rule="greedy match; sample-and-match (deterministic draft, distinct siblings)",
    columns=TEMPLATE_COLUMNS,
)
def build_ngram(knobs: NgramKnobs, models: Models) -> NgramDrafter:
    return NgramDrafter(knobs, knobs.shape())
