"""docs/methods.md is generated from the registry and must stay in step with it."""

import pathlib

from spectune.cli.methods_cmd import method_rows, methods_markdown
from spectune.methods import METHODS

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "methods.md"


def test_methods_doc_matches_the_registry():
    assert DOC.read_text() == methods_markdown(method_rows()), "run: spectune methods --markdown > docs/methods.md"


def test_every_method_documents_paper_cost_and_rule():
    for name in METHODS.names():
        method = METHODS.get(name)
        assert method.summary and method.paper and method.cost and method.rule, name


def test_every_method_builds_from_default_knobs():
    for name in METHODS.names():
        METHODS.knobs(name, {})  # the lossless suites run every method with its defaults
