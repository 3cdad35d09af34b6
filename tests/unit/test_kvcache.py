"""The KV cache wrapper: after any commit or truncate it equals a fresh prefill of exactly its tokens."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spectune.engine.runner import CausalLM
from spectune.trees.draft import tree_inputs, tree_layout
from support import random_llama

MODEL = random_llama(seed=0, vocab=32, layers=2, hidden=32)


def fresh_prefill(tokens):
    lm = CausalLM(MODEL)
    lm.forward(list(tokens))
    return lm.cache


def assert_same_cache(a, b):
    assert a.tokens == b.tokens
    for la, lb in zip(a.hf.layers, b.hf.layers):
        torch.testing.assert_close(la.keys, lb.keys, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(la.values, lb.values, atol=1e-5, rtol=1e-4)


@st.composite
def trees(draw):
    size = draw(st.integers(0, 6))
    parents = [-1] + [draw(st.integers(0, i - 1)) for i in range(1, size + 1)]
    tokens = draw(st.lists(st.integers(0, 31), min_size=size + 1, max_size=size + 1))
    path = [0]
    while True:
        kids = [i for i, p in enumerate(parents) if p == path[-1]]
        if not kids or not draw(st.booleans()):
            break
        path.append(draw(st.sampled_from(kids)))
    return tuple(parents), tokens, path


operations = st.one_of(
    st.tuples(st.just("tree"), trees()),
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("append"), st.lists(st.integers(0, 31), min_size=1, max_size=4)),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompt=st.lists(st.integers(0, 31), min_size=1, max_size=8), ops=st.lists(operations, max_size=5))
def test_cache_equals_fresh_prefill_after_any_commit_or_truncate(prompt, ops):
    lm = CausalLM(MODEL)
    lm.forward(prompt)
    for kind, arg in ops:
        if kind == "append":
            lm.forward(arg)
        elif kind == "truncate":
            lm.cache.truncate(int(arg * len(lm.cache)))
        else:
            parents, tokens, path = arg
            past = len(lm.cache)
            inputs = tree_inputs(parents, past)
            lm.forward(tokens, inputs.positions, inputs.mask)  # verify a whole tree
            lm.cache.keep(past, path)  # commit the accepted path
        if len(lm.cache):
            assert_same_cache(lm.cache, fresh_prefill(lm.cache.tokens))


def test_tree_logits_equal_sequential_decoding():
    lm = CausalLM(MODEL)
    lm.forward([1, 2, 3])
    parents, tokens = (-1, 0, 0, 1, 2), [4, 5, 6, 7, 8]
    inputs = tree_inputs(parents, len(lm.cache))
    tree_logits = lm.forward(tokens, inputs.positions, inputs.mask)  # [5, V]
    for path in tree_layout(parents).paths:
        seq = CausalLM(MODEL)
        sequential = seq.forward([1, 2, 3] + [tokens[i] for i in path])[3:]  # logits at the path's nodes
        torch.testing.assert_close(tree_logits[list(path)], sequential, atol=1e-5, rtol=1e-4)


def test_truncate_and_keep_reject_bad_arguments():
    lm = CausalLM(MODEL)
    lm.forward([1, 2, 3, 4])
    for bad in (-1, 5):
        with pytest.raises(ValueError, match="cannot truncate"):
            lm.cache.truncate(bad)
    with pytest.raises(ValueError, match="must ascend"):
        lm.cache.keep(1, [2, 1])
