"""`spectune trees measure / profile / optimize` on the micro pair, and the tree file they produce."""

import json

import pytest
from typer.testing import CliRunner

from spectune.cli import app
from spectune.engine.loop import Decoder
from spectune.methods import METHODS
from spectune.pair import load_pair
from spectune.pair_ref import PairRef

runner = CliRunner()


def trees(*args):
    return runner.invoke(app, ["trees", *map(str, args)])


@pytest.fixture(scope="module")
def measured(micro_pair, tmp_path_factory):
    folder = tmp_path_factory.mktemp("trees")
    acceptance, profile = folder / "acceptance.json", folder / "profile.json"
    result = trees("measure", "--pair", micro_pair, "--limit", 3, "--max-new-tokens", 16, "--width", 4, "--out", acceptance)
    assert result.exit_code == 0, result.output
    result = trees("profile", "--pair", micro_pair, "--max-tokens", 9, "--past", 16, "--repeats", 1, "--threads", 1, "--out", profile)
    assert result.exit_code == 0, result.output
    return folder, json.loads(acceptance.read_text()), json.loads(profile.read_text())


def test_measure_writes_an_acceptance_vector(measured):
    _, acceptance, _ = measured
    p = acceptance["acceptance"]
    assert len(p) == 4 and acceptance["steps"] > 0
    assert 0 < sum(p) <= 1 + 1e-9
    assert p[0] == max(p), "the drafter's best guess is accepted most often"
    assert sum(acceptance["accepted_by_rank"]) <= acceptance["steps"]


def test_profile_times_every_tree_size(measured):
    _, _, profile = measured
    assert profile["past"] == 16
    assert len(profile["target_ms"]) == 9 and len(profile["drafter_ms"]) == 9
    assert all(t > 0 for t in profile["target_ms"] + profile["drafter_ms"])


@pytest.mark.parametrize("hardware_aware", [False, True])
def test_optimized_tree_loads_in_the_tree_method_and_stays_lossless(measured, micro_pair, hardware_aware):
    folder, _, _ = measured
    out = folder / f"tree-{hardware_aware}.json"
    extra = ["--profile", folder / "profile.json"] if hardware_aware else []
    result = trees("optimize", "--acceptance", folder / "acceptance.json", *extra, "--budget", 8, "--max-depth", 4, "--out", out)
    assert result.exit_code == 0, result.output
    tree = json.loads(out.read_text())
    assert 1 <= tree["size"] <= 8 and tree["depth"] <= 4 and len(tree["paths"]) == tree["size"]
    assert tree["expected_tokens_per_step"] == pytest.approx(tree["expected_accepted"] + 1)
    assert (tree["step_ms"] is not None) == hardware_aware
    pair = load_pair(PairRef.model_validate({"dir": micro_pair}))
    models = pair.runners()
    drafter = METHODS.build("tree", {"paths_file": str(out)}, models)
    assert drafter.shape.size == tree["size"]
    ar = Decoder(pair.runners().target, METHODS.build("ar", {}, models), pair.eos_token_id)
    decoder = Decoder(models.target, drafter, pair.eos_token_id)
    for text in ("def main():\n    ", "import os\n"):
        ids = pair.encode(text)
        assert decoder.generate(ids, 24).tokens == ar.generate(ids, 24).tokens


@pytest.mark.parametrize(
    "args, message",
    [
        (["optimize", "--acceptance", "{folder}/acceptance.json", "--budget", 0, "--max-depth", 3], "--budget must be in 1..512"),
        (["optimize", "--acceptance", "{folder}/nothing.json", "--budget", 4, "--max-depth", 3], "nothing.json does not exist"),
        (["optimize", "--acceptance", "{folder}/acceptance.json", "--profile", "{folder}/profile.json", "--budget", 20, "--max-depth", 3],
         "--max-tokens 21"),
        (["measure", "--pair", "{pair}", "--width", 0], "--width must be in 1..64"),
        (["profile", "--pair", "{pair}", "--max-tokens", 100000], "allowed --max-tokens 1.."),
        (["profile", "--pair", "{folder}", "--max-tokens", 4], "has no target/"),
        (["profile", "--pair", "{pair}", "--threads", 0], "--threads must be >= 1"),
    ],
)
def test_bad_input_is_one_clear_line(measured, micro_pair, args, message):
    folder, _, _ = measured
    filled = [str(a).format(folder=folder, pair=micro_pair) for a in args]
    result = trees(*filled)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output
