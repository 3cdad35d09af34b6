"""What a method plugs into the loop: a Drafter, built from validated knobs by a registered factory."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from pydantic import BaseModel, ConfigDict

from spectune.engine.accept import Verdict
from spectune.engine.runner import CausalLM
from spectune.engine.sampling import Sampling
from spectune.trees.draft import DraftTree


@dataclass(frozen=True)
class DraftContext:
    sequence: tuple[int, ...]  # every committed token; the last one is the tree's root
    sampling: Sampling
    rng: torch.Generator
    max_depth: int  # deeper drafts could never be emitted (max_new_tokens is near)


@dataclass(frozen=True)
class StepOutcome:
    tree: DraftTree
    verdict: Verdict
    target_logits: torch.Tensor  # [n+1, V] for drafters that learn from the target (Token Recycling)


class Drafter(Protocol):
    max_tree_size: int  # the most draft nodes one step can propose (for the context check)

    def reset(self) -> None:
        """Forget everything about the previous sequence."""

    def draft(self, context: DraftContext) -> DraftTree:
        """Phase 1: propose a tree rooted at context.sequence[-1]."""

    def commit(self, sequence: Sequence[int]) -> None:
        """Phase 5, drafter side: keep only state consistent with the accepted `sequence`."""

    def observe(self, outcome: StepOutcome) -> None:
        """After each step: adapt (draft length schedules, tables)."""


def draft_modules(drafter: object) -> tuple[torch.nn.Module, ...]:
    """The modules whose forward calls are a drafter's drafting, beside the pair's drafter model.

    A drafter that drafts with something other than the loaded drafter model (an early-exit view
    of the target, say) names it with a `draft_modules() -> Sequence[nn.Module]` method, so that
    timing from outside (`spectune bench`'s forward hooks) can count it as drafting. Only naming:
    the drafter itself times nothing. A named module must not run inside the target's forward,
    nor the target inside it, or the time would count on both sides. Default: none.
    """
    named = getattr(drafter, "draft_modules", None)
    return tuple(named()) if named is not None else ()


class Knobs(BaseModel):
    """Base of every method's knobs: unknown fields are errors, so typos never pass silently."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class Models:
    """What a method may draft with."""

    target: CausalLM
    drafter: CausalLM | None


@dataclass(frozen=True)
class Method:
    name: str
    knobs: type[Knobs]
    build: Callable[[Knobs, Models], Drafter]
    needs_drafter: bool
    lossless: bool
    summary: str  # one line: what it drafts with
    paper: str  # where the method comes from
    cost: str  # per step: drafter passes and tree tokens the target verifies
    rule: str  # how acceptance keeps it lossless (greedy / sampling)


def check_budget_fits(method: str, budget: int, models: Models) -> None:
    """A node budget the context cannot hold is a bad knob, named with its allowed range."""
    context = min(models.target.max_positions, models.drafter.max_positions)
    if budget > context - 2:
        raise ValueError(f"{method}: budget={budget} does not fit the model context; allowed 1..{context - 2}")


def root_only(context: DraftContext) -> DraftTree:
    """The empty draft: the target just decodes one token after the root."""
    return DraftTree(tokens=(context.sequence[-1],), parents=(-1,))
