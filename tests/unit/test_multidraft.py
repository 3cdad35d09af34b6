"""rsd and specinfer: the same multi-draft shape, siblings without vs with replacement."""

import pytest
import torch

from spectune.engine.loop import Decoder
from spectune.engine.runner import CausalLM
from spectune.engine.sampling import Sampling
from spectune.trees.draft import tree_layout
from spectune.methods import METHODS
from spectune.engine.drafter import DraftContext
from spectune.methods.base import Models
from support import random_llama

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def models():
    return random_llama(seed=21, vocab=8, layers=2, hidden=32), random_llama(seed=22, vocab=8, layers=1, hidden=32)


def runners(models):
    target, drafter = models
    return Models(CausalLM(target), CausalLM(drafter))


@pytest.mark.parametrize("method", ["rsd", "specinfer"])
def test_default_shape_is_width_independent_drafts_of_depth_tokens(method):
    shape = METHODS.knobs(method, {}).shape()
    assert shape.n_children()[0] == 3 and shape.depth == 4 and shape.size == 12
    assert METHODS.knobs(method, {"branching": [3, 2, 1]}).shape().size == 3 + 6 + 6


def test_a_tree_beyond_the_context_is_refused_at_build_time(models):
    with pytest.raises(ValueError, match=r"rsd: width=32, depth=10 makes a draft tree of 320 nodes; .* allows 1\.\.254"):
        METHODS.build("rsd", {"width": 32, "depth": 10}, runners(models))
    with pytest.raises(ValueError, match=r"specinfer: branching=\[8, 8, 8\] makes a draft tree of 584 nodes"):
        METHODS.build("specinfer", {"branching": [8, 8, 8]}, runners(models))


def test_bad_branching_names_the_field():
    with pytest.raises(ValueError, match="branching"):
        METHODS.knobs("rsd", {"branching": [2, 0]})
    with pytest.raises(ValueError, match="width"):
        METHODS.knobs("specinfer", {"width": 0})


def draft_many(models, method, sampling, steps=40):
    pair = runners(models)
    drafter = METHODS.build(method, {"width": 4, "depth": 2}, pair)
    rng = torch.Generator().manual_seed(0)
    trees = []
    for i in range(steps):
        trees.append(drafter.draft(DraftContext((1, 2, 3, i % 8), sampling, rng, max_depth=8)))
    return trees


def root_siblings(tree):
    return [tree.tokens[c] for c in tree_layout(tree.parents).children[0]]


def test_rsd_siblings_are_distinct_and_specinfer_siblings_may_repeat(models):
    sampling = Sampling(temperature=1.0)
    rsd = draft_many(models, "rsd", sampling)
    specinfer = draft_many(models, "specinfer", sampling)
    assert all(len(set(root_siblings(t))) == 4 for t in rsd)
    assert not any(t.with_replacement for t in rsd)
    assert all(t.with_replacement for t in specinfer)
    assert any(len(set(root_siblings(t))) < 4 for t in specinfer), "i.i.d. draws from a peaked q repeat"
    for tree in specinfer:
        assert tree.q is not None and torch.allclose(tree.q[0].sum(), torch.tensor(1.0))


def test_greedy_both_take_the_drafters_top_k(models):
    rsd = draft_many(models, "rsd", Sampling(), steps=5)
    specinfer = draft_many(models, "specinfer", Sampling(), steps=5)
    assert [t.tokens for t in rsd] == [t.tokens for t in specinfer]
    assert all(len(set(root_siblings(t))) == 4 and t.q is None for t in specinfer)


@pytest.mark.parametrize("method", ["rsd", "specinfer"])
@pytest.mark.parametrize("self_drafted", [False, True])
def test_greedy_output_equals_autoregressive(models, method, self_drafted):
    target, drafter = models
    pair = Models(CausalLM(target), CausalLM(target if self_drafted else drafter))
    ar = Decoder(CausalLM(target), METHODS.build("ar", {}, pair))
    multi = Decoder(pair.target, METHODS.build(method, {"width": 3, "depth": 3}, pair))
    for prompt in ([1, 2, 3], [4, 4, 4, 4]):
        got = multi.generate(prompt, 20)
        assert got.tokens == ar.generate(prompt, 20).tokens
    if self_drafted:
        assert len(got.tokens) / got.target_calls > 2.5  # whole drafts accepted: compaction exercised
