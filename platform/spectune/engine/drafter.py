"""What plugs into the loop: the Drafter protocol, what it is told before a step and after it.

The loop calls, each step,

    draft(context) -> DraftTree           # phase 1
    hidden_layers() -> layers to hand back  # which decoder-layer outputs the coming verification returns
    verify_extras(tree) -> extras or None  # non-candidate positions the verification forward also runs
    with verifying(tree): <target forward> # phase 3, inside the drafter's resource switch
    commit(sequence)                       # phase 5, drafter side
    observe(outcome)                       # what the step showed: verdict, target logits, those layer outputs

and `reset()` before every sequence, then `prefilled(hidden)` once the target holds the prompt
(all but the root; `hidden` holds the layers `hidden_layers()` named right after the reset).
Every ability beyond `draft` has a documented default on the base class, so the loop and the
tools around it (bench's timing, reports) call them on any drafter without probing.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from spectune.engine.accept import Verdict
from spectune.engine.runner import ExtraOutputs
from spectune.engine.sampling import Sampling
from spectune.trees.draft import DraftTree, VerifyExtras


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
    hidden: Mapping[int, torch.Tensor] = field(default_factory=dict)  # {layer l: [n+1, d]} output of block l (1-based)
    # at every tree node, for the layers `hidden_layers()` asked for this step (else empty)
    extras: ExtraOutputs | None = None  # what the step's `verify_extras` positions gave; None when it asked for none


class Drafter(ABC):
    """Base of every drafter. Subclasses set `max_tree_size` and implement `draft`; the rest is optional."""

    max_tree_size: int  # the most draft nodes one step can propose (for the context check)

    def reset(self) -> None:
        """Forget everything about the previous sequence. Default: nothing to forget."""

    @abstractmethod
    def draft(self, context: DraftContext) -> DraftTree:
        """Phase 1: propose a tree rooted at context.sequence[-1]."""

    def commit(self, sequence: Sequence[int]) -> None:
        """Phase 5, drafter side: keep only state consistent with the accepted `sequence`. Default: no state."""

    def observe(self, outcome: StepOutcome) -> None:
        """After each step: adapt (draft length schedules, tables, acceptance estimates). Default: learn nothing."""

    # --- around verification --------------------------------------------------------------------

    def hidden_layers(self) -> tuple[int, ...]:
        """Decoder layers (1..L) whose outputs the coming target forward must hand back.

        Called by the loop after `draft()`, and once after `reset()` for the prompt's prefill; the
        outputs arrive in `observe(outcome)` as `outcome.hidden` (in `prefilled(hidden)` for the
        prompt). Layers 1..L-1 are block outputs before any norm; L is the final norm's output, the
        feature the LM head reads (`CausalLM.verify`). Default: none (logits only).
        """
        return ()

    def prefilled(self, hidden: Mapping[int, torch.Tensor]) -> None:
        """The target now holds the prompt but its last token (the first root): {layer: [p, d]} outputs of
        the layers `hidden_layers()` named after `reset()`, at every prompt token. Not called for a
        one-token prompt. Default: nothing to read (drafters that draft from the target's features,
        EAGLE and Medusa, build their state from it)."""

    def verify_extras(self, tree: DraftTree) -> VerifyExtras | None:
        """Extra, non-candidate positions to append after `tree`'s nodes in its verification forward (PPD's
        prompt tokens): their logits and hidden states come back in `observe(outcome)` as `outcome.extras`;
        they are never accepted nor kept in the cache. Called after `draft()`; the drafter's `max_tree_size`
        must count them.

        Also asked once at the prompt's prefill, with the last prefilled token as a root-only tree: extras that
        form a chain under it run in the prefill's forward and come back in `prefilled_extras`. Default: none.
        """
        return None

    def prefilled_extras(self, outputs: ExtraOutputs) -> None:
        """What the extras asked for at the prefill (`verify_extras` of the last prefilled token) gave: [m, V]
        logits and the layers `hidden_layers()` named. Default: nothing asked, nothing to read."""

    def verifying(self, tree: DraftTree) -> contextlib.AbstractContextManager[None]:
        """Entered right before the target's verification forward of `tree`, exited right after, even on error.

        For resource switches while the target runs (PEARL: the thread count beside a background
        drafter). Default: nothing to switch.
        """
        return contextlib.nullcontext()

    # --- what tools around the loop may ask -----------------------------------------------------

    def draft_modules(self) -> tuple[nn.Module, ...]:
        """Modules other than the pair's drafter model whose forward calls are this drafter's drafting.

        An early-exit view of the target (layerskip, del) is one, so that timing from outside
        (`spectune bench`'s forward hooks) counts it as drafting. Only naming: the drafter itself
        times nothing. A named module must not run inside the target's forward, nor the target
        inside it, or the time would count on both sides. Default: none.
        """
        return ()

    def exit_layer_acceptance(self) -> dict[int, float]:
        """Per-token acceptance per exit layer, for self-speculative drafters (layerskip, del). Default: {}."""
        return {}

    def exit_choices(self) -> dict[tuple[int, int], int]:
        """Rounds drafted with each (exit layer, draft length), for dynamic-exit drafters (del). Default: {}."""
        return {}
