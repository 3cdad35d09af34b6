"""`spectune bench --profile`: each phase of our loop read from cProfile's table, the peer's product time, the floor."""

import json

from typer.testing import CliRunner

from spectune.bench import Settings, contender
from spectune.cli import app
from spectune.methods import METHODS
from spectune.pair import load_pair
from spectune.pair_ref import PairRef
from spectune.peer_hf import HfGenerate
from spectune.bench import Contender
from spectune.config import DecodeConfig
from spectune.step_profile import matvec_floor_ms, profile_contender, read_floor_ms

SETTINGS = Settings(max_new_tokens=12, repeats=1, warmup=0)


def test_every_phase_of_a_tree_step_is_found_and_they_fit_inside_the_step(micro_pair):
    pair = load_pair(PairRef.model_validate({"dir": str(micro_pair)}))
    prompts = [pair.encode("def add(a, b):"), pair.encode("The quick brown fox")]
    profile = profile_contender(contender(pair, METHODS.config("dytree", {"budget": 8})), prompts, SETTINGS)
    assert set(profile.phases_ms) == {"prefill", "draft", "tree inputs", "verify", "accept", "commit", "observe"}
    assert profile.tokens == 24 and profile.steps < 24  # the drafter's trees got tokens accepted
    for phase in ("prefill", "draft", "tree inputs", "verify", "accept", "commit"):
        assert profile.phases_ms[phase] > 0, phase  # each one's function was found in the table
    assert sum(profile.phases_ms.values()) <= profile.profiled_ms_per_step  # no phase counts another's time
    assert 0 < profile.matmul_ms < profile.phases_ms["verify"] + profile.phases_ms["draft"]


def test_ar_takes_one_token_a_step_and_a_peer_has_no_phases(micro_pair):
    pair = load_pair(PairRef.model_validate({"dir": str(micro_pair)}))
    prompts = [pair.encode("def add(a, b):")]
    ours = profile_contender(contender(pair, METHODS.config("ar", {})), prompts, SETTINGS)
    assert ours.steps == ours.tokens == 12 and ours.tokens_per_step == 1.0
    peer = profile_contender(Contender(DecodeConfig("hf-ar"), HfGenerate(pair)), prompts, SETTINGS)
    assert peer.phases_ms == {} and peer.tokens == 12 and peer.matmul_ms > 0
    assert matvec_floor_ms(pair.target, repeats=3) > 0 and read_floor_ms(pair.target, repeats=3) > 0


def test_the_cli_prints_one_profile_per_configuration_with_the_floor(micro_pair):
    result = CliRunner().invoke(app, ["bench", "--pair", str(micro_pair), "-m", "ar", "-m", "pld", "--peer", "hf",
                                      "--limit", "2", "--max-new-tokens", "8", "--warmup", "0", "--profile", "--json"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line[line.index("{"):]) for line in result.output.splitlines() if "{\"label\"" in line]
    assert [r["label"] for r in rows][:2] == ["ar", "pld"] and any(r["label"] == "hf-ar" for r in rows)
    assert all(r["floor_ms"] > 0 and r["wall_over_floor"] > 0 for r in rows)
    assert all(r["read_floor_ms"] > 0 and r["wall_over_read_floor"] > 0 for r in rows)


def test_a_drafter_whose_draft_runs_in_inference_mode_is_not_charged_the_verification(micro_heads, micro_pair):
    """torch.inference_mode() wraps eagle3's draft and the runner's forward in one shared wrapper: the phases
    are read from the functions themselves, so draft and verify never hold each other's time."""
    pair = load_pair(PairRef.model_validate({"dir": str(micro_pair)}))
    prompts = [pair.encode("def add(a, b):")]
    profile = profile_contender(contender(pair, METHODS.config("eagle3", {"budget": 6})), prompts, SETTINGS)
    assert profile.phases_ms["draft"] > 0 and profile.phases_ms["verify"] > 0
    assert sum(profile.phases_ms.values()) <= profile.profiled_ms_per_step
