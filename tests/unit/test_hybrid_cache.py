"""The hybrid cache: after a chain is verified and only a prefix of it kept, the SSM layers' states
(conv window and recurrent state) and the attention layers' keys/values equal a fresh prefill of
exactly the kept tokens, to 1e-5 in fp32; so does every next-token distribution after it."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spectune.engine.runner import CausalLM
from spectune.engine.ssm_tree import branch_by_branch, enable_tree_scan, tree_ssd
from spectune.trees.draft import tree_inputs, tree_layout
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


def test_a_prefill_is_not_rolled_back_into_and_later_verifications_are():
    lm = CausalLM(MODEL)
    lm.prefill([3, 4, 5, 6])  # the chunked scan: only its end state recorded
    lm.forward([7, 8])  # a verification: every token's state recorded
    lm.cache.truncate(5)
    assert_same_state(lm, fresh_prefill([3, 4, 5, 6, 7]))
    lm.prefill([9, 10])
    with pytest.raises(ValueError, match="recorded the states of only the last 0"):
        lm.cache.truncate(6)


def test_tree_compaction_of_a_hybrid_chain_forward_is_refused():
    lm = CausalLM(MODEL)
    lm.forward([3, 4, 5, 6])  # a chain forward: no per-node states to keep a branch by
    with pytest.raises(ValueError, match="SSM layers hold one state per sequence"):
        lm.cache.keep(1, [0, 2])


@st.composite
def trees(draw):
    """A random draft tree (root first), its tokens, and a root-to-node path through it."""
    size = draw(st.integers(1, 7))
    parents = [-1] + [draw(st.integers(0, i - 1)) for i in range(1, size + 1)]
    tokens = draw(st.lists(st.integers(2, 31), min_size=size + 1, max_size=size + 1))
    path = [0]
    while True:
        kids = [i for i, p in enumerate(parents) if p == path[-1]]
        if not kids or not draw(st.booleans()):
            break
        path.append(draw(st.sampled_from(kids)))
    return tuple(parents), tokens, path


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompt=st.lists(st.integers(2, 31), min_size=1, max_size=10), steps=st.lists(trees(), min_size=1, max_size=3))
def test_tree_states_equal_branch_by_branch_verification(prompt, steps):
    """STree: one forward over a tree gives at every node the logits a chain forward of its branch gives, and
    the commit of a path leaves the state a fresh prefill of that path leaves (SSM and attention layers)."""
    lm = CausalLM(MODEL)
    lm.forward(prompt[:-1]) if len(prompt) > 1 else None
    root = prompt[-1]
    for parents, tokens, path in steps:
        tokens = [root] + tokens[1:]
        past, committed = len(lm.cache), lm.cache.tokens
        inputs = tree_inputs(parents, past)
        logits = lm.forward(tokens, inputs.positions, inputs.mask)  # [n, V] the whole tree at once
        for branch in tree_layout(parents).paths:  # the naive baseline: each branch as a chain
            chain = fresh_prefill(committed) if committed else CausalLM(MODEL)
            expected = chain.forward([tokens[i] for i in branch])  # [len(branch), V]
            torch.testing.assert_close(logits[list(branch)], expected, atol=1e-5, rtol=0)
        lm.cache.keep(past, path)
        assert_same_state(lm, fresh_prefill(lm.cache.tokens))
        root = 7


def test_tree_ssd_follows_each_node_from_its_parent():
    """The parallel tree scan equals the recurrence h = exp(dt A) h_parent + dt x B^T, y = C h + D x, node by node."""
    torch.manual_seed(0)
    parents = (-1, 0, 0, 1, 1, 2, 5)
    n, heads, dim, size = len(parents), 3, 4, 5
    x, b, c = torch.randn(n, heads, dim), torch.randn(n, heads, size), torch.randn(n, heads, size)
    dt, a, d, h0 = torch.rand(n, heads), -torch.rand(heads) * 2, torch.randn(heads), torch.randn(heads, dim, size)
    y, states = tree_ssd(x, dt, a, b, c, d, h0, parents)
    for i, p in enumerate(parents):
        before = h0 if p < 0 else states[p]
        h = torch.exp(dt[i] * a)[:, None, None] * before + (dt[i][:, None] * x[i])[..., None] * b[i][:, None, :]
        torch.testing.assert_close(states[i], h, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(y[i], (c[i][:, None, :] * h).sum(-1) + d[:, None] * x[i], atol=1e-5, rtol=1e-5)


def test_a_tree_on_a_model_whose_recurrent_layers_are_no_mamba2_is_refused():
    class Opaque(torch.nn.Module):  # a recurrent layer the engine knows nothing about
        pass

    model = random_bamba(seed=1)
    model.model.layers[2].mamba = Opaque()
    with pytest.raises(ValueError, match="cannot verify a draft tree on BambaForCausalLM: 1 of its 2 recurrent layers"):
        enable_tree_scan(model, 2)


def test_branch_by_branch_verification_equals_the_tree_forward():
    """The naive baseline: one chain forward per branch gives the logits STree gives, and leaves a cache whose
    commit of any path equals a fresh prefill of it."""
    parents, tokens = (-1, 0, 0, 1, 1, 3, 2), [9, 4, 5, 6, 7, 8, 10]
    for path in ([0, 1, 3, 5], [0, 2, 6], [0, 1, 4], [0]):
        stree, naive = CausalLM(MODEL), CausalLM(MODEL)
        for lm in (stree, naive):
            lm.forward([3, 4, 5, 6, 7])
        inputs = tree_inputs(parents, 5)
        expected = stree.forward(tokens, inputs.positions, inputs.mask)  # [7, V]
        with branch_by_branch():
            logits = naive.forward(tokens, inputs.positions, inputs.mask)  # [7, V]
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
        naive.cache.keep(5, path)
        assert_same_state(naive, fresh_prefill(naive.cache.tokens))
