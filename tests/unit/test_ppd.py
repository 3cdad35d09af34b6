"""ppd: its sparse tree as plain data, its prompt tokens trained deterministically through a frozen target that
they leave untouched, and bad input refused in one line before any decoding."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from spectune.engine.loop import Decoder
from spectune.engine.runner import CausalLM
from spectune.heads.build import options_for, train_from_features
from spectune.heads.features import FeatureSpec, Features, feature_pass, fused_layers
from spectune.heads.spec import HeadsError
from spectune.heads.train import ppd_anchors, ppd_inputs
from spectune.methods import METHODS
from spectune.methods.base import Models
from spectune.trees.sequoia import Profile
from spectune.trees.sparse import best_paths, hardware_aware_sparse_tree, sparse_tree
from spectune.trees.shapes import paths_shape
from support import random_llama

torch.set_num_threads(1)
ROWS = ((0.5, 0.2, 0.1), (0.4, 0.1, 0.05), (0.3, 0.1, 0.0))


# --- the sparse tree ------------------------------------------------------------------------------


def test_the_best_paths_are_the_highest_products_and_prefix_closed():
    chosen = best_paths(ROWS, 6)
    assert [p for p, _ in chosen] == [(0,), (1,), (0, 0), (2,), (1, 0), (0, 0, 0)]
    assert [round(s, 4) for _, s in chosen] == [0.5, 0.2, 0.2, 0.1, 0.08, 0.06]
    paths_shape([list(p) for p, _ in chosen])  # a valid template: prefixes listed, sibling ranks contiguous
    assert all(s > 0 for _, s in best_paths(ROWS, 100))  # a zero-acceptance rank is never drafted


def test_a_rank_row_is_made_non_increasing_and_bad_rows_are_named():
    assert [p for p, _ in best_paths(((0.5, 0.1, 0.3),), 3)] == [(0,), (1,), (2,)]  # rank 2 capped at rank 1's 0.1
    with pytest.raises(ValueError, match=r"depth 2's rank acceptance must be probabilities"):
        best_paths(((0.5,), (0.7, 0.6)), 3)


def test_the_hardware_aware_tree_pays_for_its_prompt_tokens():
    flat = Profile(tuple([10.0] * 64), ())  # verifying more tokens is free: the largest tree wins
    steep = Profile(tuple(10.0 + 5.0 * n for n in range(64)), ())  # each token costs half a step: a small tree
    big = hardware_aware_sparse_tree(ROWS, 12, 3, flat)
    small = hardware_aware_sparse_tree(ROWS, 12, 3, steep)
    assert len(big.paths) == 12 and big.verified == 13 * 4
    assert len(small.paths) < len(big.paths)
    assert small.step_ms / small.expected_tokens <= min(
        steep.target(t.verified) / t.expected_tokens for t in (sparse_tree(ROWS, n, 3) for n in range(1, 13)))
    with pytest.raises(ValueError, match=r"covers 1\.\.64 tokens but a tree of budget 20 .* verifies 84"):
        hardware_aware_sparse_tree(ROWS, 20, 3, flat)


def test_the_training_layout_matches_the_verification_layout():
    """Prompt k of anchor t sits at position t+k and sees tokens 0..t and its anchor's prompts 1..k, nothing else."""
    anchors = ppd_anchors(10, 2, count=3)
    assert anchors.tolist() == [0, 4, 7]
    positions, mask = ppd_inputs(10, anchors, 2, torch.float32)
    seen = mask[0, 0] == 0  # [16, 16]
    assert positions[0, 10:].tolist() == [1, 2, 5, 6, 8, 9]
    row = 10 + 2 * 1 + 1  # anchor 4's second prompt
    assert seen[row].nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 12, 13]
    assert not seen[:10, 10:].any()  # the text never sees a prompt


# --- training ---------------------------------------------------------------------------------------


def features_of(model, folder: Path, vocab: int) -> Features:
    windows = torch.randint(vocab, (12, 32), generator=torch.Generator().manual_seed(0)).to(torch.int32)
    tensors = feature_pass(model, windows, FeatureSpec(seq_len=32, topk=4), fused_layers(2), "f", progress=False)
    save_file(tensors, str(folder / "f.safetensors"))
    return Features(folder / "f.safetensors", 2, fused_layers(2))


def train(model, folder: Path, features: Features, **overrides) -> Path:
    folder.mkdir()
    options = options_for("ppd", **{"steps": 4, "batch": 2, **overrides})
    train_from_features(model, options, features, features, folder, {}, progress=False)
    return folder


def test_training_is_deterministic_and_leaves_the_target_as_it_was(tmp_path):
    model = random_llama(seed=5, vocab=16, layers=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    features = features_of(model, tmp_path, 16)
    runs = [load_file(str(train(model, tmp_path / run, features) / "heads.safetensors")) for run in ("a", "b")]
    assert runs[0].keys() == runs[1].keys() and all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert runs[0]["embeddings"].shape == (3, 32)  # the only trained parameters: 3 prompt tokens
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())  # autograd flags restored
    card = json.loads((tmp_path / "a" / "card.json").read_text())
    assert len(card["agreement"]["by_rank"]) == 3 and len(card["agreement"]["by_rank"][0]) == 8


def test_a_draft_vocabulary_is_refused_for_ppd():
    with pytest.raises(HeadsError, match="ppd's prompt tokens are read out by the target's own LM head"):
        options_for("ppd", draft_vocab=8)


# --- bad input, before decoding ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ppd")
    model = random_llama(seed=5, vocab=16, layers=2, context=128)
    return model, train(model, folder / "ppd", features_of(model, folder, 16))


def build(model, folder, **knobs):
    return METHODS.build("ppd", {"heads": str(folder), **knobs}, Models(CausalLM(model), None))


def test_ppd_heads_for_another_target_are_refused(trained):
    _, folder = trained
    with pytest.raises(ValueError, match="ppd heads at .* were trained for another target .*same shape but weights"):
        build(random_llama(seed=6, vocab=16, layers=2, context=128), folder)
    with pytest.raises(ValueError, match=r"trained for another target .*hidden_size 64 \(heads trained for 32\)"):
        build(random_llama(seed=5, vocab=16, layers=2, hidden=64, context=128), folder)


def test_a_tree_with_its_prompts_larger_than_the_context_is_refused(trained):
    model, folder = trained
    assert build(model, folder, budget=8).max_tree_size <= 8 + 9 * 3
    with pytest.raises(ValueError, match=r"ppd: budget=40.* makes a draft tree of \d+ nodes; the model context of 128"):
        build(model, folder, budget=40)


def test_more_prompts_than_trained_and_a_short_profile_are_refused(trained, tmp_path):
    model, folder = trained
    with pytest.raises(ValueError, match="prompts=4 but the heads at .* hold 3 prompt tokens"):
        build(model, folder, prompts=4)
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"past": 16, "target_ms": [1.0] * 20}))
    with pytest.raises(ValueError, match=r"profile covers 1\.\.20 tokens but a tree of budget 8 .* verifies 36"):
        build(model, folder, budget=8, profile_file=str(profile))


def test_it_decodes_greedy_equal_to_the_target_alone(trained):
    model, folder = trained
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    plain = Decoder(CausalLM(model), METHODS.build("ar", {}, None)).generate(prompt, 12).tokens
    assert Decoder(CausalLM(model), build(model, folder, budget=6)).generate(prompt, 12).tokens == plain
