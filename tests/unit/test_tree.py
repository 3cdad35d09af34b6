"""Trees as plain data: layouts, masks, positions, retrieve paths and templates, no model needed."""

import re

import pytest
import torch

from spectune.trees.shapes import branching_shape, chain_shape, paths_shape
from spectune.trees.draft import additive_mask, ancestor_matrix, retrieve_paths, tree_inputs, tree_layout

NEG = torch.finfo(torch.float32).min


def test_chain_needs_no_mask_and_counts_positions_up():
    parents = chain_shape(3).parents
    assert parents == (-1, 0, 1, 2)
    inputs = tree_inputs(parents, past_len=7)
    assert inputs.mask is None  # the model's own causal mask is identical
    assert inputs.positions.tolist() == [[7, 8, 9, 10]]
    assert retrieve_paths(parents).tolist() == [[0, 1, 2, 3]]


def test_k_ary_tree_mask_positions_and_paths():
    shape = branching_shape([2, 2])
    # root; depth 1: nodes 1, 2; depth 2: 3, 4 under 1 and 5, 6 under 2
    assert shape.parents == (-1, 0, 0, 1, 1, 2, 2)
    assert shape.ranks == (0, 0, 1, 0, 1, 0, 1)
    inputs = tree_inputs(shape.parents, past_len=2)
    assert inputs.positions.tolist() == [[2, 3, 3, 4, 4, 4, 4]]
    mask = inputs.mask[0, 0]  # [7, 2 + 7]
    assert mask.shape == (7, 9)
    assert (mask[:, :2] == 0).all()  # everyone sees the past
    allowed = mask[:, 2:] == 0
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0],
            [1, 0, 1, 0, 0, 0, 0],
            [1, 1, 0, 1, 0, 0, 0],
            [1, 1, 0, 0, 1, 0, 0],
            [1, 0, 1, 0, 0, 1, 0],
            [1, 0, 1, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(allowed, expected)
    assert (mask[:, 2:][~expected] == NEG).all()
    assert retrieve_paths(shape.parents).tolist() == [[0, 1, 3], [0, 1, 4], [0, 2, 5], [0, 2, 6]]


def test_uneven_paths_are_padded():
    shape = paths_shape([[0], [1], [0, 0], [0, 0, 0]])
    assert shape.parents == (-1, 0, 0, 1, 3)
    assert retrieve_paths(shape.parents).tolist() == [[0, 2, -1, -1], [0, 1, 3, 4]]
    layout = tree_layout(shape.parents)
    assert layout.depths == (0, 1, 1, 2, 3)
    assert layout.children == ((1, 2), (3,), (), (4,), ())
    assert not layout.is_chain


def test_medusa_path_list_round_trips_and_orders_breadth_first():
    paths = [[0], [0, 0], [1], [0, 1], [2], [0, 0, 0], [1, 0]]
    shape = paths_shape(paths)
    assert sorted(map(tuple, shape.as_paths())) == sorted(map(tuple, paths))
    depths = tree_layout(shape.parents).depths
    assert list(depths) == sorted(depths)


def test_branching_sizes():
    assert branching_shape([4, 2, 2, 1]).size == 4 + 8 + 16 + 16
    assert branching_shape([4, 2, 2, 1]).depth == 4


def test_ancestor_matrix_matches_paths():
    shape = branching_shape([3, 2])
    allowed = ancestor_matrix(shape.parents)
    for path in tree_layout(shape.parents).paths:
        leaf = path[-1]
        assert set(allowed[leaf].nonzero().flatten().tolist()) == set(path)


def test_additive_mask_dtype_and_shape():
    mask = additive_mask(torch.tensor([[True, False], [True, True]]), past_len=3, dtype=torch.bfloat16)
    assert mask.shape == (1, 1, 2, 5) and mask.dtype == torch.bfloat16
    assert mask[0, 0, 0, 4] == torch.finfo(torch.bfloat16).min


@pytest.mark.parametrize(
    "paths, message",
    [
        ([[0, 0]], "prefix [0] is not"),
        ([[0], [2]], "skips rank 1"),
        ([], "at least one path"),
        ([[0], "ab"], "path #1 must be a non-empty list"),
        ([[0], [-1]], "integer ranks >= 0"),
        ([[0], []], "path #1 must be a non-empty list"),
    ],
)
def test_malformed_path_lists_are_named(paths, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        paths_shape(paths)


@pytest.mark.parametrize("branching, message", [([], "at least one depth"), ([2, 0], ">= 1"), ([2, 1.5], "integers")])
def test_malformed_branching(branching, message):
    with pytest.raises(ValueError, match=message):
        branching_shape(branching)


def test_parents_must_precede_children():
    with pytest.raises(ValueError, match="node 2 has parent 2"):
        tree_layout((-1, 0, 2))
