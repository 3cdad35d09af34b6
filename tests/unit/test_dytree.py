"""dytree (DySpec): best-first growth under a budget, sibling draw order, lossless sampling, drafter cache."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

from spectune.engine.accept import accept_sampled
from spectune.engine.loop import Decoder
from spectune.engine.runner import CausalLM
from spectune.engine.sampling import Sampling, probabilities, sample_without_replacement
from spectune.trees.draft import tree_layout
from spectune.methods import METHODS
from spectune.methods import dytree
from spectune.engine.drafter import DraftContext
from spectune.methods.base import Models
from support import random_llama

torch.set_num_threads(1)

V = 4


def table_logits(prefix: tuple[int, ...], salt: int, scale: float = 1.5) -> torch.Tensor:
    g = torch.Generator().manual_seed(hash((salt, prefix)) % (2**31))
    return torch.randn(V, generator=g) * scale  # [V]


def path_tokens(tree, node: int) -> tuple[int, ...]:
    out = []
    while node > 0:
        out.append(tree.tokens[node])
        node = tree.parents[node]
    return tuple(reversed(out))


def grow_from_table(prefix, knobs, depth_limit, sampling, rng, scale=1.5):
    """dytree's growth with the drafter replaced by a fixed table of logits per path."""
    expansion = dytree.Expansion(prefix[-1] if prefix else 0, knobs, depth_limit, sampling, rng)

    def forward(new):
        return torch.stack([table_logits(prefix + path_tokens(expansion.tree, n), 1, scale) for n in new])  # [m, V]

    return dytree.grow(expansion, table_logits(prefix, 1, scale), forward)


# --- the slot priority never looks at the slot's own token ----------------------------------


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.01, 1.0), min_size=3, max_size=6), st.integers(0, 2**31 - 1))
def test_expected_draw_prob_is_the_exact_conditional_expectation(weights, seed):
    q = torch.tensor(weights, dtype=torch.float64)
    q = q / q.sum()
    drawn = sample_without_replacement(q, len(weights), torch.Generator().manual_seed(seed))
    drawn_probs = [float(q[t]) for t in drawn]
    priorities = dytree.expected_draw_probs(q, drawn_probs)
    for j in range(len(drawn)):
        left = [t for t in range(len(weights)) if t not in drawn[:j]]
        mass = sum(float(q[t]) for t in left)
        exact = sum(float(q[t]) / mass * float(q[t]) for t in left)  # E[q(x_j) | x_<j]
        assert priorities[j] == pytest.approx(exact, rel=1e-9, abs=1e-12)
        changed = drawn_probs[:j] + [0.5 * p for p in drawn_probs[j:]]  # x_j and later draws differ
        assert dytree.expected_draw_probs(q, changed)[j] == pytest.approx(priorities[j], rel=1e-12)


# --- lossless sampling on synthetic tables ----------------------------------------------------


def exact_two_token_law(sampling):
    p1 = probabilities(table_logits((), 0), sampling)
    return np.array(
        [float(p1[a] * probabilities(table_logits((a,), 0), sampling)[b]) for a in range(V) for b in range(V)]
    )


def emit_two(knobs, sampling, rng):
    out: tuple[int, ...] = ()
    while len(out) < 2:
        tree = grow_from_table(out, knobs, 2, sampling, rng)
        rows = [probabilities(table_logits(out + path_tokens(tree, i), 0), sampling) for i in range(len(tree.tokens))]
        verdict = accept_sampled(tree, torch.stack(rows), rng)
        out += tuple(tree.tokens[i] for i in verdict.path[1:]) + (verdict.bonus,)
    return out[:2]


def two_token_p_value(knobs, n=5000):
    sampling = Sampling(temperature=1.0)
    rng = torch.Generator().manual_seed(1234)
    counts = np.zeros(V * V)
    for _ in range(n):
        a, b = emit_two(knobs, sampling, rng)
        counts[a * V + b] += 1
    law = exact_two_token_law(sampling)
    return chisquare(counts, law / law.sum() * n).pvalue


# budget 3 and one node per round: the second slot of the root competes with the first node's child
COMPETING = dytree.DyTreeKnobs(budget=3, max_depth=2, topk=4, per_pass=1)


def test_dynamic_tree_keeps_the_target_law():
    p_value = two_token_p_value(COMPETING)
    assert p_value > 1e-3, f"chi-square p={p_value:.2g}"


def test_choosing_slots_by_their_own_drawn_token_would_bias_the_law(monkeypatch):
    """Why priorities use the expected draw: keeping a draw only when it came out likely is not lossless."""

    def realised(q, topk, rng):
        tokens = sample_without_replacement(q, topk, rng)
        probs = tuple(float(q[t]) for t in tokens)
        return dytree.Candidates(tuple(tokens), probs, probs)

    monkeypatch.setattr(dytree, "sampled_candidates", realised)
    assert two_token_p_value(COMPETING) < 1e-6


# --- greedy growth: the best-first tree -------------------------------------------------------


def best_first_paths(budget, max_depth, topk):
    """Brute force: every path of top-k children up to max_depth, ranked by path probability."""
    scored = []
    frontier = [((), 1.0)]
    for _ in range(max_depth):
        grown = []
        for path, value in frontier:
            probs = torch.softmax(table_logits((0,) + path, 1), -1)
            top = probs.topk(topk)
            for token, prob in zip(top.indices.tolist(), top.values.tolist()):
                grown.append((path + (token,), value * prob))
        scored += grown
        frontier = grown
    scored.sort(key=lambda item: -item[1])
    return {path for path, _ in scored[:budget]}


def grow_one_node_per_pass(knobs, max_depth):
    """DySpec's ideal: a drafter pass after every node, no cap on passes."""
    expansion = dytree.Expansion(0, knobs, max_depth, Sampling(), torch.Generator())
    expansion.open(0, table_logits((0,), 1))
    while expansion.heap and not expansion.full:
        for node in expansion.pop_round():
            expansion.open(node, table_logits((0,) + path_tokens(expansion.tree, node), 1))
    return expansion.draft_tree(draft_calls=0)


@pytest.mark.parametrize("budget, max_depth, topk", [(1, 3, 2), (5, 3, 2), (9, 4, 3), (12, 2, 4)])
def test_greedy_growth_one_node_per_pass_is_the_best_first_tree(budget, max_depth, topk):
    knobs = dytree.DyTreeKnobs(budget=budget, max_depth=max_depth, topk=topk, per_pass=1)
    tree = grow_one_node_per_pass(knobs, max_depth)
    got = {path_tokens(tree, i) for i in range(1, len(tree.tokens))}
    assert got == best_first_paths(budget, max_depth, topk)
    assert tree.q is None and tree.size == budget


@pytest.mark.parametrize("scale", [0.1, 1.5, 6.0])
def test_rounds_batch_siblings_and_never_pass_more_than_the_depth(scale):
    """Flat drafts: many siblings per pass; peaked drafts: a level per pass; never more passes than levels."""
    knobs = dytree.DyTreeKnobs(budget=14, max_depth=4, topk=4, per_pass=8)
    for seed in range(10):
        tree = grow_from_table((seed,), knobs, 4, Sampling(), torch.Generator(), scale)
        assert tree.size == 14 and tree.draft_calls <= 4
        if scale == 0.1:  # near-uniform: 4 root children, then their 16 children in one pass
            assert tree.draft_calls == 3 and tree_layout(tree.parents).depth == 2


@pytest.mark.parametrize("sampling", [Sampling(), Sampling(temperature=0.8)])
def test_tree_respects_budget_depth_topk_and_draw_order(sampling):
    knobs = dytree.DyTreeKnobs(budget=14, max_depth=3, topk=3, per_pass=4)
    tree = grow_from_table((0,), knobs, knobs.max_depth, sampling, torch.Generator().manual_seed(5))
    layout = tree_layout(tree.parents)
    assert tree.size == 14 and layout.depth <= 3
    assert all(len(kids) <= 3 for kids in layout.children)
    assert tree.draft_calls <= 3  # passes are capped at the depth limit, not the budget
    for node, kids in enumerate(layout.children):
        tokens = [tree.tokens[k] for k in kids]
        assert len(set(tokens)) == len(tokens), "siblings are distinct tokens"
        if kids and sampling.greedy:
            probs = torch.softmax(table_logits((0,) + path_tokens(tree, node), 1), -1)
            assert tokens == probs.topk(len(kids)).indices.tolist(), "greedy siblings in rank order"
        if kids and not sampling.greedy:
            assert torch.allclose(tree.q[node], probabilities(table_logits((0,) + path_tokens(tree, node), 1), sampling))


# --- on real (random) models: greedy equals AR, the drafter cache stays consistent --------------


@pytest.fixture(scope="module")
def models():
    return random_llama(seed=11, vocab=32, layers=2, hidden=32), random_llama(seed=12, vocab=32, layers=1, hidden=32)


@pytest.mark.parametrize("knobs", [{}, {"budget": 7, "max_depth": 3, "topk": 2, "per_pass": 2}, {"budget": 1}])
def test_greedy_output_equals_autoregressive(models, knobs):
    target, drafter = models
    pair = Models(CausalLM(target), CausalLM(drafter))
    ar = Decoder(CausalLM(target), METHODS.build("ar", {}, pair))
    dy = Decoder(pair.target, METHODS.build("dytree", knobs, pair))
    for prompt in ([1, 2, 3], [5, 9, 5, 9, 5], [7]):
        expected = ar.generate(prompt, 24).tokens
        got = dy.generate(prompt, 24)
        assert got.tokens == expected
        assert all(step.drafted <= knobs.get("budget", 16) for step in got.steps)


def test_deep_acceptance_with_a_perfect_drafter_still_equals_autoregressive(models):
    """The target drafting for itself: whole paths are accepted, so cache compaction is exercised."""
    target, _ = models
    pair = Models(CausalLM(target), CausalLM(target))
    ar = Decoder(CausalLM(target), METHODS.build("ar", {}, pair))
    dy = Decoder(pair.target, METHODS.build("dytree", {"budget": 8, "max_depth": 4, "topk": 2, "per_pass": 2}, pair))
    expected = ar.generate([2, 4, 6], 30).tokens
    got = dy.generate([2, 4, 6], 30)
    assert got.tokens == expected
    assert len(got.tokens) / got.target_calls > 2.5


def test_drafter_cache_keeps_a_chain_of_the_tree(models):
    target, drafter = models
    pair = Models(CausalLM(target), CausalLM(drafter))
    method = METHODS.build("dytree", {"budget": 10, "max_depth": 4, "topk": 3, "per_pass": 3}, pair)
    sequence = (3, 1, 4, 1, 5)
    context = DraftContext(sequence, Sampling(), torch.Generator(), max_depth=8)
    tree = method.draft(context)
    cached = pair.drafter.cache.tokens
    assert cached[: len(sequence)] == sequence
    chain, node = [], 0
    while (kids := tree_layout(tree.parents).children[node]) and len(chain) < len(cached) - len(sequence):
        node = kids[0]
        chain.append(tree.tokens[node])
    assert cached[len(sequence):] == tuple(chain), "the cache holds the first-drawn path, packed"
    fresh = CausalLM(drafter).forward(list(cached))[-1]
    assert torch.allclose(pair.drafter.extend_to(list(cached)), fresh, atol=1e-5), "packed keys equal a fresh prefill"


def test_budget_beyond_the_context_names_the_knob_and_range(models):
    target, drafter = models
    pair = Models(CausalLM(target), CausalLM(drafter))
    with pytest.raises(ValueError, match=r"dytree: budget=300 .* allows 1\.\.254"):
        METHODS.build("dytree", {"budget": 300}, pair)
    with pytest.raises(ValueError, match="budget"):
        METHODS.knobs("dytree", {"budget": 0})
