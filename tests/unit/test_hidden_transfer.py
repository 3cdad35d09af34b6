"""hidden-transfer: pseudo states entering the target after a middle block give what real states there would,
leave the tree and the cache as they were; the transfer maps train deterministically through a frozen target
that they leave untouched; bad input is refused in one line before any decoding."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spectune.engine.loop import Decoder
from spectune.engine.runner import EXTRA_SLOT, CausalLM
from spectune.heads.build import options_for, options_for_each, train_from_features, train_heads
from spectune.heads.spec import HeadsError
from spectune.methods import METHODS
from spectune.methods.base import Models
from spectune.trees.draft import DraftTree, LayerTransfer, VerifyExtras, tree_inputs
from support import random_llama
from test_ppd import features_of

torch.set_num_threads(1)
PROMPT = [3, 1, 4, 1, 5, 9, 2, 6]
CHAIN = DraftTree(tokens=(6, 5, 3, 5), parents=(-1, 0, 1, 2))


def real_states(model, tokens: list[int], layer: int) -> torch.Tensor:
    """[n, d] block `layer`'s output at every token of a plain forward."""
    with torch.no_grad():
        return model.model(input_ids=torch.tensor([tokens]), output_hidden_states=True).hidden_states[layer][0]


def test_a_pseudo_state_equal_to_the_real_one_gives_the_real_logits_and_leaves_the_tree_alone():
    """The extra under node i at position i+1, given after block 2 the real block-2 state of node i+1, reads out
    through blocks 3..4 exactly as node i+1 does (it sees the same keys: the path up to i and itself)."""
    model = random_llama(seed=3, vocab=16, layers=4)
    lm = CausalLM(model)
    states = real_states(model, PROMPT + list(CHAIN.tokens), 2)[len(PROMPT):]  # [4, d] the chain's nodes
    transfer = LayerTransfer(2, (0, 1, 2), lambda anchors: states[1:4][None].expand(anchors.shape[0], -1, -1))
    extras = VerifyExtras(torch.zeros(3, 32), (0, 1, 2), transfer)  # one extra under each of nodes 0..2
    joined = extras.joined(CHAIN.parents)
    lm.forward(PROMPT)
    plain = lm.forward(list(CHAIN.tokens))  # [4, V]
    lm.reset()
    lm.forward(PROMPT)
    inputs = tree_inputs(joined, len(lm.cache))
    verified = lm.verify(CHAIN.tokens, inputs.positions, inputs.mask, (), extras.embeddings, transfer)
    torch.testing.assert_close(verified.logits, plain, rtol=1e-5, atol=1e-5)  # the tree's logits untouched
    torch.testing.assert_close(verified.extras.logits, plain[1:], rtol=1e-4, atol=1e-4)
    assert lm.cache.tokens[-3:] == (EXTRA_SLOT,) * 3
    lm.reset()
    lm.forward(PROMPT)
    without = lm.verify(CHAIN.tokens, inputs.positions, inputs.mask, (), extras.embeddings)
    assert not torch.allclose(without.extras.logits, verified.extras.logits, atol=1e-3)  # the transfer did act


def test_the_transfer_layer_must_have_blocks_after_it():
    model = random_llama(seed=3, vocab=16, layers=2)
    extras = VerifyExtras(torch.zeros(1, 32), (0,), LayerTransfer(2, (0,), lambda h: h))
    with pytest.raises(ValueError, match=r"a layer transfer needs a block with blocks after it: 2 is outside 1\.\.1"):
        CausalLM(model).prefill([1, 2, 3], (), extras.embeddings, extras.transfer)


# --- training ---------------------------------------------------------------------------------------


def train(model, folder: Path, features, **overrides) -> Path:
    folder.mkdir()
    options = options_for("transfer", **{"steps": 4, "batch": 2, **overrides})
    train_from_features(model, options, features, features, folder, {}, progress=False)
    return folder


def test_training_is_deterministic_and_leaves_the_target_as_it_was(tmp_path):
    model = random_llama(seed=5, vocab=16, layers=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    features = features_of(model, tmp_path, 16)
    runs = [load_file(str(train(model, tmp_path / run, features) / "heads.safetensors")) for run in ("a", "b")]
    assert runs[0].keys() == runs[1].keys() and all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert runs[0]["weight"].shape == (3, 32, 32) and runs[0]["weight"].abs().sum() > 0  # 3 maps, trained
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())  # autograd flags restored
    spec = json.loads((tmp_path / "a" / "heads.json").read_text())
    assert spec["feature_layers"] == [2]  # L//2 by default
    card = json.loads((tmp_path / "a" / "card.json").read_text())
    assert len(card["agreement"]["by_rank"]) == 3 and len(card["agreement"]["by_rank"][0]) == 8


def test_a_transfer_layer_outside_the_target_is_refused_at_train(tmp_path):
    model = random_llama(seed=5, vocab=16, layers=2)
    features = features_of(model, tmp_path, 16)
    with pytest.raises(HeadsError, match=r"^transfer layer 2 is outside the target's 1\.\.1: the pseudo states need"):
        train(model, tmp_path / "bad", features, layer=2)
    with pytest.raises(HeadsError, match=r"^transfer layer 2 is outside the target's 1\.\.1"):
        train_heads(model, None, options_for("transfer", layer=2), None, tmp_path / "bad2", progress=False)
    with pytest.raises(HeadsError, match="--layer is the transfer layer of transfer heads; medusa heads have none"):
        options_for("medusa", layer=1)
    with pytest.raises(HeadsError, match="transfer's pseudo states are read out by the target's own LM head"):
        options_for("transfer", draft_vocab=8)


def test_several_kinds_take_each_option_where_they_have_it():
    """`heads train --kind all --layer 3 --draft-vocab 64`: the layer goes to transfer, the draft vocabulary to the
    kinds with one; an option no kind has is the first kind's one-line error."""
    medusa, transfer, eagle3 = options_for_each(["medusa", "transfer", "eagle3"], layer=3, draft_vocab=64, steps=7)
    assert (medusa.layer, transfer.layer, eagle3.layer) == (0, 3, 0)
    assert (medusa.draft_vocab, transfer.draft_vocab, eagle3.draft_vocab) == (64, 0, 64)
    assert medusa.steps == transfer.steps == eagle3.steps == 7
    with pytest.raises(HeadsError, match="--layer is the transfer layer of transfer heads; medusa heads have none"):
        options_for_each(["medusa", "eagle3"], layer=3)
    with pytest.raises(HeadsError, match="ppd's prompt tokens are read out by the target's own LM head"):
        options_for_each(["ppd", "transfer"], draft_vocab=64)


# --- bad input, before decoding ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("transfer")
    model = random_llama(seed=5, vocab=16, layers=4, context=128)
    return model, train(model, folder / "transfer", features_of(model, folder, 16))


def build(model, folder, **knobs):
    return METHODS.build("hidden-transfer", {"heads": str(folder), **knobs}, Models(CausalLM(model), None))


def test_transfer_heads_for_another_target_are_refused(trained):
    _, folder = trained
    with pytest.raises(ValueError, match="transfer heads at .* were trained for another target .*same shape but weights"):
        build(random_llama(seed=6, vocab=16, layers=4, context=128), folder)
    with pytest.raises(ValueError, match=r"trained for another target .*hidden_size 64 \(heads trained for 32\)"):
        build(random_llama(seed=5, vocab=16, layers=4, hidden=64, context=128), folder)


def test_a_transfer_layer_outside_the_target_is_refused_at_load(trained, tmp_path):
    model, folder = trained
    edited = tmp_path / "edited"
    edited.mkdir()
    for name in ("heads.safetensors", "card.json"):
        (edited / name).write_bytes((folder / name).read_bytes())
    spec = json.loads((folder / "heads.json").read_text())
    (edited / "heads.json").write_text(json.dumps({**spec, "feature_layers": [4]}))
    with pytest.raises(ValueError, match=r"^transfer layer 4 \(heads at .*edited\) is outside the target's 1\.\.3"):
        build(model, edited)


def test_a_tree_with_its_pseudo_positions_larger_than_the_context_is_refused(trained):
    model, folder = trained
    assert build(model, folder, budget=8).max_tree_size <= 8 + 9 * 3
    with pytest.raises(ValueError, match=r"hidden-transfer: budget=40.* makes a draft tree of \d+ nodes; the model context of 128"):
        build(model, folder, budget=40)
    with pytest.raises(ValueError, match="positions=4 but the heads at .* hold 3 transfer maps"):
        build(model, folder, positions=4)


def test_it_decodes_greedy_equal_to_the_target_alone_with_the_cache_as_ar_leaves_it(trained):
    model, folder = trained
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    ar = Decoder(CausalLM(model), METHODS.build("ar", {}, None))
    plain = ar.generate(prompt, 12).tokens
    decoder = Decoder(CausalLM(model), build(model, folder, budget=6))
    generation = decoder.generate(prompt, 12)
    assert generation.tokens == plain
    assert generation.steps[0].extras == 3 * (generation.steps[0].drafted + 1)
    assert decoder.target.cache.tokens == ar.target.cache.tokens  # no pseudo position kept


def test_every_heads_kind_has_one_entry_in_each_table():
    """The kinds are keyed tables (defaults, training plan, module), not if-chains: a new kind fills each."""
    from spectune.heads.build import DEFAULTS, PLANS
    from spectune.heads.load import MODULES
    from spectune.heads.spec import KINDS

    assert list(DEFAULTS) == list(PLANS) == list(MODULES) == list(KINDS)


def test_a_layer_transfer_without_extras_is_refused():
    lm = CausalLM(random_llama(seed=3, vocab=16, layers=4))
    with pytest.raises(ValueError, match="a layer transfer replaces extra positions: give the extras it replaces"):
        lm.prefill([1, 2, 3], (), None, LayerTransfer(2, (0,), lambda h: h))
