"""Methods declare whether they decode a hybrid SSM-attention target (`Method.hybrid`); the others refuse one
at build with a one-line reason; `spectune methods` shows which; a checkpoint transformers cannot load is a
one-line error."""

import json
import shutil
from pathlib import Path

import pytest

from spectune.cli.methods_cmd import method_rows
from spectune.engine.runner import CausalLM
from spectune.methods import METHODS
from spectune.methods.base import Models
from spectune.pair import load_pair
from spectune.pair_ref import PairError, PairRef
from support import random_bamba, random_llama

HYBRID = Models(CausalLM(random_bamba(seed=0)), CausalLM(random_llama(seed=0, vocab=32)))
REFUSED = [name for name in METHODS.names() if not METHODS.get(name).hybrid]


def test_the_chain_and_tree_methods_decode_hybrids_and_the_rest_say_why_not():
    for name in ("ar", "sps", "pld", "tree", "stree", "dytree"):
        assert METHODS.get(name).hybrid, name
    assert {"eagle", "medusa", "layerskip", "pearl"} <= set(REFUSED)
    for name in REFUSED:
        assert METHODS.get(name).hybrid_refusal, name


@pytest.mark.parametrize("name", REFUSED)
def test_a_method_without_hybrid_support_refuses_a_hybrid_target_at_build(name):
    with pytest.raises(ValueError) as err:
        METHODS.build(name, {}, HYBRID)
    message = str(err.value)
    assert message.startswith(f"method {name!r} cannot decode a hybrid SSM-attention target: ") and "\n" not in message


def test_spectune_methods_shows_hybrid_support():
    rows = {row[0]: row[-1] for row in method_rows()}
    assert rows["`stree`"] == "yes" and rows["`eagle`"].startswith("no: its trained heads")


def test_a_checkpoint_whose_architecture_transformers_cannot_load_is_a_one_line_error(hybrid_micro_pair, tmp_path):
    bad = tmp_path / "target"
    shutil.copytree(hybrid_micro_pair / "target", bad)
    config = json.loads((bad / "config.json").read_text())
    config.update(model_type="mambaformer_x", architectures=["MambaformerXForCausalLM"])
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(PairError) as err:
        load_pair(PairRef.model_validate({"target": str(bad)}))
    message = str(err.value)
    assert "\n" not in message and "mambaformer_x" in message and message.startswith(f"cannot load model {bad}")
