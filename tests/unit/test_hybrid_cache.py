"""The hybrid cache: after a chain is verified and only a prefix of it kept, the SSM layers' states
(conv window and recurrent state) and the attention layers' keys/values equal a fresh prefill of
exactly the kept tokens, to 1e-5 in fp32; so does every next-token distribution after it."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spectune.engine.runner import CausalLM
from support import random_bamba

MODEL = random_bamba(seed=0)
SSM_LAYERS, ATTENTION_LAYERS = (0, 2), (1,)


def fresh_prefill(tokens):
    lm = CausalLM(MODEL)
    lm.forward(list(tokens))
    lm.cache.truncate(len(lm.cache))  # commit: the record of the prefill is dropped, the state kept
    return lm


def ssm_state(lm, layer):
    """The conv window the next token sees ([1, C, K]; left zeros where the sequence is shorter) and the
    recurrent state [1, H, P, N] of SSM layer `layer`."""
    hf = lm.cache.hf.layers[layer]
    conv = hf.conv_states[0][..., -hf.conv_kernel_size[0]:]  # [1, C, <=K]
    conv = torch.nn.functional.pad(conv, (hf.conv_kernel_size[0] - conv.shape[-1], 0))  # [1, C, K]
    return conv, hf.recurrent_states[0]


def assert_same_state(a, b):
    assert a.cache.tokens == b.cache.tokens
    for layer in SSM_LAYERS:
        for x, y in zip(ssm_state(a, layer), ssm_state(b, layer)):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=0)
    for layer in ATTENTION_LAYERS:
        la, lb = a.cache.hf.layers[layer], b.cache.hf.layers[layer]
        torch.testing.assert_close(la.keys, lb.keys, atol=1e-5, rtol=0)
        torch.testing.assert_close(la.values, lb.values, atol=1e-5, rtol=0)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    prompt=st.lists(st.integers(2, 31), min_size=1, max_size=12),
    steps=st.lists(st.tuples(st.lists(st.integers(2, 31), min_size=1, max_size=6), st.floats(0, 1)), max_size=4),
)
def test_snapshot_restore_equals_a_fresh_prefill(prompt, steps):
    """Verify a chain, keep its first j tokens (j = 0: the state restored to the snapshot at the committed
    prefix): the cache equals a fresh prefill of the kept sequence, and so do the next logits."""
    lm = CausalLM(MODEL)
    lm.forward(prompt)
    for chain, kept in steps:
        past = len(lm.cache)
        lm.forward(chain)  # verify
        lm.cache.keep(past, range(int(kept * len(chain))))  # commit the accepted prefix
        fresh = fresh_prefill(lm.cache.tokens)
        assert_same_state(lm, fresh)
        torch.testing.assert_close(lm.forward([5]), fresh.forward([5]), atol=1e-5, rtol=0)
        lm.cache.truncate(len(lm.cache) - 1)


def test_rollback_reaches_back_to_the_last_commit_only():
    lm = CausalLM(MODEL)
    lm.forward([3, 4, 5])
    lm.cache.truncate(2)  # inside the last forward: restored from its record, and committed
    lm.forward([6, 7])
    with pytest.raises(ValueError, match="cannot roll this hybrid's SSM state back 3 tokens"):
        lm.cache.truncate(1)


def test_tree_compaction_of_a_hybrid_is_refused():
    lm = CausalLM(MODEL)
    lm.forward([3, 4, 5, 6])
    with pytest.raises(ValueError, match="SSM layers hold one state per sequence"):
        lm.cache.keep(1, [0, 2])
