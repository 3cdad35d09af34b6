"""Sequoia: the DP against brute force over every small tree, the hardware-aware choice, the files, the method."""

import json
from functools import lru_cache

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spectune.engine.loop import Decoder
from spectune.engine.runner import CausalLM
from spectune.trees.sequoia import (
    Profile,
    SequoiaTable,
    check_acceptance,
    hardware_aware_tree,
    optimal_tree,
    step_cost_ms,
    tree_value,
)
from spectune.trees.shapes import paths_shape
from spectune.methods import METHODS
from spectune.methods.base import Models
from spectune.trees.files import load_acceptance, load_profile
from support import random_llama

torch.set_num_threads(1)


# --- brute force: every ordered tree of up to 6 nodes -----------------------------------------


@lru_cache(maxsize=None)
def trees(nodes: int, levels: int) -> tuple:
    """Every ordered rooted tree of `nodes` nodes and at most `levels` levels (a tree = its children)."""
    if levels == 0 or nodes < 1:
        return ()
    return forests(nodes - 1, levels - 1)


@lru_cache(maxsize=None)
def forests(nodes: int, levels: int) -> tuple:
    if nodes == 0:
        return ((),)
    out = []
    for first in range(1, nodes + 1):
        for head in trees(first, levels):
            for rest in forests(nodes - first, levels):
                out.append((head,) + rest)
    return tuple(out)


def as_paths(children, prefix=()):
    out = []
    for rank, grandchildren in enumerate(children):
        out.append(prefix + (rank,))
        out += as_paths(grandchildren, prefix + (rank,))
    return out


def depth_of(paths):
    return max((len(p) for p in paths), default=0)


def test_enumeration_counts_are_catalan_numbers():
    assert [len(trees(n, n)) for n in range(1, 7)] == [1, 1, 2, 5, 14, 42]


acceptance_vectors = st.lists(st.floats(0.0, 1.0), min_size=1, max_size=5).map(
    lambda xs: [x / max(sum(xs), 1.0) for x in xs]  # disjoint events: sum <= 1
)


@settings(max_examples=40, deadline=None)
@given(acceptance_vectors, st.integers(1, 5))
def test_dp_equals_brute_force_for_every_size_and_depth(acceptance, max_depth):
    table = SequoiaTable(acceptance, budget=5, max_depth=max_depth)
    for nodes in range(2, 7):
        for depth in range(1, max_depth + 1):
            candidates = [as_paths(t) for t in trees(nodes, depth + 1)]
            candidates = [p for p in candidates if max(r for path in p for r in path) < len(acceptance)]
            if not candidates:
                assert table.expected_tokens(nodes, depth) == float("-inf")
                continue
            best = max(tree_value(p, acceptance) for p in candidates)
            assert table.expected_tokens(nodes, depth) == pytest.approx(best, abs=1e-12)
            tree = table.tree(nodes, depth)
            assert tree.size == nodes - 1 and tree.depth <= depth
            assert tree_value(tree.paths, acceptance) == pytest.approx(best, abs=1e-12)
            assert paths_shape([list(p) for p in tree.paths]).size == nodes - 1  # a valid path list


@settings(max_examples=25, deadline=None)
@given(
    acceptance_vectors,
    st.floats(0.5, 5.0),
    st.floats(0.0, 2.0),
    st.floats(0.1, 3.0),
    st.integers(1, 5),
)
def test_hardware_aware_choice_is_the_fastest_tree_per_token(acceptance, base_ms, per_token_ms, draft_ms, max_depth):
    """With drafting time flat in width, the (n, d) search over DP trees is exact: check against every tree."""
    budget = 5
    target = tuple(base_ms + per_token_ms * n for n in range(budget + 1))
    profile = Profile(target, (draft_ms,) * (budget + 1))
    chosen = hardware_aware_tree(acceptance, budget, max_depth, profile)
    best = min(
        step_cost_ms(optimal_like(p, acceptance), profile) / tree_value(p, acceptance)
        for nodes in range(2, budget + 2)
        for t in trees(nodes, max_depth + 1)
        if (p := as_paths(t)) and max(r for path in p for r in path) < len(acceptance)
    )
    assert chosen.step_ms / chosen.expected_tokens == pytest.approx(best, rel=1e-9)
    assert chosen.size <= budget and chosen.depth <= max_depth


def optimal_like(paths, acceptance):
    from spectune.trees.sequoia import SequoiaTree

    return SequoiaTree(tuple(paths), len(paths), depth_of(paths), tree_value(paths, acceptance))


def test_known_trees():
    assert optimal_tree([1.0], budget=4, max_depth=4).paths == ((0,), (0, 0), (0, 0, 0), (0, 0, 0, 0))
    assert optimal_tree([1.0], budget=4, max_depth=4).expected_tokens == 5.0
    star = optimal_tree([0.3, 0.25, 0.2, 0.15], budget=4, max_depth=1)
    assert sorted(star.paths) == [(0,), (1,), (2,), (3,)]
    assert star.expected_tokens == pytest.approx(1.9)


def test_expensive_verification_prefers_a_small_tree():
    acceptance = [0.6, 0.2, 0.1]
    flat = Profile(tuple(10.0 for _ in range(17)), (1.0,) * 17)
    steep = Profile(tuple(10.0 + 10.0 * n for n in range(17)), (1.0,) * 17)
    assert hardware_aware_tree(acceptance, 16, 6, flat).size == 16
    assert hardware_aware_tree(acceptance, 16, 6, steep).size < 4


def test_a_large_budget_solves_fast():
    tree = optimal_tree([0.5, 0.1, 0.05, 0.03, 0.02, 0.01, 0.01, 0.01], budget=128, max_depth=16)
    assert tree.size == 128 and tree.depth <= 16


@pytest.mark.parametrize(
    "acceptance, message",
    [([], "at least one"), ([0.5, 1.5], r"in \[0, 1\]"), ([0.7, 0.6], "sum to <= 1")],
)
def test_bad_acceptance_is_named(acceptance, message):
    with pytest.raises(ValueError, match=message):
        check_acceptance(acceptance)


def test_budget_and_depth_must_be_positive():
    with pytest.raises(ValueError, match="budget must be >= 1"):
        SequoiaTable([0.5], budget=0, max_depth=2)
    with pytest.raises(ValueError, match="max_depth must be >= 1"):
        SequoiaTable([0.5], budget=2, max_depth=0)


def test_a_short_profile_says_how_long_it_must_be():
    with pytest.raises(ValueError, match="--max-tokens 9"):
        hardware_aware_tree([0.5], 8, 3, Profile((1.0,) * 4, ()))


# --- files --------------------------------------------------------------------------------------


def test_files_load_and_bad_files_name_the_file_and_field(tmp_path):
    good = tmp_path / "acc.json"
    good.write_text(json.dumps({"acceptance": [0.5, 0.2], "steps": 10}))
    assert load_acceptance(good) == (0.5, 0.2)
    bare = tmp_path / "bare.json"
    bare.write_text("[0.4]")
    assert load_acceptance(bare) == (0.4,)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json is not valid JSON"):
        load_acceptance(broken)
    with pytest.raises(ValueError, match="missing.json does not exist"):
        load_acceptance(tmp_path / "missing.json")
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"acceptance": [0.9, 0.9]}))
    with pytest.raises(ValueError, match="wrong.json: acceptance: .*sum to <= 1"):
        load_acceptance(wrong)
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"past": 8, "target_ms": [1.0, 0.0]}))
    with pytest.raises(ValueError, match="profile.json: target_ms: .*> 0 ms"):
        load_profile(profile)


# --- the method ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models():
    return random_llama(seed=31, vocab=16, layers=2, hidden=32), random_llama(seed=32, vocab=16, layers=1, hidden=32)


def test_method_drafts_the_dp_tree_and_equals_autoregressive(models):
    target, _ = models
    pair = Models(CausalLM(target), CausalLM(target))  # self-drafted: deep paths get accepted
    knobs = {"budget": 6, "max_depth": 3, "acceptance": [0.7, 0.2]}
    drafter = METHODS.build("sequoia", knobs, pair)
    expected = optimal_tree([0.7, 0.2], 6, 3)
    assert drafter.shape == paths_shape([list(p) for p in expected.paths])
    ar = Decoder(CausalLM(target), METHODS.build("ar", {}, pair))
    got = Decoder(pair.target, drafter).generate([3, 1, 4], 24)
    assert got.tokens == ar.generate([3, 1, 4], 24).tokens
    assert len(got.tokens) / got.target_calls > 2


def test_method_reads_measured_files(models, tmp_path):
    target, drafter = models
    pair = Models(CausalLM(target), CausalLM(drafter))
    (tmp_path / "acc.json").write_text(json.dumps({"acceptance": [0.5, 0.3, 0.1]}))
    (tmp_path / "prof.json").write_text(json.dumps({"past": 16, "target_ms": [5.0 + 2.0 * n for n in range(10)], "drafter_ms": [1.0] * 10}))
    knobs = {"budget": 8, "max_depth": 4, "acceptance_file": str(tmp_path / "acc.json"), "profile_file": str(tmp_path / "prof.json")}
    built = METHODS.build("sequoia", knobs, pair)
    chosen = hardware_aware_tree([0.5, 0.3, 0.1], 8, 4, load_profile(tmp_path / "prof.json"))
    assert built.shape.size == chosen.size < 8  # verification cost grows: a smaller tree wins


def test_method_bad_knobs_name_the_field(models, tmp_path):
    target, drafter = models
    pair = Models(CausalLM(target), CausalLM(drafter))
    with pytest.raises(ValueError, match=r"sequoia: budget=300 .* allows 1\.\.254"):
        METHODS.build("sequoia", {"budget": 300}, pair)
    with pytest.raises(ValueError, match="acceptance: .*sum to <= 1"):
        METHODS.knobs("sequoia", {"acceptance": [0.8, 0.8]})
    with pytest.raises(ValueError, match="not both"):
        METHODS.knobs("sequoia", {"acceptance": [0.5], "acceptance_file": "x.json"})
    with pytest.raises(ValueError, match="nowhere.json does not exist"):
        METHODS.knobs("sequoia", {"acceptance_file": str(tmp_path / "nowhere.json")})
