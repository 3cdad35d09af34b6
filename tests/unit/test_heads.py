"""Heads: the draft vocabulary, bad input named before decoding, and the vLLM export read back as vLLM reads it."""

import json
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from spectune.heads import export
from spectune.heads.build import options_for, train_heads
from spectune.heads.features import FeatureSpec, fused_layers
from spectune.heads.load import load_heads, new_module, save_weights, target_print
from spectune.heads.spec import HeadsError, HeadsSpec, write_spec
from spectune.heads.train import soft_targets
from spectune.heads.vocab import DraftVocab, frequent_tokens
from spectune.methods import METHODS
from spectune.methods.base import Models
from spectune.engine.runner import CausalLM
from support import random_llama

torch.set_num_threads(1)


def make_heads(model, kind: str, folder: Path, n_heads: int = 3, vocab: DraftVocab | None = None, seed: int = 0) -> Path:
    """A heads folder for `model` with random (untrained) weights: what the loaders and exporters see."""
    vocab = vocab or DraftVocab.full(model.config.vocab_size)
    layers = fused_layers(model.config.num_hidden_layers) if kind == "eagle3" else (model.config.num_hidden_layers,)
    spec = HeadsSpec(kind=kind, n_heads=n_heads, feature_layers=layers, draft_vocab_size=vocab.size,
                     target=target_print(model))
    torch.manual_seed(seed)
    module = new_module(spec, model.config)
    with torch.no_grad():
        for param in module.parameters():
            param.normal_(0, 0.2)  # zero-initialised blocks would hide a mis-mapped weight
        if kind == "eagle3":
            module.lm_head.weight.copy_(vocab.rows(model.lm_head.weight))
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(folder, module, vocab)
    write_spec(folder, spec)
    return folder


# --- the draft vocabulary --------------------------------------------------------------------------


def test_frequent_tokens_keep_the_most_frequent_ties_by_id():
    tokens = torch.tensor([5, 5, 5, 2, 2, 7, 7, 1, 9])
    vocab = frequent_tokens(tokens, 3, 10)
    assert vocab.ids.tolist() == [2, 5, 7] and vocab.reduced
    assert frequent_tokens(tokens, 10, 10).reduced is False
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    full = vocab.expand(logits)
    assert full.shape == (1, 10) and full[0, 5] == 2.0 and torch.isinf(full[0, 0])
    assert vocab.index_of(torch.tensor([7, 9, 2])).tolist() == [2, -1, 0]
    assert vocab.token_ids(torch.tensor([1, 2])).tolist() == [5, 7]


def test_soft_targets_renormalise_over_the_draft_vocabulary():
    vocab = DraftVocab(torch.tensor([0, 2]), 4)
    index, probs = soft_targets(torch.tensor([[2, 1, 0]]), torch.tensor([[1.0, 1.0, 1.0]]), vocab)
    assert index.tolist() == [[1, 0, 0]]
    torch.testing.assert_close(probs, torch.tensor([[0.5, 0.0, 0.5]]))


# --- bad input: a clear error naming the mismatch, before decoding -------------------------------


def build(method: str, model, folder: Path, **knobs):
    return METHODS.build(method, {"heads": str(folder), **knobs}, Models(CausalLM(model), None))


@pytest.mark.parametrize("changed, message", [
    ({"hidden": 64}, r"hidden_size 64 \(heads trained for 32\)"),
    ({"vocab": 32}, r"vocab_size 32 \(heads trained for 16\)"),
    ({"layers": 3}, r"num_hidden_layers 3 \(heads trained for 2\)"),
])
def test_heads_for_another_shape_of_target_are_refused(tmp_path, changed, message):
    folder = make_heads(random_llama(seed=1, vocab=16, layers=2, hidden=32), "medusa", tmp_path / "medusa")
    other = random_llama(seed=1, **{"vocab": 16, "layers": 2, "hidden": 32, **changed})
    with pytest.raises(ValueError, match="trained for another target.*" + message):
        build("medusa", other, folder)


def test_heads_for_another_target_of_the_same_shape_are_refused(tmp_path):
    folder = make_heads(random_llama(seed=1, vocab=16), "eagle", tmp_path / "eagle")
    with pytest.raises(ValueError, match="same shape but weights"):
        build("eagle", random_llama(seed=2, vocab=16), folder)


def test_a_head_file_that_does_not_parse_is_named(tmp_path):
    model = random_llama(seed=1, vocab=16)
    folder = make_heads(model, "hydra", tmp_path / "hydra")
    (folder / "heads.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(ValueError, match=r"heads\.safetensors does not parse as safetensors"):
        build("hydra", model, folder)
    (folder / "heads.json").write_text("{ nope")
    with pytest.raises(ValueError, match=r"heads\.json does not parse"):
        build("hydra", model, folder)
    (folder / "heads.json").write_text(json.dumps({"kind": "hydra"}))
    with pytest.raises(ValueError, match=r"heads\.json does not parse as heads: n_heads: Field required"):
        build("hydra", model, folder)


def test_weights_that_do_not_fit_the_spec_are_named(tmp_path):
    model = random_llama(seed=1, vocab=16)
    folder = make_heads(model, "medusa", tmp_path / "medusa", n_heads=2)
    spec = json.loads((folder / "heads.json").read_text())
    (folder / "heads.json").write_text(json.dumps({**spec, "n_heads": 4}))
    with pytest.raises(ValueError, match="does not fit medusa heads of 4 x 1"):
        build("medusa", model, folder)


def test_kinds_the_target_cannot_support_are_refused(tmp_path):
    two_layers = random_llama(seed=1, vocab=16, layers=2)
    with pytest.raises(HeadsError, match=r"eagle3 .*only 2 layers \(eagle3 needs >= 4\)"):  # before any feature pass
        train_heads(two_layers, None, options_for("eagle3"), FeatureSpec(), tmp_path / "eagle3")
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=16, n_positions=64)).eval()
    folder = make_heads(random_llama(seed=1, vocab=16), "eagle", tmp_path / "eagle")
    spec = json.loads((folder / "heads.json").read_text())
    spec["target"] = target_print(gpt2).model_dump()
    (folder / "heads.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="one Llama decoder layer .*the target is a gpt2 model"):
        build("eagle", gpt2, folder)


def test_missing_heads_say_how_to_train_them(tmp_path):
    model = random_llama(seed=1, vocab=16)
    model.save_pretrained(tmp_path / "pair" / "target")
    saved = type(model).from_pretrained(tmp_path / "pair" / "target")
    with pytest.raises(ValueError, match=r"no eagle heads .*spectune heads train --pair .*pair --kind eagle"):
        METHODS.build("eagle", {}, Models(CausalLM(saved), None))
    with pytest.raises(ValueError, match="not a pair folder's target/"):
        METHODS.build("medusa", {}, Models(CausalLM(model), None))  # no folder at all: name the knob
    folder = make_heads(model, "medusa", tmp_path / "medusa")
    with pytest.raises(ValueError, match="holds medusa heads, not hydra"):
        build("hydra", model, folder)


def test_a_tree_deeper_than_the_heads_is_a_knob_error(tmp_path):
    model = random_llama(seed=1, vocab=16)
    folder = make_heads(model, "medusa", tmp_path / "medusa", n_heads=2)
    with pytest.raises(ValueError, match=r"branching=\[2, 2, 2\] is 3 deep; these heads propose 2 depths"):
        build("medusa", model, folder, branching=[2, 2, 2])
    assert build("medusa", model, folder).max_tree_size == 16  # the ranked default stops at the heads' depth


# --- the vLLM export, read back by a reader mirroring vLLM's loaders ------------------------------


@pytest.mark.parametrize("reduced", [False, True])
def test_medusa_export_round_trips(tmp_path, reduced):
    model = random_llama(seed=3, vocab=16, layers=2)
    vocab = DraftVocab(torch.tensor([0, 3, 5, 9, 12]), 16) if reduced else None
    folder = make_heads(model, "medusa", tmp_path / "medusa", n_heads=3, vocab=vocab)
    heads = load_heads(str(folder), "medusa", model)
    out = export.export_vllm(tmp_path / "medusa-vllm", heads.spec, heads.module, heads.vocab, model)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "medusa" and config["num_heads"] == 3 and config["original_lm_head"] is True
    assert config["truncated_vocab_size"] == (5 if reduced else 16)
    read, read_vocab = export.read_vllm(out, "medusa", model)
    feature = torch.randn(7, 32)
    with torch.no_grad():
        mine = heads.readout(heads.module(feature))  # [K, 7, V']
        theirs = read(feature) @ read.readout.T
    torch.testing.assert_close(theirs, mine, rtol=1e-5, atol=1e-5)
    assert torch.equal(read_vocab.ids, heads.vocab.ids)


@pytest.mark.parametrize("kind, reduced", [("eagle", False), ("eagle3", False), ("eagle3", True)])
def test_eagle_exports_round_trip(tmp_path, kind, reduced):
    model = random_llama(seed=4, vocab=16, layers=4)
    vocab = DraftVocab(torch.tensor([1, 2, 4, 8, 11, 15]), 16) if reduced else None
    folder = make_heads(model, kind, tmp_path / kind, vocab=vocab)
    heads = load_heads(str(folder), kind, model)
    out = export.export_vllm(tmp_path / f"{kind}-vllm", heads.spec, heads.module, heads.vocab, model)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 1 and config["architectures"] == ["LlamaForCausalLM"]
    read, read_vocab = export.read_vllm(out, kind, model)
    torch.manual_seed(0)
    n = 5
    features = torch.randn(1, n, 32 * len(heads.spec.feature_layers))
    embeds = torch.randn(1, n, 32)
    positions = torch.arange(n)[None]
    mask = torch.zeros(1, 1, n, n).masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    with torch.no_grad():
        mine_in, mine_next = heads.module(heads.module.combine(features), embeds, positions, mask)
        theirs_in, theirs_next = read(read.combine(features), embeds, positions, mask)
        torch.testing.assert_close(theirs_next, mine_next, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs_in @ read.readout.T, heads.readout(mine_in), rtol=1e-5, atol=1e-5)
    assert torch.equal(read_vocab.ids, heads.vocab.ids)
    if kind == "eagle3":
        assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == list(fused_layers(4)) == [1, 2, 3]
        assert config["draft_vocab_size"] == heads.vocab.size


def test_the_reader_refuses_what_vllm_would(tmp_path):
    model = random_llama(seed=4, vocab=16, layers=4)
    heads = load_heads(str(make_heads(model, "eagle", tmp_path / "eagle")), "eagle", model)
    out = export.export_vllm(tmp_path / "eagle-vllm", heads.spec, heads.module, heads.vocab, model)
    from safetensors.torch import load_file, save_file

    weights = load_file(str(out / "model.safetensors"))
    save_file({**weights, "layers.0.input_layernorm.weight": torch.ones(32)}, str(out / "model.safetensors"))
    with pytest.raises(HeadsError, match=r"EagleLlamaForCausalLM would refuse .*unexpected \['layers.0.input_layernorm"):
        export.read_vllm(out, "eagle", model)
    with pytest.raises(HeadsError, match="vLLM has no hydra"):
        export.export_vllm(tmp_path / "x", heads.spec.model_copy(update={"kind": "hydra"}), heads.module, heads.vocab, model)


def test_training_is_deterministic(tmp_path):
    from safetensors.torch import load_file, save_file

    from spectune.heads.build import train_from_features
    from spectune.heads.features import Features, feature_pass

    model = random_llama(seed=5, vocab=16, layers=4)
    windows = torch.randint(16, (12, 32), generator=torch.Generator().manual_seed(0)).to(torch.int32)
    tensors = feature_pass(model, windows, FeatureSpec(seq_len=32, topk=4), fused_layers(4), "f", progress=False)
    save_file(tensors, str(tmp_path / "f.safetensors"))
    features = Features(tmp_path / "f.safetensors", 4, fused_layers(4))
    weights = []
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        options = options_for("eagle3", steps=4, batch=2, draft_vocab=8)
        train_from_features(model, options, features, features, tmp_path / run, {}, progress=False)
        weights.append(load_file(str(tmp_path / run / "heads.safetensors")))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert weights[0]["draft_vocab_ids"].numel() == 8
