"""The heads methods like every method: `spectune bench`, a sweep spec checked before Ray starts, the CLI's
train command and its refusals; the card each heads folder carries."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from spectune.cli import app
from spectune.sweeps.spec import SpecError, parse_spec

runner = CliRunner()


def test_bench_runs_every_heads_method_lossless(micro_pair, micro_heads):
    args = ["bench", "--pair", str(micro_pair), "--limit", "3", "--max-new-tokens", "16", "--repeats", "1",
            "--warmup", "0", "--json"]
    for method, knob in (("medusa", "tree_size=8"), ("hydra", "branching=[2,2]"), ("eagle", "budget=8"),
                         ("eagle3", "budget=8"), ("falcon", "budget=8"), ("ppd", "budget=8"), ("hidden-transfer", "budget=8")):
        args += ["--method", method, "--set", f"{method}.{knob}"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = {r["method"]: r for r in (json.loads(line) for line in result.stdout.splitlines() if line.startswith("{"))}
    assert set(rows) == {"ar", "medusa", "hydra", "eagle", "eagle3", "falcon", "ppd", "hidden-transfer"}
    for method in ("medusa", "hydra", "eagle", "eagle3", "falcon", "ppd", "hidden-transfer"):
        assert rows[method]["lossless"] is True and rows[method]["mismatches"] == 0, method
        assert rows[method]["mean_accepted_tokens"] > 1.0, method  # the heads draft something the target accepts


def test_the_card_scores_agreement_per_head_position(micro_heads):
    for kind, positions in (("medusa", 4), ("hydra", 4), ("eagle", 3), ("eagle3", 3), ("falcon", 6),  # falcon: 3 passes of 2
                            ("ppd", 3), ("transfer", 3)):
        card = json.loads((micro_heads / kind / "card.json").read_text())
        assert len(card["agreement"]["top1"]) == len(card["agreement"]["topk"]) == positions, kind
        assert all(0 <= a <= b <= 1 for a, b in zip(card["agreement"]["top1"], card["agreement"]["topk"]))
        assert card["agreement"]["top1"][0] > 0.05, kind  # better than chance over 512 tokens
    assert (micro_heads / "eagle-vllm" / "config.json").is_file() and not (micro_heads / "hydra-vllm").exists()
    assert not (micro_heads / "ppd-vllm").exists()  # vLLM has no parallel prompt decoding
    assert not (micro_heads / "transfer-vllm").exists()  # nor Hidden Transfer
    for kind in ("ppd", "transfer"):
        by_rank = json.loads((micro_heads / kind / "card.json").read_text())["agreement"]["by_rank"]
        assert len(by_rank) == 3 and all(sum(row) <= 1 + 1e-6 for row in by_rank), kind  # what the sparse tree reads


def spec(pair, method, knobs):
    return parse_spec({"name": "h", "pair": {"dir": str(pair)}, "space": {method: knobs}}, "h.yaml")


def test_a_sweep_spec_checks_the_heads_before_anything_starts(micro_pair, micro_heads, tmp_path):
    assert spec(micro_pair, "eagle", {"budget": [8, 16]}).space["eagle"]
    assert spec(micro_pair, "ppd", {"budget": [8, 16], "prompts": [2, 3]}).space["ppd"]
    assert spec(micro_pair, "hidden-transfer", {"budget": [8, 16], "positions": [2, 3]}).space["hidden-transfer"]
    with pytest.raises(SpecError, match=r"space.hidden-transfer: .*holds ppd heads, not transfer"):
        spec(micro_pair, "hidden-transfer", {"heads": [str(micro_heads / "ppd")]})
    assert spec(micro_pair, "medusa", {"tree_size": [8], "heads": [str(micro_heads / "medusa")]})
    assert spec(micro_pair, "falcon", {"block": [3], "passes": [1, 2], "budget": [8, 16]}).space["falcon"]
    with pytest.raises(SpecError, match=r"space.falcon: .*holds eagle heads, not falcon"):
        spec(micro_pair, "falcon", {"heads": [str(micro_heads / "eagle")]})
    with pytest.raises(SpecError, match=r"space.hydra: .*holds medusa heads, not hydra"):
        spec(micro_pair, "hydra", {"heads": [str(micro_heads / "medusa")]})
    bare = tmp_path / "pair"
    shutil.copytree(micro_pair / "target", bare / "target")
    with pytest.raises(SpecError, match=r"no eagle3 heads .*spectune heads train --pair .*pair --kind eagle3"):
        spec(bare, "eagle3", {})


def test_train_refuses_unknown_kinds_and_pairs():
    result = runner.invoke(app, ["heads", "train", "--pair", "micro", "--kind", "lookahead"])
    assert result.exit_code != 0 and "unknown kind 'lookahead'" in result.output
    result = runner.invoke(app, ["heads", "train", "--pair", "/nowhere/pair", "--kind", "eagle"])
    assert result.exit_code != 0 and "does not exist" in result.output


def test_train_refuses_a_transfer_layer_outside_the_target(micro_pair):
    result = runner.invoke(app, ["heads", "train", "--pair", str(micro_pair), "--kind", "transfer", "--layer", "4",
                                 "--out", str(micro_pair / "heads" / "transfer-refused")])
    assert result.exit_code != 0 and "transfer layer 4 is outside the target's 1..3" in result.output
    assert not (micro_pair / "heads" / "transfer-refused").exists()  # refused before anything was written
