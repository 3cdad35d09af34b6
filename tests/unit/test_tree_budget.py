"""The build-time tree budget: every registered method refuses, when built and before any decoding, a draft
tree the model context cannot hold (one check, in `MethodRegistry.build`, against the drafter's max_tree_size)."""

import re

import pytest
from transformers import AutoModelForCausalLM

from spectune.engine.runner import CausalLM
from spectune.methods import METHODS
from spectune.methods.base import Models
from support import random_llama

CONTEXT = 16  # positions: one prompt token and one new token leave room for trees of 1..14 nodes
LARGEST = CONTEXT - 2

# method -> knobs whose largest tree has more than LARGEST nodes
TOO_BIG = {
    "sps": {"draft_len": 20},
    "pearl": {"gamma": 20, "parallel": False},
    "layerskip": {"draft_len": 20},
    "del": {"max_draft_len": 20, "cost": "layers"},
    "pld": {"draft_len": 10, "matches": 2},
    "tree": {"branching": [4, 4]},
    "stree": {"branching": [4, 4]},
    "rsd": {"width": 20, "depth": 1},
    "specinfer": {"width": 5, "depth": 4},
    "ngram": {"tree_size": 20},
    "recycling": {"tree_size": 20},
    "dytree": {"budget": 20},
    "sequoia": {"budget": 64},
    "medusa": {"tree_size": 20},
    "hydra": {"branching": [4, 4]},
    "eagle": {"budget": 20},
    "eagle3": {"budget": 20},
    "rasd": {"budget": 20},  # the fusion budget
    "rasd-eagle3": {"budget": 20},  # likewise
    "falcon": {"budget": 20},
    "ppd": {"budget": 3},  # 3 nodes + 3 prompt tokens under each of the 4 (root included): 15 positions
    "hidden-transfer": {"budget": 3},  # 3 nodes + 3 pseudo positions under each of the 4 (root included): 15
}

# methods that by construction cannot propose a tree the context could not verify, and why
CANNOT_EXCEED = {
    "ar": "drafts nothing (max_tree_size 0): every context that holds the prompt and one new token verifies it",
}


@pytest.fixture(scope="module")
def small_context(micro_pair, micro_heads) -> Models:
    """The micro pair loaded with a context of CONTEXT positions (its heads, found beside its target, still fit)."""
    def load(part: str) -> CausalLM:
        return CausalLM(AutoModelForCausalLM.from_pretrained(micro_pair / part, max_position_embeddings=CONTEXT))

    return Models(load("target"), load("drafter"))


def test_every_registered_method_is_covered():
    assert sorted([*TOO_BIG, *CANNOT_EXCEED]) == METHODS.names()


@pytest.mark.parametrize("method", sorted(TOO_BIG))
def test_a_tree_beyond_the_context_is_refused_at_build_in_one_line(small_context, method):
    with pytest.raises(ValueError) as refused:
        METHODS.build(method, TOO_BIG[method], small_context)
    message = str(refused.value)
    found = re.fullmatch(rf"{method}: .+ makes a draft tree of (\d+) nodes; the model context of {CONTEXT} "
                         rf"positions allows 1\.\.{LARGEST}", message)
    assert found, message
    assert int(found.group(1)) > LARGEST
    assert len(small_context.target.cache) == 0, "refused before the target decoded anything"


@pytest.mark.parametrize("method, fits, refused", [
    ("sps", {"draft_len": LARGEST}, {"draft_len": LARGEST + 1}),
    ("pld", {"draft_len": 7, "matches": 2}, {"draft_len": 5, "matches": 3}),
    ("layerskip", {"draft_len": LARGEST}, {"draft_len": LARGEST + 1}),
])
def test_the_check_reads_the_built_drafters_largest_tree(small_context, method, fits, refused):
    assert METHODS.build(method, fits, small_context).max_tree_size == LARGEST
    with pytest.raises(ValueError, match=rf"^{method}: .* makes a draft tree of {LARGEST + 1} nodes"):
        METHODS.build(method, refused, small_context)


def test_the_message_names_the_knobs_that_set_the_tree():
    model = CausalLM(random_llama(0, context=CONTEXT))
    with pytest.raises(ValueError, match=r"^sps: draft_len=4, max_draft_len=20 makes a draft tree of 20 nodes"):
        METHODS.build("sps", {"schedule": "heuristic", "max_draft_len": 20}, Models(model, model))
    with pytest.raises(ValueError, match=r"^pld: draft_len=10, matches=2 makes a draft tree of 20 nodes"):
        METHODS.build("pld", {"matches": 2}, Models(model, None))
    with pytest.raises(ValueError, match=r"^tree: branching=\[4, 4\] makes a draft tree of 20 nodes"):
        METHODS.build("tree", {"branching": [4, 4]}, Models(model, model))
