"""Token Recycling and the shared template filler: the adjacency matrix, BFS over a template, knobs."""

import itertools

import pytest
import torch

from spectune.engine.accept import Verdict
from spectune.engine.loop import Decoder
from spectune.engine.runner import CausalLM
from spectune.engine.sampling import Sampling
from spectune.trees.shapes import branching_shape, paths_shape
from spectune.trees.draft import DraftTree, tree_layout
from spectune.methods import METHODS
from spectune.engine.drafter import DraftContext, StepOutcome
from spectune.methods.base import Models
from spectune.methods.recycling import AdjacencyMatrix, recycle_order
from spectune.methods.template_fill import RANK_WEIGHTS, fill_template
from spectune.trees.shapes import ranked_paths
from support import random_llama


# --- the adjacency matrix ---------------------------------------------------------------------


def test_rows_hold_the_top_k_of_the_latest_logits_in_rank_order():
    matrix = AdjacencyMatrix(k=3)
    assert matrix.candidates(5) == []  # never seen: no candidates, so no draft
    logits = torch.tensor([[0.0, 5.0, 1.0, 3.0, 4.0, 2.0], [9.0, 0.0, 8.0, 0.0, 0.0, 7.0]])  # [2, V=6]
    matrix.update([5, 2], logits)
    assert matrix.candidates(5) == [1, 4, 3]
    assert matrix.candidates(2) == [0, 2, 5]
    assert matrix.known() == 2
    matrix.update([5], torch.tensor([[1.0, 0.5, 0.0, 0.0, 0.0, 2.0]]))
    assert matrix.candidates(5) == [5, 0, 1]  # overwritten by the newer logits
    matrix.update([4, 4], torch.tensor([[3.0, 2.0, 1.0, 0, 0, 0], [0, 0, 0, 1.0, 2.0, 3.0]]))
    assert matrix.candidates(4) == [5, 4, 3]  # a token twice in one update: the later entry wins


def test_the_accepted_path_is_written_last():
    tree = DraftTree((7, 1, 2, 3), (-1, 0, 0, 1))
    outcome = StepOutcome(tree, Verdict((0, 2), bonus=4), torch.zeros(4, 8))
    assert recycle_order(outcome) == [1, 3, 0, 2]


# --- filling a template -----------------------------------------------------------------------


def test_fill_takes_each_nodes_rank_and_drops_missing_subtrees():
    table = {(9,): [1, 2, 3], (9, 1): [4], (9, 2): [5, 6], (9, 1, 4): []}
    shape = branching_shape([2, 2, 1])  # nodes under rank 1 of (9, 1) ask for a second candidate: none
    tree = fill_template(shape, 9, lambda path: table.get(path, []), max_depth=8)
    assert tree.tokens == (9, 1, 2, 4, 5, 6)
    assert tree.parents == (-1, 0, 0, 1, 2, 2)
    assert tree.q is None  # deterministic draft


def test_fill_respects_max_depth_and_keeps_siblings_distinct():
    shape = paths_shape(ranked_paths(40, 6, RANK_WEIGHTS))
    candidates = lambda path: [(sum(path) + r) % 50 for r in range(8)]  # noqa: E731  distinct per node
    for depth in range(0, 7):
        tree = fill_template(shape, 3, candidates, max_depth=depth)
        layout = tree_layout(tree.parents)
        assert layout.depth <= depth
        for kids in layout.children:
            tokens = [tree.tokens[c] for c in kids]
            assert len(set(tokens)) == len(tokens)
    assert fill_template(shape, 3, candidates, max_depth=0).tokens == (3,)


def test_ranked_paths_is_the_top_scoring_prefix_closed_set():
    weights = (0.6, 0.25, 0.1)
    chosen = ranked_paths(9, 4, weights)
    paths_shape(chosen)  # raises unless prefix- and rank-closed
    score = lambda p: torch.tensor([weights[r] for r in p]).prod().item()  # noqa: E731
    every = [list(p) for d in range(1, 5) for p in itertools.product(range(3), repeat=d)]
    best = sorted(every, key=lambda p: (-score(p), len(p), p))[:9]
    assert sorted(map(tuple, chosen)) == sorted(map(tuple, best))
    assert len(ranked_paths(100, 2, (0.5,))) == 2  # a chain: one rank, depth 2
    with pytest.raises(ValueError, match="non-increasing"):
        ranked_paths(4, 3, (0.2, 0.5))


# --- the method -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_pair():
    return random_llama(seed=1, vocab=16, layers=2, hidden=32), random_llama(seed=2, vocab=16, layers=1, hidden=32)


def test_recycling_drafts_what_the_target_predicted(small_pair):
    target, _ = small_pair
    models = Models(CausalLM(target), None)
    drafter = METHODS.build("recycling", {"branching": [2, 1]}, models)
    context = DraftContext((1, 2, 3), Sampling(), torch.Generator(), max_depth=8)
    assert drafter.draft(context).tokens == (3,)  # empty matrix: nothing to draft
    logits = torch.arange(16.0).repeat(2, 1)  # [2, V]: the top tokens are 15, 14, ...
    drafter.observe(StepOutcome(DraftTree((3, 15), (-1, 0)), Verdict((0,), 15), logits))
    tree = drafter.draft(context)
    # rows 3 and 15 now hold [15, 14, ...]: root 3 -> 15, 14; 15 -> 15 (rank 0); 14 was never seen -> no child
    assert tree.tokens == (3, 15, 14, 15)
    assert tree.parents == (-1, 0, 0, 1)


def test_recycling_is_greedy_lossless_and_learns(small_pair):
    target, _ = small_pair
    reference = Decoder(CausalLM(target), METHODS.build("ar", {}, Models(CausalLM(target), None)))
    for knobs in ({}, {"branching": [3, 2, 1]}, {"tree_size": 8, "k": 4}, {"hot_start": True}):
        models = Models(CausalLM(target), None)
        drafter = METHODS.build("recycling", knobs, models)
        decoder = Decoder(models.target, drafter)
        for prompt in ([1, 2, 3], [5, 5, 5, 5], [9]):
            want = reference.generate(prompt, 40).tokens
            got = decoder.generate(prompt, 40)
            assert got.tokens == want, knobs
        assert drafter.matrix.known() > 0
        assert max(s.accepted for s in got.steps) > 0, f"{knobs}: never accepted a recycled token"


def test_hot_start_keeps_the_matrix_across_prompts(small_pair):
    target, _ = small_pair
    for hot, expect_kept in ((True, True), (False, False)):
        drafter = METHODS.build("recycling", {"hot_start": hot}, Models(CausalLM(target), None))
        drafter.matrix.update([3], torch.arange(16.0)[None])
        drafter.reset()
        assert (drafter.matrix.known() == 1) is expect_kept


def test_recycling_knob_errors_name_the_field(small_pair):
    target, _ = small_pair
    models = Models(CausalLM(target), None)
    with pytest.raises(ValueError, match=r"branching: .*rank 3 but k=2"):
        METHODS.knobs("recycling", {"branching": [4], "k": 2})
    with pytest.raises(ValueError, match="give one of tree_size, branching, paths"):
        METHODS.knobs("recycling", {"branching": [2], "paths": [[0]]})
    with pytest.raises(ValueError, match="k:"):
        METHODS.knobs("recycling", {"k": 0})
    with pytest.raises(ValueError, match=r"k: 32 candidates .* allowed range 1\.\.16"):
        METHODS.build("recycling", {"k": 32}, models)
    with pytest.raises(ValueError, match=r"recycling: branching=\[8, 8, 4\] makes a draft tree of \d+ nodes; .* allows 1\.\.254"):
        METHODS.build("recycling", {"branching": [8, 8, 4]}, models)  # random_llama's context is 256
