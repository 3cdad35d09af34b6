"""The registry's validated configurations: knobs kept as given, the store's knob columns named by each method."""

import json

import pytest

from spectune.config import DecodeConfig, KnobColumns
from spectune.engine.drafter import Drafter
from spectune.methods import METHODS
from spectune.methods.base import Knobs
from spectune.methods.registry import MethodRegistry

# method -> (knobs as a user gives them, the columns they fill)
CASES = {
    "ar": ({}, KnobColumns()),
    "sps": ({"draft_len": 5, "schedule": "heuristic"}, KnobColumns(draft_len=5)),
    "pearl": ({"gamma": 3}, KnobColumns(draft_len=3)),
    "layerskip": ({"exit_layer": 1, "draft_len": 2}, KnobColumns(draft_len=2, exit_layer=1)),
    "del": ({"max_draft_len": 4, "max_exit_layer": 2}, KnobColumns()),
    "pld": ({"draft_len": 7, "matches": 2}, KnobColumns(draft_len=7)),
    "tree": ({"branching": [3, 2, 1]}, KnobColumns(tree_shape="[3,2,1]")),
    "stree": ({"branching": [3, 2, 1], "verify": "branches"}, KnobColumns(tree_shape="[3,2,1]")),
    "rsd": ({"branching": [2, 1], "width": 5}, KnobColumns(tree_shape="[2,1]")),
    "specinfer": ({"width": 4, "depth": 2}, KnobColumns()),
    "ngram": ({"paths": [[0], [0, 0], [1]], "n": 4}, KnobColumns(tree_shape="[[0],[0,0],[1]]")),
    "recycling": ({"branching": [4, 2], "k": 4}, KnobColumns(tree_shape="[4,2]")),
    "dytree": ({"budget": 20, "max_depth": 3}, KnobColumns(node_budget=20)),
    "sequoia": ({"budget": 8}, KnobColumns(node_budget=8)),
    "medusa": ({"paths": [[0], [1], [0, 0]]}, KnobColumns(tree_shape="[[0],[1],[0,0]]")),
    "hydra": ({"branching": [3, 2], "heads": "/somewhere"}, KnobColumns(tree_shape="[3,2]")),
    "eagle": ({"budget": 24}, KnobColumns(node_budget=24)),
    "eagle3": ({"budget": 12, "topk": 3}, KnobColumns(node_budget=12)),
    "rasd": ({"retrieval_depth": 6, "draft_depth": 3, "budget": 20}, KnobColumns(draft_len=6, node_budget=20)),
    "rasd-eagle3": ({"draft_depth": 5, "budget": 9}, KnobColumns(draft_len=5, node_budget=9)),  # no retrieval_depth given
    "falcon": ({"block": 3, "passes": 2, "budget": 20}, KnobColumns(draft_len=5, node_budget=20)),  # 20 ranked nodes reach depth 5 of 6
    "ppd": ({"budget": 12, "prompts": 2}, KnobColumns(node_budget=12, draft_len=2)),
    "hidden-transfer": ({"budget": 10, "positions": 2}, KnobColumns(node_budget=10, draft_len=2)),
}


def test_the_cases_cover_every_registered_method():
    assert sorted(CASES) == METHODS.names()


@pytest.mark.parametrize("method", sorted(CASES))
def test_config_keeps_the_knobs_as_given_and_fills_the_methods_columns(method):
    knobs, columns = CASES[method]
    config = METHODS.config(method, knobs, temperature=0.7, name="mine")
    assert isinstance(config, DecodeConfig)
    assert (config.method, config.knobs, config.temperature, config.name) == (method, knobs, 0.7, "mine")
    assert config.columns == columns


def test_columns_take_the_first_knob_given_and_leave_defaults_out(tmp_path):
    assert METHODS.config("sps", {}).columns == KnobColumns()  # the default draft_len is the method's, not the user's
    assert METHODS.config("tree", {"paths": [[0], [1]]}).columns.tree_shape == json.dumps([[0], [1]], separators=(",", ":"))
    tree_file = tmp_path / "tree.json"
    tree_file.write_text(json.dumps({"paths": [[0], [0, 0]]}))
    assert METHODS.config("tree", {"paths_file": str(tree_file)}).columns.tree_shape == str(tree_file)
    coerced = METHODS.config("dytree", {"budget": 12.0})  # pydantic accepts an integral float for an int knob
    assert coerced.knobs == {"budget": 12.0} and coerced.columns.node_budget == 12
    assert type(coerced.columns.node_budget) is int
    # a column derived from several knobs (falcon's draft_len: its tree's depth), only once they say it
    assert METHODS.config("falcon", {}).columns == KnobColumns()
    assert METHODS.config("falcon", {"branching": [4, 2, 1, 1]}).columns == KnobColumns(draft_len=4, tree_shape="[4,2,1,1]")
    assert METHODS.config("falcon", {"block": 2, "passes": 3, "budget": 4, "topk": 1}).columns.draft_len == 4


def test_config_refuses_bad_knobs_like_knobs_does():
    with pytest.raises(ValueError, match=r"bad knobs for method 'sps': draft_len"):
        METHODS.config("sps", {"draft_len": 0})
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        METHODS.config("nope", {})


class OneKnob(Knobs):
    size: int = 1


class Nothing(Drafter):
    max_tree_size = 0

    def draft(self, context):
        raise NotImplementedError


def test_register_refuses_columns_that_name_no_column_or_no_knob():
    registry = MethodRegistry()
    common = {"needs_drafter": False, "summary": "s", "paper": "p", "cost": "c", "rule": "r"}
    with pytest.raises(ValueError, match="'depth' is no knob column"):
        registry.register("x", OneKnob, columns={"depth": ("size",)}, **common)
    with pytest.raises(ValueError, match=r"column 'draft_len' names no knob of OneKnob: \['length'\]"):
        registry.register("x", OneKnob, columns={"draft_len": ("length",)}, **common)
    registry.register("x", OneKnob, columns={"draft_len": ("size",)}, **common)(lambda knobs, models: Nothing())
    assert registry.get("x").columns == {"draft_len": ("size",)}
    assert registry.config("x", {"size": 3}).columns == KnobColumns(draft_len=3)
