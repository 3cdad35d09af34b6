"""What heads drafters need from the engine: the final norm's output at every verified node, and the prompt's
features from the prefill, without hooks on the shared target."""

from collections.abc import Mapping

import torch

from spectune.engine.drafter import DraftContext, Drafter
from spectune.engine.loop import Decoder
from spectune.engine.runner import CausalLM
from spectune.trees.draft import DraftTree, tree_inputs
from support import random_llama

PROMPT = [3, 1, 4, 1, 5, 9, 2, 6]


def test_the_last_layer_is_the_final_norms_output():
    target = random_llama(seed=5, vocab=16, layers=3)
    lm = CausalLM(target)
    lm.forward(PROMPT[:3])
    inputs = tree_inputs(tuple(range(-1, len(PROMPT) - 4)), 3)
    verified = lm.verify(PROMPT[3:], inputs.positions, inputs.mask, hidden_layers=(3, 2))
    with torch.no_grad():
        reference = target.model(input_ids=torch.tensor([PROMPT]), output_hidden_states=True)
    torch.testing.assert_close(verified.hidden[3], reference.last_hidden_state[0, 3:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(verified.hidden[2], reference.hidden_states[2][0, 3:], rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # layer L is what the LM head reads
        torch.testing.assert_close(target.lm_head(verified.hidden[3]), verified.logits, rtol=1e-4, atol=1e-4)


class _Recorder(Drafter):
    """Asks for the final layer; records what the prefill and each step handed back."""

    max_tree_size = 0

    def __init__(self, layers: tuple[int, ...]) -> None:
        self.layers = layers
        self.prefills: list[Mapping[int, torch.Tensor]] = []
        self.steps: list[Mapping[int, torch.Tensor]] = []

    def hidden_layers(self) -> tuple[int, ...]:
        return self.layers

    def prefilled(self, hidden):
        self.prefills.append(dict(hidden))

    def draft(self, context: DraftContext) -> DraftTree:
        return DraftTree.root_only(context.sequence[-1])

    def observe(self, outcome) -> None:
        self.steps.append(dict(outcome.hidden))


def test_the_prefill_hands_the_prompts_features_to_the_drafter():
    target = random_llama(seed=6, vocab=16, layers=2)
    drafter = _Recorder((2,))
    generation = Decoder(CausalLM(target), drafter).generate(PROMPT, 3)
    with torch.no_grad():
        full = target.model(input_ids=torch.tensor([PROMPT + generation.tokens])).last_hidden_state[0]  # [n, d]
    (prefill,) = drafter.prefills
    assert sorted(prefill) == [2] and prefill[2].shape == (len(PROMPT) - 1, 32)
    torch.testing.assert_close(prefill[2], full[: len(PROMPT) - 1], rtol=1e-5, atol=1e-5)
    for i, step in enumerate(drafter.steps):  # each root-only step: the root's feature
        torch.testing.assert_close(step[2][0], full[len(PROMPT) - 1 + i], rtol=1e-5, atol=1e-5)
    quiet = _Recorder(())
    Decoder(CausalLM(target), quiet).generate(PROMPT, 2)
    assert quiet.prefills == [{}] and quiet.steps == [{}, {}]  # nothing asked: nothing computed
