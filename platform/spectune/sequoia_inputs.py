"""What Sequoia's optimiser needs from a pair: the acceptance vector, and the inputs of a forward-time profile.

`measure_acceptance` decodes a prompt set with a one-level tree of `width` ranked drafter
children and counts which rank the target accepted each step: p[k] is the fraction of steps
whose k-th child was accepted. `filler_tokens` and `check_profile_fits` prepare
`spectune.profiling.profile_forwards`, which times target (and drafter) forwards of 1..N tree
tokens after a fixed-length past. The CLI writes both as JSON files (schemas in
`spectune.trees.files`). This runs the engine, so it lives here and not in the pure `trees` package.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from spectune.engine.drafter import DraftContext, Drafter, StepOutcome
from spectune.engine.loop import Decoder
from spectune.engine.runner import ExtraOutputs
from spectune.engine.sampling import Sampling
from spectune.methods.model_drafter import TemplateDrafter
from spectune.pair import Pair
from spectune.prompts import Prompt
from spectune.trees.draft import DraftTree, VerifyExtras, tree_layout
from spectune.trees.shapes import branching_shape

# --- measuring p[k] -----------------------------------------------------------------------------


class RankRecorder(Drafter):
    """Wraps a drafter; after each step notes which ranked root child, if any, the target accepted.

    Every ability of the wrapped drafter is forwarded, so wrapping changes nothing it does.
    """

    def __init__(self, inner: Drafter, width: int) -> None:
        self.inner = inner
        self.max_tree_size = inner.max_tree_size
        self.accepted_by_rank = [0] * width
        self.steps = 0

    def reset(self) -> None:
        self.inner.reset()

    def draft(self, context: DraftContext) -> DraftTree:
        return self.inner.draft(context)

    def hidden_layers(self) -> tuple[int, ...]:
        return self.inner.hidden_layers()

    def prefilled(self, hidden: Mapping[int, torch.Tensor]) -> None:
        self.inner.prefilled(hidden)

    def verifying(self, tree: DraftTree) -> contextlib.AbstractContextManager[None]:
        return self.inner.verifying(tree)

    def verify_extras(self, tree: DraftTree) -> VerifyExtras | None:
        return self.inner.verify_extras(tree)

    def prefilled_extras(self, outputs: ExtraOutputs) -> None:
        self.inner.prefilled_extras(outputs)

    def commit(self, sequence: Sequence[int]) -> None:
        self.inner.commit(sequence)

    def draft_modules(self) -> tuple[nn.Module, ...]:
        return self.inner.draft_modules()

    def exit_layer_acceptance(self) -> dict[int, float]:
        return self.inner.exit_layer_acceptance()

    def exit_choices(self) -> dict[tuple[int, int], int]:
        return self.inner.exit_choices()

    def observe(self, outcome: StepOutcome) -> None:
        self.inner.observe(outcome)
        if outcome.tree.size == 0:  # the last step of a generation may draft nothing
            return
        self.steps += 1
        if outcome.verdict.accepted:
            root_children = tree_layout(outcome.tree.parents).children[0]
            self.accepted_by_rank[root_children.index(outcome.verdict.path[1])] += 1

    @property
    def acceptance(self) -> list[float]:
        return [count / self.steps if self.steps else 0.0 for count in self.accepted_by_rank]


def measure_acceptance(
    pair: Pair, prompts: Sequence[list[int]], width: int, max_new_tokens: int, sampling: Sampling, seed: int = 0
) -> RankRecorder:
    """Decode every prompt with `width` ranked drafter children per step; count accepted ranks."""
    if pair.drafter is None:
        raise ValueError("measuring acceptance needs a drafter model: the pair has none")
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    models = pair.runners()
    recorder = RankRecorder(TemplateDrafter(models.drafter, branching_shape([width])), width)
    decoder = Decoder(models.target, recorder, pair.eos_token_id)
    for i, tokens in enumerate(prompts):
        decoder.generate(tokens, max_new_tokens, sampling, seed + i)
    return recorder


# --- preparing a forward-time profile (spectune.profiling.profile_forwards) ---------------------


def filler_tokens(pair: Pair, prompts: Sequence[Prompt], length: int) -> list[int]:
    """Real text for the past and the tree tokens: the prompt set's tokens, repeated to `length`."""
    tokens = [t for p in prompts for t in pair.encode_prompt(p)]
    if not tokens:
        raise ValueError("the prompt set encodes to no tokens")
    return (tokens * (length // len(tokens) + 1))[:length]


def check_profile_fits(pair: Pair, past: int, max_tokens: int) -> None:
    if max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {max_tokens}")
    if past < 0:
        raise ValueError(f"--past must be >= 0, got {past}")
    context = pair.max_positions  # both models' (the pair's one context rule)
    if past + max_tokens > context:
        raise ValueError(
            f"--past {past} + --max-tokens {max_tokens} exceeds the models' context of {context}; "
            f"allowed --max-tokens 1..{max(context - past, 0)}"
        )

