"""Lossless sampling: the tokens a method emits follow the target's distribution exactly.

Part 1 drives the accept rule with synthetic target/draft tables (fast, many samples); part 2
runs the real loop on small random models with a small vocabulary. Both use chi-square
tests with fixed seeds.
"""

import itertools

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from spectune.engine.accept import accept_sampled
from spectune.engine.loop import Decoder
from spectune.engine.sampling import Sampling, probabilities, sample_without_replacement
from spectune.trees.shapes import branching_shape, chain_shape
from spectune.trees.draft import DraftTree
from spectune.methods import METHODS
from spectune.methods.base import Models
from spectune.engine.runner import CausalLM
from support import random_llama

V = 4
MIN_P = 1e-3  # chi-square p-value below which we call the distributions different


def table_logits(prefix: tuple[int, ...], salt: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(hash((salt, prefix)) % (2**31))
    return torch.randn(V, generator=g) * 1.5  # [V]


def exact_two_token_law(sampling: Sampling) -> np.ndarray:
    law = np.zeros((V, V))
    p1 = probabilities(table_logits((), 0), sampling)
    for a, b in itertools.product(range(V), range(V)):
        law[a, b] = p1[a] * probabilities(table_logits((a,), 0), sampling)[b]
    return law.flatten()


def draft_tree(prefix, shape, sampling, rng, draw):
    """draw: "without replacement" (Gumbel-top-k), "with replacement" (i.i.d., SpecInfer) or "deterministic"."""
    deterministic = draw == "deterministic"
    tokens, q_rows = [prefix[-1] if prefix else 0], {}
    for node in range(1, len(shape.parents)):
        parent = shape.parents[node]
        if parent not in q_rows:
            path = _path_tokens(shape.parents, tokens, parent)
            q = probabilities(table_logits(prefix + path, 1), sampling)
            q_rows[parent] = (q, _picks(q, shape.n_children()[parent], rng, draw))
        q, picks = q_rows[parent]
        rank = shape.ranks[node]
        tokens.append(picks[rank] if rank < len(picks) else picks[-1])
    q = None if deterministic else torch.stack([q_rows.get(i, (torch.zeros(V),))[0] for i in range(len(tokens))])
    return DraftTree(tuple(tokens), shape.parents, q, with_replacement=draw == "with replacement")


def _picks(q, n_kids, rng, draw):
    if draw == "deterministic":
        return list(range(n_kids))
    if draw == "with replacement":
        return torch.multinomial(q, n_kids, replacement=True, generator=rng).tolist()
    return sample_without_replacement(q, n_kids, rng)


def _path_tokens(parents, tokens, node):
    path = []
    while node > 0:
        path.append(tokens[node])
        node = parents[node]
    return tuple(reversed(path))


def emit_two(shape, sampling, rng, draw):
    out: tuple[int, ...] = ()
    while len(out) < 2:
        tree = draft_tree(out, shape, sampling, rng, draw)
        rows = [probabilities(table_logits(out + _path_tokens(shape.parents, tree.tokens, i), 0), sampling)
                for i in range(len(tree.tokens))]
        verdict = accept_sampled(tree, torch.stack(rows), rng)
        out += tuple(tree.tokens[i] for i in verdict.path[1:]) + (verdict.bonus,)
    return out[:2]


@pytest.mark.parametrize(
    "name, shape, draw, top_p",
    [
        ("chain (Leviathan/Chen)", chain_shape(2), "without replacement", 1.0),
        ("tree without replacement", branching_shape([3, 2]), "without replacement", 1.0),
        ("tree, top-p 0.8", branching_shape([2, 2]), "without replacement", 0.8),
        ("tree with replacement (SpecInfer)", branching_shape([3, 2]), "with replacement", 1.0),
        ("with replacement, top-p 0.8", branching_shape([4, 1]), "with replacement", 0.8),
        ("deterministic chain (sample-and-match)", chain_shape(2), "deterministic", 1.0),
        ("deterministic siblings", branching_shape([3, 1]), "deterministic", 0.9),
    ],
)
def test_accept_rule_preserves_the_target_law(name, shape, draw, top_p):
    sampling = Sampling(temperature=1.0, top_p=top_p)
    rng = torch.Generator().manual_seed(1234)
    n = 6000
    counts = np.zeros(V * V)
    for _ in range(n):
        a, b = emit_two(shape, sampling, rng, draw)
        counts[a * V + b] += 1
    law = exact_two_token_law(sampling)
    support = law > 0
    assert counts[~support].sum() == 0, f"{name}: emitted a token pair the target cannot produce"
    _, p_value = chisquare(counts[support], law[support] / law[support].sum() * n)
    assert p_value > MIN_P, f"{name}: chi-square p={p_value:.2g}"


# --- the real loop on small models --------------------------------------------------------


@pytest.fixture(scope="module")
def small_vocab_pair():
    target = random_llama(seed=1, vocab=8, layers=2, hidden=32)
    drafter = random_llama(seed=2, vocab=8, layers=1, hidden=32)
    return target, drafter


def exact_law_from_model(target, prompt, sampling):
    lm = CausalLM(target)
    p1 = probabilities(lm.forward(prompt)[-1], sampling)  # [V]
    law = np.zeros((8, 8))
    for a in range(8):
        p2 = probabilities(CausalLM(target).forward(prompt + [a])[-1], sampling)
        law[a] = (p1[a] * p2).numpy()
    return law.flatten()


EXTRA_CONFIGS = [
    ("sps", {"draft_len": 3, "schedule": "heuristic"}),
    ("tree", {"branching": [3, 2]}),
    ("pld", {"matches": 4, "max_ngram": 1}),  # a trie of continuations from the second step on
]
EVERY_METHOD = [(name, {}) for name in METHODS.names()  # heads methods: tests/unit/test_heads_sampling.py
                if METHODS.get(name).lossless and not METHODS.get(name).needs_heads]


@pytest.mark.parametrize("method, knobs", EVERY_METHOD + EXTRA_CONFIGS)
def test_loop_samples_follow_the_target(small_vocab_pair, method, knobs):
    target, drafter = small_vocab_pair
    models = Models(CausalLM(target), CausalLM(drafter))
    decoder = Decoder(models.target, METHODS.build(method, knobs, models))
    sampling = Sampling(temperature=1.0)
    prompt = [1, 2, 3, 1, 2]
    n = 1500
    counts = np.zeros(64)
    for seed in range(n):
        a, b = decoder.generate(prompt, 2, sampling, seed=seed).tokens
        counts[a * 8 + b] += 1
    law = exact_law_from_model(target, prompt, sampling)
    _, p_value = chisquare(counts, law / law.sum() * n)
    assert p_value > MIN_P, f"{method}: chi-square p={p_value:.2g}"
