"""Falcon: the drafter runs its layers over exactly the masks it was trained on, training is deterministic,
and bad input (heads for another target, another block, a tree deeper than block x passes) is refused in
one line before decoding."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from spectune.engine.runner import CausalLM
from spectune.heads.build import options_for, train_from_features
from spectune.heads.falcon import TRAIN_PASSES, falcon_predictions, feed_and_block_mask, training_masks
from spectune.heads.features import Features, FeatureSpec, feature_pass, fused_layers
from spectune.heads.load import load_heads, new_module, save_weights, target_print
from spectune.heads.spec import HeadsSpec, write_spec
from spectune.heads.train import Frozen
from spectune.heads.vocab import DraftVocab
from spectune.methods import METHODS
from spectune.methods.base import Models
from spectune.methods.growing import GrowingTree
from spectune.methods.heads_falcon import FalconDrafter, FalconKnobs
from support import random_llama

torch.set_num_threads(1)
K = 3  # the block


def make_falcon(model, folder: Path, block: int = K, seed: int = 0) -> Path:
    """A falcon heads folder for `model` with random (untrained) weights."""
    vocab = DraftVocab.full(model.config.vocab_size)
    spec = HeadsSpec(kind="falcon", n_heads=block, n_layers=2, feature_layers=(model.config.num_hidden_layers,),
                     draft_vocab_size=vocab.size, target=target_print(model))
    torch.manual_seed(seed)
    module = new_module(spec, model.config)
    with torch.no_grad():
        for param in module.parameters():
            param.normal_(0, 0.2)
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(folder, module, vocab)
    write_spec(folder, spec)
    return folder


def build(model, folder: Path, **knobs):
    return METHODS.build("falcon", {"heads": str(folder), **knobs}, Models(CausalLM(model), None))


def window_features(model, length: int, count: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    windows = torch.randint(model.config.vocab_size, (count, length), generator=torch.Generator().manual_seed(seed))
    return feature_pass(model, windows.to(torch.int32), FeatureSpec(seq_len=length, topk=4), (), "f", progress=False)


# --- the masks ------------------------------------------------------------------------------------


def test_a_block_sees_the_entries_before_it_and_itself_whole():
    first, second = training_masks(n_entries=8, n_blocks=2, block=2, passes=2)
    assert first.shape == (8 + 4, 8 + 4) and second.shape == (4, 8 + 4 + 4)
    assert torch.equal(first[:8, :8], torch.ones(8, 8, dtype=torch.bool).tril())  # committed entries: causal
    block1 = first[8 + 2 : 8 + 4]  # pass 1's block at entries 2, 3
    assert block1[:, :8].sum(dim=1).tolist() == [2, 2] and block1[:, :2].all()  # entries 0, 1 only
    assert block1[:, 8 + 2 : 8 + 4].all() and not block1[:, 8 : 8 + 2].any()  # itself whole, not block 0
    block2 = second[2:]  # pass 2's block of chain 1 (entries 4, 5): every entry before 4, not pass 1's blocks
    assert block2[:, :4].all() and not block2[:, 4:8].any() and not block2[:, 8:12].any()
    assert block2[:, 12 + 2 :].all() and not block2[:, 12 : 12 + 2].any()
    feed = feed_and_block_mask(past=5, new=2, block=3)  # entries 5, 6 fed; the block is entries 4, 5, 6
    assert feed.shape == (2 + 3, 5 + 2 + 3)
    assert feed[0, :6].all() and not feed[0, 6:].any() and feed[1, :7].all() and not feed[1, 7:].any()
    assert feed[2:, :4].all() and not feed[2:, 4:7].any() and feed[2:, 7:].all()


# --- the drafter computes what training trained -----------------------------------------------------


def test_the_drafters_passes_equal_the_training_forward(tmp_path):
    """Pass 1 (the last k entries as a block), pass 2 and pass 3 (the previous pass's features with the true
    tokens) at inference give the logits the teacher-forced training forward gives for the same block."""
    model = random_llama(seed=7, vocab=16, layers=2)
    folder = make_falcon(model, tmp_path / "falcon")
    heads = load_heads(str(folder), "falcon", model)
    data = window_features(model, 30)
    frozen = Frozen(heads.readout.weight.float(), heads.embeddings.weight.float(), heads.vocab)
    with torch.no_grad():
        trained = falcon_predictions(heads.module, frozen, data, torch.tensor([0]), passes=3)
    tokens, last = data["tokens"][0].tolist(), data["last"][0].float()
    for block in (1, 3):  # blocks start at entry m·k: the drafter's pass 1 reads entries s..s+k-1, so n = s + k
        n = block * K + K
        drafter = FalconDrafter(heads, FalconKnobs())
        drafter.prefilled({2: last[:n]})
        outs = {0: drafter._feed_and_first_block(tuple(tokens[: n + 1]))}
        tree, node, anchor = GrowingTree(tokens[n]), 0, {}
        for p in range(3):
            if p:
                outs.update(drafter._next_blocks(tree, [node], outs, anchor, n))
            for i in range(K):
                expected = trained.logits[p * K + i][0, block]  # [V] depth p·k + i + 1 of the block
                torch.testing.assert_close(outs[node].logits[i], expected, rtol=1e-4, atol=1e-4)
            mine = node
            for token in tokens[n + p * K + 1 : n + p * K + K + 1]:  # the true tokens of this block, as a chain
                anchor[node] = mine
                node = tree.add(token, node)


def test_training_is_deterministic(tmp_path):
    model = random_llama(seed=5, vocab=16, layers=4)
    save_file(window_features(model, 32, count=6), str(tmp_path / "f.safetensors"))
    features = Features(tmp_path / "f.safetensors", 4, fused_layers(4))
    weights = []
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        options = options_for("falcon", steps=6, batch=2, lr=3e-3)
        train_from_features(model, options, features, features, tmp_path / run, {}, progress=False)
        weights.append(load_file(str(tmp_path / run / "heads.safetensors")))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    card = json.loads((tmp_path / "a" / "card.json").read_text())
    assert len(card["agreement"]["top1"]) == options.n_heads * TRAIN_PASSES  # one per depth: block x passes trained


# --- bad input --------------------------------------------------------------------------------------


@pytest.mark.parametrize("changed, message", [
    ({"hidden": 64}, r"hidden_size 64 \(heads trained for 32\)"),
    ({"layers": 3}, r"num_hidden_layers 3 \(heads trained for 2\)"),
])
def test_falcon_heads_for_another_shape_of_target_are_refused(tmp_path, changed, message):
    folder = make_falcon(random_llama(seed=1, vocab=16, layers=2, hidden=32), tmp_path / "falcon")
    other = random_llama(seed=1, **{"vocab": 16, "layers": 2, "hidden": 32, **changed})
    with pytest.raises(ValueError, match="^falcon heads at .* trained for another target.*" + message) as refused:
        build(other, folder)
    assert "\n" not in str(refused.value)


def test_falcon_heads_for_another_target_of_the_same_shape_are_refused(tmp_path):
    folder = make_falcon(random_llama(seed=1, vocab=16), tmp_path / "falcon")
    with pytest.raises(ValueError, match="^falcon heads .*same shape but weights") as refused:
        build(random_llama(seed=2, vocab=16), folder)
    assert "\n" not in str(refused.value)


def test_another_block_or_a_tree_deeper_than_the_passes_is_refused(tmp_path):
    model = random_llama(seed=1, vocab=16)
    folder = make_falcon(model, tmp_path / "falcon")
    with pytest.raises(ValueError, match=r"^falcon: block=4, but the heads at .* were trained for blocks of 3$"):
        build(model, folder, block=4)
    with pytest.raises(ValueError, match=r"branching=\[2, 1, 1, 1\] is 4 deep; falcon drafts at most block x passes "
                                         r"= 3 x 1 = 3 deep"):
        build(model, folder, branching=[2, 1, 1, 1], passes=1)
    with pytest.raises(ValueError, match="branching gives the tree; budget apply to the ranked template only"):
        METHODS.knobs("falcon", {"branching": [2, 1], "budget": 8})
    assert build(model, folder, block=3, budget=10).max_tree_size == 10
    assert build(model, folder, paths=[[0], [1], [0, 0]]).max_tree_size == 3


def test_a_tree_larger_than_the_context_is_refused_before_decoding(tmp_path):
    model = random_llama(seed=1, vocab=16, context=16)
    folder = make_falcon(model, tmp_path / "falcon")
    with pytest.raises(ValueError, match=r"^falcon: budget=20 makes a draft tree of 20 nodes; the model context of "
                                         r"16 positions allows 1\.\.14$"):
        build(model, folder, budget=20)
