"""The decode loop: every method is the same five phases with a different drafter plugged in.

    draft -> tree inputs -> verify (ONE target forward) -> accept -> commit

The drafter says what it needs around verification (`hidden_layers`, `verifying`), so the
loop never branches on a method. The target's cache holds every committed token but the last
(the tree's root). Timing stays out of here: the loop returns counts; profilers hook the
models from outside.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from spectune.engine.accept import Verdict, accept
from spectune.engine.budget import check_fits
from spectune.engine.drafter import DraftContext, Drafter, StepOutcome
from spectune.engine.runner import CausalLM
from spectune.engine.sampling import Sampling
from spectune.trees.draft import DraftTree, LayerTransfer, VerifyExtras, tree_inputs, tree_layout


@dataclass(frozen=True)
class StepRecord:
    drafted: int  # draft nodes in the tree (root excluded)
    depth: int  # deepest draft position offered
    accepted: int  # draft tokens accepted and emitted (none cut after eos counts)
    draft_calls: int
    extras: int = 0  # extra positions the verification forward also ran (Drafter.verify_extras), never accepted


@dataclass(frozen=True)
class Emitted:
    """What one step added to the output."""

    tokens: list[int]
    record: StepRecord


@dataclass
class Generation:
    prompt: tuple[int, ...]
    tokens: list[int] = field(default_factory=list)  # new tokens only
    steps: list[StepRecord] = field(default_factory=list)

    @property
    def target_calls(self) -> int:
        return len(self.steps)

    @property
    def draft_calls(self) -> int:
        return sum(s.draft_calls for s in self.steps)


class Decoder:
    """Runs one drafter against one target."""

    def __init__(self, target: CausalLM, drafter: Drafter, eos_token_id: int | None = None) -> None:
        self.target = target
        self.drafter = drafter
        self.eos_token_id = eos_token_id

    def generate(
        self, prompt: Sequence[int], max_new_tokens: int, sampling: Sampling = Sampling(), seed: int = 0
    ) -> Generation:
        result = Generation(tuple(prompt))
        for step in self.stream(prompt, max_new_tokens, sampling, seed):
            result.tokens.extend(step.tokens)
            result.steps.append(step.record)
        return result

    def stream(
        self, prompt: Sequence[int], max_new_tokens: int, sampling: Sampling = Sampling(), seed: int = 0
    ) -> Iterator[Emitted]:
        """Decode step by step, yielding what each step emits (cut at max_new_tokens and at eos)."""
        self._check_budget(len(prompt), max_new_tokens)
        rng = torch.Generator().manual_seed(seed)
        sequence = list(prompt)
        self._start(sequence)
        produced = 0
        while produced < max_new_tokens:
            context = DraftContext(tuple(sequence), sampling, rng, max_depth=max_new_tokens - produced - 1)
            tree = self.drafter.draft(context)  # 1. draft: tokens + parents (+ q when sampling)
            layers = self.drafter.hidden_layers()  # decoder layers whose outputs the drafter wants back
            extras = self.drafter.verify_extras(tree)  # non-candidate positions after the nodes (PPD), or None
            past = len(self.target.cache)
            parents = tree.parents if extras is None else extras.joined(tree.parents)
            inputs = tree_inputs(parents, past, self.target.dtype)  # 2. tree inputs: mask, positions
            with self.drafter.verifying(tree):  # 3. verify: ONE target forward over every node (and extra)
                verified = self.target.verify(tree.tokens, inputs.positions, inputs.mask, layers,
                                              *_extra_inputs(extras))
            logits = verified.logits  # [n+1, V]; verified.hidden: {layer: [n+1, d]}
            verdict = accept(tree, logits, sampling, rng)  # 4. accept: path + bonus
            emitted = self._commit(tree, verdict, past, sequence)  # 5. commit: caches hold the accepted prefix
            self.drafter.observe(StepOutcome(tree, verdict, logits, verified.hidden, verified.extras))
            emitted, stop = self._cut(emitted, max_new_tokens - produced)
            produced += len(emitted)
            yield Emitted(emitted, _record(tree, verdict, kept=len(emitted), extras=extras))
            if stop:
                return

    def _start(self, sequence: list[int]) -> None:
        self.target.reset()
        self.drafter.reset()
        if len(sequence) > 1:  # prefill all but the root; a drafter reading the target's features gets the prompt's
            extras = self._prefill_extras(sequence[-2])
            prefill = self.target.prefill(sequence[:-1], self.drafter.hidden_layers(), *_extra_inputs(extras))
            self.drafter.prefilled(prefill.hidden)  # {layer: [p, d]}, or {} when it asked for none
            if prefill.extras is not None:
                self.drafter.prefilled_extras(prefill.extras)

    def _prefill_extras(self, last: int) -> VerifyExtras | None:
        """The extras the drafter hangs under the last prefilled token (a chain, as the prefill is), or None."""
        extras = self.drafter.verify_extras(DraftTree.root_only(last))
        if extras is None:
            return None
        if not tree_layout(extras.joined((-1,))).is_chain:
            raise ValueError(f"extras at the prefill must form a chain under its last token, got parents {extras.parents}")
        return extras

    def _commit(self, tree: DraftTree, verdict: Verdict, past: int, sequence: list[int]) -> list[int]:
        self.target.cache.keep(past, verdict.path)  # root + accepted nodes stay (extras never: on no path)
        emitted = [tree.tokens[i] for i in verdict.path[1:]] + [verdict.bonus]
        sequence.extend(emitted)
        self.drafter.commit(sequence)
        return emitted

    def _cut(self, emitted: list[int], room: int) -> tuple[list[int], bool]:
        """Drop what the step over-produced, so every method returns exactly what AR would."""
        if self.eos_token_id is not None and self.eos_token_id in emitted[:room]:
            return emitted[: emitted.index(self.eos_token_id) + 1], True
        return emitted[:room], False

    def _check_budget(self, prompt_len: int, max_new_tokens: int) -> None:
        """ValueError for an empty prompt or no new tokens; budget.ContextOverflow when they do not fit."""
        check_fits(prompt_len, max_new_tokens, self.drafter.max_tree_size, self.target.max_positions)


def _extra_inputs(extras: VerifyExtras | None) -> tuple[torch.Tensor | None, LayerTransfer | None]:
    """What the target's forward takes of the extras: their [m, d] input embeddings and their layer transfer."""
    return (None, None) if extras is None else (extras.embeddings, extras.transfer)


def _record(tree: DraftTree, verdict: Verdict, kept: int, extras: VerifyExtras | None) -> StepRecord:
    """The step's counts; of its accepted draft tokens only the `kept` first emitted ones count
    (the rest fell after an eos: the output never holds them)."""
    depth = tree_layout(tree.parents).depth
    return StepRecord(tree.size, depth, min(verdict.accepted, kept), tree.draft_calls,
                      0 if extras is None else len(extras.parents))
