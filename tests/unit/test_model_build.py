"""`spectune models build`: the offline target/drafter pairs trained on the stdlib."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from spectune.models.build import build_pair
from spectune.models.cache import is_cached
from spectune.models.losses import exit_logits, exit_loss_weights, layer_losses
from spectune.models.presets import PRESETS, default_pair_dir, effective_spec
from spectune.models.tokenizer import EOS_ID, train_tokenizer
from spectune.models.corpus import is_heldout, list_stdlib_files

CODE = (
    "import os\n\n"
    "class Foo(object):\n"
    "    def bar(self, x: int = 3) -> dict[str, int]:\n"
    "\t\treturn {'a': x ** 2, \"b\": [i for i in range(10)]}  # héllo ✓ 日本\r\n"
    "    async def baz(self):\n        await something()   \n\n\n"
)


def _card(pair: Path) -> dict:
    return json.loads((pair / "card.json").read_text())


def test_micro_pair_loads_and_is_trained(micro_pair: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = AutoModelForCausalLM.from_pretrained(micro_pair / "target")
    drafter = AutoModelForCausalLM.from_pretrained(micro_pair / "drafter")
    tok_t = AutoTokenizer.from_pretrained(micro_pair / "target")
    tok_d = AutoTokenizer.from_pretrained(micro_pair / "drafter")
    card = _card(micro_pair)

    vocab = card["vocab_size"]
    assert target.config.vocab_size == drafter.config.vocab_size == len(tok_t) == len(tok_d) == vocab
    assert tok_t.get_vocab() == tok_d.get_vocab()
    assert tok_t.eos_token == "<|endoftext|>" and tok_t.eos_token_id == target.config.eos_token_id
    assert target.generation_config.eos_token_id == tok_t.eos_token_id
    assert target.generation_config.pad_token_id == tok_t.pad_token_id is not None

    n_t = sum(p.numel() for p in target.parameters())
    n_d = sum(p.numel() for p in drafter.parameters())
    assert n_d * 4 < n_t
    assert card["target"]["n_params"] == n_t and card["drafter"]["n_params"] == n_d
    assert target.config.num_hidden_layers == card["target"]["n_layers"] > drafter.config.num_hidden_layers == 1

    per_layer = card["target"]["heldout_loss_per_layer"]
    assert len(per_layer) == target.config.num_hidden_layers
    uniform = math.log(vocab)
    assert per_layer[-1] < uniform - 1.5, (per_layer, uniform)
    assert card["drafter"]["heldout_loss"] < uniform - 1.5
    assert all(math.isfinite(x) for x in per_layer)
    assert card["corpus"]["n_files_train"] > 0 and card["corpus"]["n_files_heldout"] > 0

    # greedy generate runs and stops within the budget
    ids = tok_t(CODE, return_tensors="pt").input_ids
    out = target.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] <= ids.shape[1] + 8


def test_layer_losses_last_layer_equals_hf_loss(micro_pair: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(micro_pair / "target").eval()
    tok = AutoTokenizer.from_pretrained(micro_pair / "target")
    window = tok(CODE * 3, return_tensors="pt").input_ids[:, :200]
    with torch.no_grad():
        losses = layer_losses(model, window)
        hf = model(input_ids=window, labels=window).loss
        out = model(input_ids=window[:, :-1], output_hidden_states=True)
    assert len(losses) == model.config.num_hidden_layers
    assert torch.allclose(losses[-1], hf, atol=1e-5), (losses[-1], hf)
    # the last hidden state is already normed; exit_logits must not norm it again
    assert torch.allclose(exit_logits(model, out.hidden_states, len(losses)), out.logits, atol=1e-5)
    # an intermediate exit differs from the final one
    assert not torch.allclose(exit_logits(model, out.hidden_states, 1), out.logits)


def test_build_is_deterministic_and_cached(tmp_path: Path) -> None:
    a = build_pair("micro", tmp_path / "a", seed=0, progress=False, steps=20)
    b = build_pair("micro", tmp_path / "b", seed=0, progress=False, steps=20)
    c = build_pair("micro", tmp_path / "c", seed=1, progress=False, steps=20)
    for role in ("target", "drafter"):
        wa = (a / role / "model.safetensors").read_bytes()
        assert wa == (b / role / "model.safetensors").read_bytes(), role
        assert wa != (c / role / "model.safetensors").read_bytes(), role
        assert (a / role / "tokenizer.json").read_bytes() == (b / role / "tokenizer.json").read_bytes()
    card = _card(a)
    assert card["seed"] == 0 and card["target"]["train_steps"] == card["drafter"]["train_steps"] == 20
    assert card["preset"] == "micro" and card["steps_override"] == 20

    # same preset/seed/steps: cached, nothing rewritten
    mtime = (a / "target" / "model.safetensors").stat().st_mtime_ns
    assert build_pair("micro", a, seed=0, progress=False, steps=20) == a
    assert (a / "target" / "model.safetensors").stat().st_mtime_ns == mtime
    # another step count or seed is not a cache hit
    p = PRESETS["micro"]
    assert is_cached(a, p, 0, effective_spec(p.target, 20), effective_spec(p.drafter, 20))
    assert not is_cached(a, p, 0, effective_spec(p.target, 21), effective_spec(p.drafter, 21))
    assert not is_cached(a, p, 1, effective_spec(p.target, 20), effective_spec(p.drafter, 20))
    # the build leaves torch's global state as it found it
    assert not torch.are_deterministic_algorithms_enabled()


def test_tokenizer_round_trip(micro_pair: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(micro_pair / "target")
    for text in (CODE, "", " ", "x", "\n\n\t  \r\n", "<not special> 🐍"):
        ids = tok(text)["input_ids"]
        assert tok.decode(ids) == text
    ids = tok(CODE)["input_ids"]
    assert tok.eos_token_id not in ids  # no bos/eos added to plain text
    assert len(ids) < len(CODE.encode("utf-8"))  # merges compress

    raw = train_tokenizer([CODE * 20, "def main():\n    pass\n" * 50], vocab_size=300)
    assert raw.decode(raw.encode(CODE).ids) == CODE
    assert raw.token_to_id("<|endoftext|>") == EOS_ID


def test_unknown_preset(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown model-pair preset 'huge'.*micro.*tiny"):
        build_pair("huge", tmp_path / "x")
    with pytest.raises(ValueError, match="micro"):
        default_pair_dir("huge")
    assert not (tmp_path / "x").exists()


def test_unwritable_out_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match="cannot write the model pair to"):
        build_pair("micro", blocker / "pair", progress=False, steps=1)


def test_default_pair_dir(tmp_cache: Path) -> None:
    assert default_pair_dir("tiny") == tmp_cache / "pairs" / "tiny-seed0"
    assert default_pair_dir("micro", seed=3) == tmp_cache / "pairs" / "micro-seed3"


def test_exit_loss_weights() -> None:
    for n in (1, 2, 4, 6):
        w = exit_loss_weights(n)
        assert len(w) == n and math.isclose(sum(w), 1.0)
        assert all(x <= y for x, y in zip(w, w[1:])) and w[-1] >= 0.5
    assert exit_loss_weights(6)[-1] == pytest.approx(0.5)


def test_corpus_split_is_deterministic() -> None:
    files = list_stdlib_files()
    assert files == sorted(files) and len(files) > 100
    assert not any(part in ("test", "tests", "idlelib", "site-packages") for f in files for part in f.split("/"))
    held = [f for f in files if is_heldout(f)]
    assert 0.03 * len(files) < len(held) < 0.2 * len(files)
    assert held == [f for f in list_stdlib_files() if is_heldout(f)]
