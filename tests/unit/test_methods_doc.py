"""docs/methods.md is generated from the registry and must stay in step with it."""

import pathlib

from spectune.cli.methods_cmd import method_rows, methods_markdown
from spectune.engine.drafter import Drafter
from spectune.methods import METHODS
from spectune.pair import load_pair
from spectune.pair_ref import PairRef

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "methods.md"


def test_methods_doc_matches_the_registry():
    assert DOC.read_text() == methods_markdown(method_rows()), "run: spectune methods --markdown > docs/methods.md"


def test_every_method_documents_paper_cost_and_rule():
    for name in METHODS.names():
        method = METHODS.get(name)
        assert method.summary and method.paper and method.cost and method.rule, name


def test_every_method_builds_from_default_knobs(micro_pair, micro_heads):
    """Each registered method's drafter, built from `{}` on the micro pair (its heads trained for the
    heads methods), as the lossless suites run every method with its defaults."""
    pair = load_pair(PairRef.model_validate({"dir": micro_pair}))
    for name in METHODS.names():
        drafter = METHODS.build(name, {}, pair.runners())
        assert isinstance(drafter, Drafter), name
        assert drafter.max_tree_size >= (0 if name == "ar" else 1), name  # all but the baseline draft a token
