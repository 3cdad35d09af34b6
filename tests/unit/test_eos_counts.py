"""Accepted counts exclude draft tokens cut after eos: the output never holds them."""

from __future__ import annotations

from spectune.engine.loop import Decoder
from spectune.engine.runner import CausalLM
from spectune.methods import METHODS
from spectune.methods.base import Models
from spectune.metrics import step_metrics
from support import random_llama


def test_tokens_after_eos_are_not_counted_as_accepted() -> None:
    target = random_llama(seed=3, vocab=16, layers=2, hidden=32)
    prompt = [1, 2, 3]
    plain = Decoder(CausalLM(target), METHODS.build("ar", {}, Models(CausalLM(target), None)))
    reference = plain.generate(prompt, 6).tokens
    eos = reference[1]  # AR's second token: a step drafting 4 deep accepts past it
    assert eos not in reference[:1]
    models = Models(CausalLM(target), CausalLM(target))  # the target drafts for itself: every draft is accepted
    decoder = Decoder(models.target, METHODS.build("sps", {"draft_len": 4}, models), eos_token_id=eos)
    generation = decoder.generate(prompt, 6)
    assert generation.tokens == reference[:2]  # cut at eos, as AR would stop
    [step] = generation.steps
    assert (step.drafted, step.accepted) == (4, 2)  # 4 accepted by the target; 2 of them emitted
    counts = step_metrics([generation])
    assert counts.acceptance_rate == 0.5 and counts.mean_accepted_tokens == 2.0
