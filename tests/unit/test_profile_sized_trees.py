"""Trees sized for the hardware (issue 19): dytree, EAGLE and EAGLE-3 take `profile_file` (this worker's t(n) from
`spectune trees profile`) and choose budget and depth by Sequoia's modelled time per token, never above their caps
and never beyond what the context allows (the registry's build-time check sees the sized tree)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spectune.engine.runner import CausalLM
from spectune.methods import METHODS
from spectune.methods.base import Models
from spectune.methods.dytree import DyTreeKnobs
from spectune.pair import load_pair
from spectune.pair_ref import PairRef
from support import random_llama


def profile(tmp_path: Path, name: str, target_ms: list[float]) -> str:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"past": 128, "target_ms": target_ms}))
    return str(path)


FLAT = [40.0 + 0.01 * n for n in range(600)]  # wide verifies nearly free (bf16 on AMX-like CPUs)
STEEP = [40.0 * (1 + n) for n in range(600)]  # every token costs a whole forward


def test_a_flat_cost_curve_takes_the_whole_budget_and_a_steep_one_a_small_tree(tmp_path) -> None:
    wide = DyTreeKnobs(budget=64, max_depth=8, profile_file=profile(tmp_path, "flat", FLAT)).sized()
    narrow = DyTreeKnobs(budget=64, max_depth=8, profile_file=profile(tmp_path, "steep", STEEP)).sized()
    assert wide.budget == 64 and wide.max_depth <= 8
    assert 1 <= narrow.budget <= 4 and narrow.budget < wide.budget
    assert DyTreeKnobs(budget=64).sized().budget == 64  # without a profile: the knobs as given


def test_the_profile_must_cover_the_cap_and_acceptance_needs_a_profile(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"covers 1..10 tree tokens but budget 64 needs 65"):
        DyTreeKnobs(budget=64, profile_file=profile(tmp_path, "short", FLAT[:10]))
    with pytest.raises(ValueError, match="give profile_file with it"):
        DyTreeKnobs(acceptance=[0.5, 0.1])
    with pytest.raises(ValueError, match="profile file .* does not exist"):
        DyTreeKnobs(profile_file=str(tmp_path / "none.json"))


@pytest.mark.parametrize("method", ["dytree", "eagle", "eagle3"])
def test_the_sized_tree_is_what_the_context_rule_checks(method, micro_pair, micro_heads, tmp_path) -> None:
    runners = load_pair(PairRef.model_validate({"dir": micro_pair})).runners()
    flat, steep = profile(tmp_path, "flat", FLAT), profile(tmp_path, "steep", STEEP)
    assert METHODS.build(method, {"budget": 64, "max_depth": 8, "profile_file": steep}, runners).max_tree_size <= 4
    assert METHODS.build(method, {"budget": 64, "max_depth": 8, "profile_file": flat}, runners).max_tree_size == 64


def test_a_profile_sized_tree_beyond_the_context_is_refused_before_decoding(tmp_path) -> None:
    target = CausalLM(random_llama(seed=1, vocab=16, layers=2, context=128))
    drafter = CausalLM(random_llama(seed=2, vocab=16, layers=1, context=128))
    models = Models(target, drafter)
    flat, steep = profile(tmp_path, "flat", FLAT), profile(tmp_path, "steep", STEEP)
    assert METHODS.build("dytree", {"budget": 300, "profile_file": steep}, models).max_tree_size <= 4
    with pytest.raises(ValueError, match=r"dytree: budget=(\d+) \(sized from .*flat.json\) makes a draft tree of \1 "
                                         r"nodes; the model context of 128 positions allows"):
        METHODS.build("dytree", {"budget": 300, "profile_file": flat}, models)
