"""Prompt lookup: the suffix search and the trie that merges several matches' continuations."""

import pytest

from spectune.trees.draft import tree_layout
from spectune.methods import METHODS
from spectune.engine.drafter import DraftContext
from spectune.methods.builtin import continuation_trie, lookup
from spectune.engine.sampling import Sampling

import torch


def test_one_match_is_the_latest_occurrence_of_the_longest_suffix():
    seq = [5, 6, 7, 1, 5, 6, 8, 2, 9, 5, 6]
    assert lookup(seq, 1, 3, 3) == [[8, 2, 9]]  # "5 6" last seen at 4, followed by 8 2 9


def test_several_matches_most_recent_first_then_shorter_ngrams():
    seq = [5, 6, 7, 1, 5, 6, 8, 2, 4, 6, 3, 5, 6]
    # "5 6" at 4 then 0; then "6" alone adds position 9 (positions already used are skipped)
    assert lookup(seq, 1, 2, 2, matches=3) == [[8, 2], [7, 1], [3, 5]]
    assert lookup(seq, 2, 2, 2, matches=5) == [[8, 2], [7, 1]]  # min_ngram 2: only the two full matches


def test_no_match_drafts_nothing():
    assert lookup([1, 2, 3, 4], 1, 3, 5, matches=4) == []
    tree = continuation_trie(4, [])
    assert tree.tokens == (4,) and tree.parents == (-1,)


def test_trie_shares_common_prefixes_and_keeps_siblings_distinct():
    tree = continuation_trie(0, [[1, 2, 3], [1, 2, 4], [5], [1, 2, 3]])
    assert tree.tokens == (0, 1, 2, 3, 4, 5)
    assert tree.parents == (-1, 0, 1, 2, 2, 0)
    layout = tree_layout(tree.parents)
    for kids in layout.children:
        assert len({tree.tokens[k] for k in kids}) == len(kids)


def test_one_continuation_is_a_chain():
    tree = continuation_trie(9, [[3, 3, 3]])
    assert tree_layout(tree.parents).is_chain and tree.tokens == (9, 3, 3, 3)


def test_drafter_stays_inside_its_declared_budget_and_the_remaining_depth():
    drafter = METHODS.build("pld", {"matches": 3, "draft_len": 4, "max_ngram": 1}, None)
    assert drafter.max_tree_size == 12
    seq = tuple([1, 2, 3, 4, 5] * 6 + [1, 7, 8, 9, 10, 1, 11, 12, 1])
    tree = drafter.draft(DraftContext(seq, Sampling(), torch.Generator(), max_depth=2))
    assert 1 < tree.size <= 12 and tree_layout(tree.parents).depth <= 2
    assert not tree_layout(tree.parents).is_chain  # "1" was followed by 11, 7 and 2


def test_matches_out_of_range_is_named():
    with pytest.raises(ValueError, match="matches"):
        METHODS.knobs("pld", {"matches": 0})
