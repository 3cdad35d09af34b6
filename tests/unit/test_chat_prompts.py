"""Chat prompts go through the model's chat template; bench rows break down by category."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gguf_export import chat_micro_pair
from spectune.bench import contender, run_bench
from spectune.config import Settings
from spectune.methods import METHODS
from spectune.pair import load_pair
from spectune.pair_ref import PairRef
from spectune.prompts import ChatTemplateMissing, Prompt, load_prompts


@pytest.fixture(scope="module")
def chat_pair(micro_pair: Path, tmp_path_factory: pytest.TempPathFactory):
    """The micro target through GGUF (which carries a chat template) with the micro drafter."""
    return load_pair(PairRef.model_validate(str(chat_micro_pair(micro_pair, tmp_path_factory.mktemp("chat")))))


def test_the_shipped_chat_set_has_60_prompts_in_6_categories() -> None:
    prompts = load_prompts("chat")
    assert len(prompts) >= 60 and all(p.chat for p in prompts)
    by_category = {p.category for p in prompts}
    assert len(by_category) >= 6 and min(sum(p.category == c for p in prompts) for c in by_category) >= 8
    assert len({p.category for p in prompts[:7]}) == 7  # interleaved: --limit N spans the categories


def test_chat_prompts_go_through_the_template(chat_pair) -> None:
    request = Prompt(id="q", prompt="What is 2 + 2?", chat=True)
    expected = chat_pair.tokenizer.apply_chat_template([{"role": "user", "content": request.prompt}],
                                                       tokenize=True, add_generation_prompt=True, return_dict=False)
    assert chat_pair.encode_prompt(request) == list(expected)
    raw = Prompt(id="r", prompt="What is 2 + 2?")
    assert chat_pair.encode_prompt(raw) == chat_pair.encode("What is 2 + 2?")


def test_a_chat_set_on_a_model_without_a_template_is_a_clear_error(micro_pair: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from spectune.cli import app

    pair = load_pair(PairRef(target=str(micro_pair / "target")))
    with pytest.raises(ChatTemplateMissing, match="is a chat prompt but .* has no chat template"):
        pair.encode_prompt(load_prompts("chat")[0])
    result = CliRunner().invoke(app, ["bench", "--pair", str(micro_pair), "--prompts", "chat", "-m", "ar",
                                      "--limit", "2", "--max-new-tokens", "4", "--repeats", "1"])
    assert result.exit_code == 2 and "has no chat template" in result.output


def test_by_category_equals_the_per_prompt_rows(chat_pair, tmp_path: Path) -> None:
    prompts = load_prompts("chat", 7)  # the set interleaves its categories: one of each
    settings = Settings(max_new_tokens=12, repeats=2, warmup=0)
    sps = contender(chat_pair, METHODS.config("sps", {"draft_len": 3}))
    ar_row, sps_row = run_bench(chat_pair, [sps], prompts, settings)
    row = json.loads(json.dumps(sps_row.as_dict()))  # as bench --json prints it
    categories = row["by_category"]
    assert set(categories) == {p.category for p in prompts}
    for name, entry in categories.items():
        rows = [p for p in row["per_prompt"] if p["category"] == name]
        assert entry["n_prompts"] == len(rows)
        assert entry["mean_accepted_tokens"] == pytest.approx(sum(p["new_tokens"] for p in rows)
                                                              / sum(p["target_calls"] for p in rows))
        assert entry["speedup"] > 0 and 0.0 <= entry["acceptance_rate"] <= 1.0
    assert all(entry["speedup"] == 1.0 for entry in ar_row.by_category.values())
    assert row["lossless_status"] == "exact" and row["lossless"] is True
