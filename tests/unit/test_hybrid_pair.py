"""The hybrid pair: `spectune models build --preset hybrid-micro` gives a Bamba target of Mamba-2 and attention
layers and a Llama drafter on one tokenizer, both loading through `from_pretrained`, deterministically."""

import json
import math
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from spectune.engine.runner import CausalLM
from spectune.models.build import build_pair
from spectune.models.cache import is_cached
from spectune.models.presets import PRESETS, effective_spec, preset_spec


def test_hybrid_micro_loads_and_is_trained(hybrid_micro_pair: Path) -> None:
    target = AutoModelForCausalLM.from_pretrained(hybrid_micro_pair / "target")
    drafter = AutoModelForCausalLM.from_pretrained(hybrid_micro_pair / "drafter")
    card = json.loads((hybrid_micro_pair / "card.json").read_text())
    assert target.config.model_type == card["target"]["architecture"] == "bamba"
    assert drafter.config.model_type == card["drafter"]["architecture"] == "llama"
    assert target.config.layers_block_type == ["linear_attention", "full_attention"] * 2
    tok_t, tok_d = AutoTokenizer.from_pretrained(hybrid_micro_pair / "target"), AutoTokenizer.from_pretrained(
        hybrid_micro_pair / "drafter")
    assert tok_t.get_vocab() == tok_d.get_vocab() and target.config.vocab_size == drafter.config.vocab_size == 512
    uniform = math.log(512)
    assert card["target"]["heldout_loss"] < uniform - 1.5 and card["drafter"]["heldout_loss"] < uniform - 1.5
    assert card["target"]["heldout_loss"] < card["drafter"]["heldout_loss"]


def test_hybrid_target_continues_its_cache_like_a_full_forward(hybrid_micro_pair: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(hybrid_micro_pair / "target").eval()
    ids = list(range(3, 43))
    with torch.inference_mode():
        full = model(input_ids=torch.tensor([ids])).logits[0]  # [40, V]
    lm = CausalLM(model)
    parts = [lm.forward(ids[:17]), lm.forward(ids[17:30]), *(lm.forward([t]) for t in ids[30:])]
    torch.testing.assert_close(torch.cat(parts), full, atol=1e-5, rtol=0)


def test_hybrid_build_is_deterministic_and_cached(tmp_path: Path) -> None:
    a = build_pair("hybrid-micro", tmp_path / "a", seed=0, progress=False, steps=5)
    b = build_pair("hybrid-micro", tmp_path / "b", seed=0, progress=False, steps=5)
    for role in ("target", "drafter"):
        assert (a / role / "model.safetensors").read_bytes() == (b / role / "model.safetensors").read_bytes(), role
    p = PRESETS["hybrid-micro"]
    assert is_cached(a, p, 0, effective_spec(p.target, 5), effective_spec(p.drafter, 5))


def test_all_attention_presets_record_no_ssm_key() -> None:
    """Their cards read as before hybrids existed, so the cached micro and tiny pairs stay cached."""
    assert "ssm" not in preset_spec(PRESETS["micro"])["target"]
    assert preset_spec(PRESETS["hybrid-micro"])["target"]["ssm"]["attention_layers"] == [1, 3]


def test_a_hybrid_target_is_not_compiled(hybrid_micro_pair: Path) -> None:
    import pytest

    from spectune.pair import load_pair
    from spectune.pair_ref import PairError, PairRef

    with pytest.raises(PairError, match="compile: BambaForCausalLM is a hybrid SSM-attention target"):
        load_pair(PairRef.model_validate({"dir": hybrid_micro_pair, "compile": True}))
