"""The online n-gram table (counts, ranking, back-off, cap) and the `ngram` drafter built on it."""

import pytest
import torch

from spectune.engine.loop import Decoder
from spectune.engine.runner import CausalLM
from spectune.engine.sampling import Sampling
from spectune.methods import METHODS
from spectune.engine.drafter import DraftContext
from spectune.methods.base import Models
from spectune.methods.ngram import NgramTable
from support import random_llama


def test_continuations_rank_by_count_then_recency():
    table = NgramTable(n=3, max_entries=100)
    table.add([1, 2, 7, 1, 2, 8, 1, 2, 7, 1, 2, 9], start=0)
    assert table.continuations([1, 2]) == [7, 9, 8]  # 7 twice; 9 seen after 8
    assert table.continuations([5, 2, 7]) == [1]  # key (2, 7) -> 1
    assert table.continuations([3]) == []  # never seen in any context


def test_back_off_to_shorter_contexts():
    table = NgramTable(n=4, max_entries=100)
    table.add([4, 5, 6, 4, 5, 6, 0, 5, 6], start=0)
    assert table.continuations([4, 5, 6]) == [0, 4]  # once each; 0 came later
    assert table.continuations([9, 5, 6]) == [0, 4]  # (9, 5, 6) unseen -> (5, 6)
    assert table.continuations([9, 9, 6]) == [0, 4]  # -> (6,)
    assert table.continuations([0]) == [5]


def test_adding_in_pieces_equals_adding_at_once():
    sequence = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4]
    whole, pieces = NgramTable(3, 1000), NgramTable(3, 1000)
    whole.add(sequence, start=0)
    done = 0
    for end in (1, 5, 6, 13, len(sequence)):  # how the drafter indexes a growing sequence
        pieces.add(sequence[:end], start=done)
        done = end
    for context in ([3], [5], [9, 3], [3, 5], [1], [2, 3]):
        assert pieces.continuations(context) == whole.continuations(context)
    assert len(pieces) == len(whole)


def test_the_cap_evicts_the_least_recently_updated_context():
    table = NgramTable(n=2, max_entries=2)
    table.add([1, 2, 3], start=0)  # contexts (1,), (2,)
    table.add([1, 2, 3, 1], start=3)  # (3,) is new: (1,) was updated least recently -> evicted
    assert len(table) == 2
    assert table.continuations([1]) == []
    assert table.continuations([3]) == [1]


def test_drafter_drafts_the_prompts_repeats_as_a_tree():
    drafter = METHODS.build("ngram", {"branching": [2, 1, 1]}, Models(CausalLM(random_llama(0, vocab=16)), None))
    drafter.reset()
    prompt = (1, 2, 3, 1, 2, 4, 1, 2, 3, 9, 1)
    tree = drafter.draft(DraftContext(prompt, Sampling(), torch.Generator(), max_depth=8))
    # root 1: (9, 1) unseen, back off to (1,) -> only 2; (1, 2) -> 3 (twice), 4: one child per node at
    # depth 2 -> 3; (2, 3) -> 1, 9 once each, 9 later -> 9
    assert tree.tokens == (1, 2, 3, 9)
    assert tree.parents == (-1, 0, 1, 2)
    assert tree.q is None


def test_keep_table_decides_what_survives_a_new_prompt():
    models = Models(CausalLM(random_llama(0, vocab=16)), None)
    for keep in (False, True):
        drafter = METHODS.build("ngram", {"keep_table": keep}, models)
        drafter.reset()
        drafter.draft(DraftContext((1, 2, 3, 4), Sampling(), torch.Generator(), max_depth=4))
        drafter.reset()
        assert (len(drafter.table) > 0) is keep


def test_ngram_is_greedy_lossless_and_accepts_drafts():
    target = random_llama(seed=1, vocab=16, layers=2, hidden=32)
    reference = Decoder(CausalLM(target), METHODS.build("ar", {}, Models(CausalLM(target), None)))
    for knobs in ({}, {"n": 2, "branching": [1, 1, 1, 1]}, {"n": 5, "tree_size": 6, "max_entries": 8}):
        models = Models(CausalLM(target), None)
        decoder = Decoder(models.target, METHODS.build("ngram", knobs, models))
        accepted = 0
        for prompt in ([1, 2, 3, 1, 2, 3], [5], [7, 7, 7]):
            got = decoder.generate(prompt, 48)
            assert got.tokens == reference.generate(prompt, 48).tokens, knobs
            accepted += sum(s.accepted for s in got.steps)
        assert accepted > 0, knobs


def test_ngram_knob_errors():
    with pytest.raises(ValueError, match="ngram.*n:"):
        METHODS.knobs("ngram", {"n": 1})
    with pytest.raises(ValueError, match="max_entries"):
        METHODS.knobs("ngram", {"max_entries": 0})
    with pytest.raises(ValueError, match="branching entries must be integers >= 1"):
        METHODS.knobs("ngram", {"branching": [2, 0]})
    with pytest.raises(ValueError, match=r"ngram: tree_size=600 makes a draft tree of 600 nodes; .* allows 1\.\.254"):
        METHODS.build("ngram", {"tree_size": 600}, Models(CausalLM(random_llama(0, vocab=16)), None))
