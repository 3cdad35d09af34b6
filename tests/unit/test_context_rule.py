"""One context rule for a pair: `Pair.max_positions` and the methods' `Models.context` both ask
`spectune.engine.budget.pair_context`, so they agree whichever model is the shorter."""

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from spectune.engine.budget import pair_context
from spectune.engine.runner import CausalLM
from spectune.methods.base import Models
from spectune.pair import Pair


def tiny(positions: int) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=positions)
    return LlamaForCausalLM(config)


@pytest.mark.parametrize(("target", "drafter", "context"), [(64, 32, 32), (32, 64, 32), (48, None, 48)])
def test_the_pair_and_its_runners_share_one_context_rule(target, drafter, context):
    target_model = tiny(target)
    drafter_model = tiny(drafter) if drafter else None
    pair = Pair(ref=None, tokenizer=None, target=target_model, drafter=drafter_model)
    models = Models(CausalLM(target_model), CausalLM(drafter_model) if drafter_model else None)
    assert pair.max_positions == models.context == context
    assert pair_context(target_model.config, drafter_model.config if drafter_model else None) == context
