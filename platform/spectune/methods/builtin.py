"""The engine's first methods: ar (the baseline), sps, tree, stree (the tree on hybrid targets), pld."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field, model_validator

from spectune.engine.drafter import DraftContext, Drafter, StepOutcome
from spectune.engine.ssm_tree import branch_by_branch
from spectune.trees.shapes import chain_shape
from spectune.trees.draft import DraftTree
from spectune.methods.base import Knobs, Models
from spectune.methods.model_drafter import TemplateDrafter
from spectune.methods.registry import METHODS
from spectune.methods.template_fill import TEMPLATE_COLUMNS, TemplateKnobs


# --- ar ---------------------------------------------------------------------------------------


class ArKnobs(Knobs):
    pass


class Autoregressive(Drafter):
    """No draft: one target forward per token. The baseline every ratio is measured against."""

    max_tree_size = 0

    def draft(self, context: DraftContext) -> DraftTree:
        return DraftTree.root_only(context.sequence[-1])


@METHODS.register(
    "ar",
    ArKnobs,
    needs_drafter=False,
    hybrid=True,
    summary="plain autoregressive decoding, the baseline",
    paper="-",
    cost="0 drafter passes; 1 token verified",
    rule="is the reference",
)
def build_ar(knobs: ArKnobs, models: Models) -> Autoregressive:
    return Autoregressive()


# --- sps --------------------------------------------------------------------------------------


class SpsKnobs(Knobs):
    draft_len: int = Field(4, ge=1, le=64, description="tokens drafted per step (initial length when adaptive)")
    schedule: Literal["fixed", "heuristic"] = Field(
        "fixed", description="heuristic: +2 after a fully accepted draft, -1 otherwise (HF's schedule)"
    )
    max_draft_len: int = Field(16, ge=1, le=64, description="cap for the heuristic schedule")

    def tree_knobs(self) -> str:
        capped = f", max_draft_len={self.max_draft_len}" if self.schedule == "heuristic" else ""
        return f"draft_len={self.draft_len}{capped}"


class ChainDrafter(TemplateDrafter):
    """SpS: a chain drafted by the small model; its length may follow the heuristic schedule."""

    def __init__(self, models: Models, knobs: SpsKnobs) -> None:
        super().__init__(models.drafter, chain_shape(knobs.draft_len))
        self.knobs = knobs
        self.max_tree_size = max(knobs.draft_len, knobs.max_draft_len if knobs.schedule == "heuristic" else 0)

    def reset(self) -> None:
        super().reset()
        self.use_shape(chain_shape(self.knobs.draft_len))

    def observe(self, outcome: StepOutcome) -> None:
        if self.knobs.schedule == "fixed" or outcome.tree.size == 0:
            return
        full = outcome.verdict.accepted == outcome.tree.size
        length = min(self.shape.size + 2, self.knobs.max_draft_len) if full else max(1, self.shape.size - 1)
        self.use_shape(chain_shape(length))


@METHODS.register(
    "sps",
    SpsKnobs,
    needs_drafter=True,
    hybrid=True,
    summary="a chain of k tokens from the drafter model; fixed k or the +2/-1 heuristic",
    paper="Leviathan et al. 2023; Chen et al. 2023",
    cost="k drafter passes (first one over the uncached suffix); k+1 tokens verified",
    rule="greedy match; rejection sampling min(1, p/q), residual norm(max(p-q, 0))",
    columns={"draft_len": ("draft_len",)},
)
def build_sps(knobs: SpsKnobs, models: Models) -> ChainDrafter:
    return ChainDrafter(models, knobs)


# --- tree -------------------------------------------------------------------------------------


class TreeKnobs(TemplateKnobs):
    """The template knobs; none given: per-depth branching [3, 2, 1]."""

    default_branching = (3, 2, 1)


@METHODS.register(
    "tree",
    TreeKnobs,
    needs_drafter=True,
    hybrid=True,
    summary="static tree (per-depth branching, [3, 2, 1] by default; a Medusa path list or a ranked template) "
    "filled by the drafter's top-k",
    paper="SpecInfer (Miao et al. 2024) token trees; Medusa path lists (Cai et al. 2024)",
    cost="depth drafter passes (one per level); tree size + 1 tokens verified",
    rule="greedy match; recursive rejection over siblings drawn without replacement",
    columns=TEMPLATE_COLUMNS,
)
def build_tree(knobs: TreeKnobs, models: Models) -> TemplateDrafter:
    return TemplateDrafter(models.drafter, knobs.shape())


# --- stree ------------------------------------------------------------------------------------


class StreeKnobs(TreeKnobs):
    """The tree method's templates, and how a hybrid target verifies them."""

    verify: Literal["tree", "branches"] = Field(
        "tree",
        description="tree: STree, one forward, every SSM node state from its parent's; branches: the naive "
        "baseline, one chain forward per root-to-leaf branch (all-attention targets: one tree forward either way)",
    )


class StreeDrafter(TemplateDrafter):
    """The static tree drafter; with verify=branches it has the target verify its trees branch by branch."""

    def __init__(self, models: Models, knobs: StreeKnobs) -> None:
        super().__init__(models.drafter, knobs.shape())
        self.knobs = knobs

    def verifying(self, tree: DraftTree) -> contextlib.AbstractContextManager[None]:
        return branch_by_branch() if self.knobs.verify == "branches" else contextlib.nullcontext()


@METHODS.register(
    "stree",
    StreeKnobs,
    needs_drafter=True,
    hybrid=True,
    summary="the static tree of `tree` on a hybrid SSM-attention target, its SSM layers verifying every node in one "
    "forward from the accumulated state transitions; verify=branches: the naive branch-by-branch baseline",
    paper="STree (Wu et al. 2025), tree speculative decoding for state-space models and hybrids",
    cost="depth drafter passes; tree size + 1 tokens verified in one target forward (branches: one forward per "
    "leaf, shared prefixes recomputed)",
    rule="greedy match; recursive rejection over siblings drawn without replacement",
    columns=TEMPLATE_COLUMNS,
)
def build_stree(knobs: StreeKnobs, models: Models) -> StreeDrafter:
    return StreeDrafter(models, knobs)


# --- pld --------------------------------------------------------------------------------------


class PldKnobs(Knobs):
    max_ngram: int = Field(3, ge=1, le=16, description="longest suffix n-gram to look up")
    min_ngram: int = Field(1, ge=1, le=16, description="shortest suffix n-gram to try")
    draft_len: int = Field(10, ge=1, le=64, description="tokens copied after the match")
    matches: int = Field(
        1,
        ge=1,
        le=32,
        description="earlier matches whose continuations are merged into a tree (1 = the classic chain)",
    )

    def tree_knobs(self) -> str:
        return f"draft_len={self.draft_len}, matches={self.matches}"

    @model_validator(mode="after")
    def ordered(self) -> "PldKnobs":
        if self.min_ngram > self.max_ngram:
            raise ValueError(f"min_ngram ({self.min_ngram}) must be <= max_ngram ({self.max_ngram})")
        return self


class PromptLookup(Drafter):
    """Copy what followed earlier occurrences of the current suffix n-gram (no model).

    With one match this is prompt lookup decoding's chain; with more, the continuations of the
    most recent matches are merged into a trie (a shared prefix is verified once), so a suffix
    that was followed by different text at different places offers every version at once.
    """

    def __init__(self, knobs: PldKnobs) -> None:
        self.knobs = knobs
        self.max_tree_size = knobs.draft_len * knobs.matches

    def draft(self, context: DraftContext) -> DraftTree:
        limit = min(self.knobs.draft_len, context.max_depth)
        knobs = self.knobs
        found = lookup(context.sequence, knobs.min_ngram, knobs.max_ngram, limit, knobs.matches) if limit else []
        return continuation_trie(context.sequence[-1], found)


def lookup(sequence: Sequence[int], min_ngram: int, max_ngram: int, length: int, matches: int = 1) -> list[list[int]]:
    """Up to `matches` continuations (<= `length` tokens) of earlier matches of the current suffix.

    Longest matching n-gram first, most recent match first within one n; each earlier
    position is used once even when it matches at several n.
    """
    seq = torch.tensor(sequence)  # [L]
    found: list[list[int]] = []
    used: set[int] = set()  # start of each copied continuation
    for n in range(min(max_ngram, len(sequence) - 1), min_ngram - 1, -1):
        windows = seq[:-1].unfold(0, n, 1)  # [L-n, n] every n-gram that has a next token
        hits = (windows == seq[-n:]).all(dim=1).nonzero().flatten()  # [h] starts of earlier matches
        for start in (int(h) + n for h in reversed(hits)):
            if start not in used:
                used.add(start)
                found.append(seq[start : start + length].tolist())
            if len(found) == matches:
                return found
    return found


def continuation_trie(root: int, continuations: Sequence[Sequence[int]]) -> DraftTree:
    """Merge token chains hanging off `root` into a tree; earlier chains get the lower-ranked children."""
    tokens, parents = [root], [-1]
    child_of: dict[tuple[int, int], int] = {}  # (parent node, token) -> node
    for chain in continuations:
        node = 0
        for token in chain:
            if (node, token) not in child_of:
                child_of[node, token] = len(tokens)
                tokens.append(token)
                parents.append(node)
            node = child_of[node, token]
    return DraftTree(tuple(tokens), tuple(parents))


@METHODS.register(
    "pld",
    PldKnobs,
    needs_drafter=False,
    hybrid=True,
    summary="copy what followed the last earlier match of the suffix n-gram (no model); matches > 1: a trie of several",
    paper="Saxena 2023, prompt lookup decoding",
    cost="0 drafter passes; draft_len + 1 tokens verified (a trie: at most matches x draft_len + 1)",
    rule="greedy match; sample-and-match (one-hot proposal)",
    columns={"draft_len": ("draft_len",)},
)
def build_pld(knobs: PldKnobs, models: Models) -> PromptLookup:
    return PromptLookup(knobs)
