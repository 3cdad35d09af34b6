"""The one-owner types every layer hands on: the context-budget rule, DecodeConfig, DecodeResult, PairRef,
and the one cache folder."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from spectune.config import DecodeConfig, KnobColumns, Settings
from spectune.engine.budget import (
    ContextOverflow, check_fits, check_tree_fits, context_length, max_tree_nodes, room_for_new_tokens,
)
from spectune.pair_ref import PairError, PairRef, pair_from_options, parse_pair
from spectune.results import DecodeResult, PromptStats, StepCounts

# --- the context-budget rule ----------------------------------------------------------------------


def test_prompt_new_tokens_and_tree_must_fit_the_context():
    check_fits(10, 20, 5, 35)  # exactly full
    with pytest.raises(ContextOverflow) as info:
        check_fits(10, 21, 5, 35)
    err = info.value
    assert (err.prompt_tokens, err.max_new_tokens, err.tree_nodes, err.context, err.room) == (10, 21, 5, 35, 20)
    assert str(err) == ("prompt (10 tokens) + max_new_tokens (21) + draft tree (5 nodes) = 36 exceeds the "
                        "target's context of 35 positions")
    assert room_for_new_tokens(10, 5, 35) == 20
    with pytest.raises(ValueError, match="the prompt is empty"):
        check_fits(0, 1, 0, 35)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1, got 0"):
        check_fits(1, 0, 0, 35)


def test_a_tree_the_context_cannot_verify_is_a_knob_error():
    assert max_tree_nodes(1024) == 1022
    check_tree_fits("dytree: budget=1022", 1022, 1024)
    with pytest.raises(ValueError, match=r"^dytree: budget=1023 makes a draft tree of 1023 nodes; the model "
                                         r"context of 1024 positions allows 1\.\.1022$"):
        check_tree_fits("dytree: budget=1023", 1023, 1024)


def test_context_length_reads_the_config_or_says_what_is_missing():
    assert context_length(SimpleNamespace(max_position_embeddings=2048)) == 2048
    assert context_length(SimpleNamespace(n_positions=1024)) == 1024  # GPT-2 style
    with pytest.raises(ValueError, match="names no context length"):
        context_length(SimpleNamespace(hidden_size=8))


# --- DecodeConfig -----------------------------------------------------------------------------------


def test_one_label_for_every_configuration():
    assert DecodeConfig("ar").label() == "ar"
    vllm = DecodeConfig("ngram", {"num_speculative_tokens": 5}, backend="vllm", concurrency=4)
    assert vllm.label() == "vllm:ngram(num_speculative_tokens=5)@c=4"
    assert vllm.as_dict() == {"method": "ngram", "num_speculative_tokens": 5, "temperature": 0.0, "backend": "vllm",
                              "concurrency": 4}
    assert DecodeConfig.from_dict(vllm.as_dict()) == vllm
    assert DecodeConfig("sps", {"draft_len": 4}).label() == "sps(draft_len=4)"
    assert DecodeConfig("tree", {"branching": [4, 2, 1]}, 0.7).label() == "tree(branching=[4,2,1])@T=0.7"
    assert DecodeConfig("pld", {"draft_len": 5}, 0.7, name="my pld").label() == "my pld"  # a chosen name wins


def test_the_flat_form_round_trips_and_reads_older_nested_knobs():
    config = DecodeConfig("sequoia", {"budget": 16, "acceptance": [0.6, 0.1]}, 0.5, columns=KnobColumns(node_budget=16))
    flat = config.as_dict()
    assert flat == {"method": "sequoia", "budget": 16, "acceptance": [0.6, 0.1], "temperature": 0.5}
    assert DecodeConfig.from_dict(flat) == config  # columns do not take part in equality
    nested = DecodeConfig.from_dict({"method": "sps", "knobs": {"draft_len": 3}})
    assert (nested.knobs, nested.temperature) == ({"draft_len": 3}, 0.0)
    with pytest.raises(ValueError, match="needs a method name"):
        DecodeConfig.from_dict({"draft_len": 3})


def test_a_config_is_a_copy_and_travels_by_pickle():
    knobs = {"branching": [2, 2]}
    config = DecodeConfig("tree", knobs, columns=KnobColumns(tree_shape="[2,2]"))
    knobs["branching"] = [9]
    assert config.knobs == {"branching": [2, 2]}
    again = pickle.loads(pickle.dumps(config))  # Ray ships trial requests this way
    assert again == config and again.columns.tree_shape == "[2,2]"
    assert config.with_temperature(0.3).label() == "tree(branching=[2,2])@T=0.3"


# --- DecodeResult -----------------------------------------------------------------------------------

BENCH_ROW_KEYS = [  # the row `spectune bench --json` prints, in order
    "method", "label", "config", "n_prompts", "new_tokens", "target_calls", "draft_calls", "mean_accepted_tokens",
    "acceptance_rate", "acceptance_by_position", "tree_tokens_per_step", "draft_calls_per_step", "wall_s",
    "wall_s_std", "tokens_per_s", "ar_tokens_per_s", "speedup", "speedup_std", "speedups", "speedup_ci_low",
    "speedup_ci_high", "lossless", "lossless_status", "exact_match_rate", "worst_margin", "lossy_method",
    "mismatches", "draft_share", "engine_overhead_share", "ms_per_token", "peak_mem_mb", "acceptance_by_exit_layer",
    "exit_choices", "max_new_tokens", "by_category", "ttft_s", "tpot_s", "p50_latency_s", "p95_latency_s",
    "temperature", "per_prompt",
]


def a_result() -> DecodeResult:
    return DecodeResult(
        config=DecodeConfig("del", {"max_draft_len": 4}, 0.0), n_prompts=2,
        counts=StepCounts(40, 20, 35, 2.0, 0.5, (0.6, 0.3), 3.0, 1.75),
        wall_s=0.5, wall_s_std=0.01, tokens_per_s=80.0, ar_tokens_per_s=60.0, speedup=1.33, speedup_std=0.02,
        speedups=(1.3, 1.33, 1.36), lossless=True, mismatches=0, draft_share=0.3, engine_overhead_share=0.1,
        ms_per_token=12.5, acceptance_by_exit_layer={"1": 0.4}, exit_choices={"1,2": 20}, max_new_tokens=20,
        per_prompt=(PromptStats("a", "code", 20, 10, 2.0, 0.25, True), PromptStats("b", "code", 20, 10, 2.0, 0.25, True)),
    )


def test_the_result_row_keeps_bench_json_keys_and_round_trips():
    result = a_result()
    row = result.as_dict()
    assert list(row) == BENCH_ROW_KEYS
    assert row["label"] == "del(max_draft_len=4)" and row["config"]["method"] == "del"
    assert json.loads(json.dumps(row)) == row  # plain JSON: Tune's result.json and the store keep it
    assert DecodeResult.from_dict(row) == result
    traced = result.with_extra(decode_s=1.5, worker={"worker_id": "w1"})
    assert traced.as_dict()["decode_s"] == 1.5 and DecodeResult.from_dict(traced.as_dict()) == traced


# --- torch-free where it must be -------------------------------------------------------------------


def test_config_results_and_pair_references_import_without_torch():
    code = ("import sys; import spectune.config, spectune.results, spectune.lossless, spectune.pair_ref, "
            "spectune.paths; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_settings_validate_at_the_boundary():
    from spectune.bench import sampling

    settings = Settings(max_new_tokens=8, repeats=1, warmup=0)
    assert sampling(DecodeConfig("ar"), settings).greedy
    assert sampling(DecodeConfig("ar", temperature=0.7), settings.model_copy(update={"top_p": 0.9})) == \
        sampling(DecodeConfig("ar"), settings).__class__(0.7, 0.9)  # temperature: the configuration's; top_p: the run's
    with pytest.raises(ValueError, match="max_new_tokens"):
        Settings(max_new_tokens=0, repeats=1, warmup=0)
    with pytest.raises(ValueError, match="repeats"):  # no default: the bench CLI and a sweep spec each choose theirs
        Settings(max_new_tokens=8, warmup=0)
    with pytest.raises(ValueError, match="temperature must be within 0..5"):  # checked where it lives
        DecodeConfig("ar", temperature=9.0)
    assert "temperature" not in Settings.model_fields


# --- PairRef ----------------------------------------------------------------------------------------


def pair_folder(root: Path, drafter: bool = True) -> Path:
    for role in ("target", "drafter") if drafter else ("target",):
        (root / role).mkdir(parents=True)
        (root / role / "config.json").write_text("{}")
    return root


def test_every_pair_form_names_the_same_models(tmp_path):
    folder = pair_folder(tmp_path / "pairs" / "mine")
    target, drafter = str(folder / "target"), str(folder / "drafter")
    forms = [str(folder), {"dir": str(folder)}, {"path": str(folder)}, {"target": target, "drafter": drafter},
             {"dir": None, "target": target, "drafter": drafter, "device": "cpu", "dtype": "float32"},  # a stored spec
             {"dir": str(folder), "target": target, "drafter": drafter}]
    for form in forms:
        ref = PairRef.model_validate(form)
        assert (ref.target, ref.drafter, ref.device, ref.dtype) == (target, drafter, "cpu", "float32"), form
    ref = PairRef.model_validate({"dir": str(folder), "device": "cuda", "dtype": "bfloat16"})
    assert ref.pair_id == f"{target}|{drafter}|cuda|bfloat16" and ref.name == "mine"


def test_a_folder_here_without_a_drafter_has_none_and_a_remote_folder_is_assumed_whole(tmp_path):
    alone = pair_folder(tmp_path / "alone", drafter=False)
    assert PairRef.model_validate(str(alone)).drafter is None
    remote = PairRef.model_validate({"dir": "/cluster/pairs/big"})  # not on this machine: the workers have it
    assert (remote.target, remote.drafter) == ("/cluster/pairs/big/target", "/cluster/pairs/big/drafter")
    assert PairRef(target="Qwen/Qwen2.5-7B-Instruct").absolute().target == "Qwen/Qwen2.5-7B-Instruct"


def test_presets_resolve_in_the_cache_folder(tmp_cache):
    with pytest.raises(ValueError, match=r"the micro pair is not built at .*micro-seed2: run `spectune models "
                                         r"build --preset micro` --seed 2"):
        PairRef.model_validate({"preset": "micro", "seed": 2})
    built = pair_folder(tmp_cache / "pairs" / "micro-seed2")
    assert PairRef.model_validate({"preset": "micro", "seed": 2}).target == str(built / "target")


def test_one_local_path_check_and_one_line_errors(tmp_path):
    missing = tmp_path / "pairs" / "tiny-seed3"
    with pytest.raises(PairError, match=r"pair.target: model path .*tiny-seed3/target does not exist \(build it "
                                        r"with `spectune models build --preset tiny --seed 3`\)"):
        PairRef.model_validate({"dir": str(missing)}).check_local()
    empty = tmp_path / "empty"
    (empty / "target").mkdir(parents=True)
    with pytest.raises(PairError, match="pair.target: .*empty/target is not a model folder \\(no config.json\\)"):
        PairRef(target=str(empty / "target")).check_local()
    PairRef(target="org/model").check_local()  # a hub id: the hub's business
    with pytest.raises(PairError, match="^pair: device: device must be cpu, cuda, cuda:N, mps or auto"):
        parse_pair({"target": "org/model", "device": "gpu"})
    with pytest.raises(PairError, match="^pair: give either dir or target/drafter, not both$"):
        parse_pair({"dir": str(empty), "target": "org/model"})


def test_cli_options_override_the_folder(tmp_path):
    folder = pair_folder(tmp_path / "p")
    assert pair_from_options(folder, None, None).drafter == str(folder / "drafter")
    mixed = pair_from_options(folder, None, "org/drafter")
    assert (mixed.target, mixed.drafter) == (str(folder / "target"), "org/drafter")
    assert pair_from_options(folder, "org/target", None).drafter == str(folder / "drafter")


# --- one cache folder -------------------------------------------------------------------------------


def test_every_cached_thing_lives_in_SPECTUNE_CACHE(tmp_cache, monkeypatch):
    from spectune.cli.serve_cmd import _state_dir
    from spectune.models.presets import default_pair_dir
    from spectune.store.db import default_url
    from spectune.sweeps.launcher import default_storage

    monkeypatch.delenv("SPECTUNE_DB", raising=False)
    assert default_pair_dir("tiny") == tmp_cache / "pairs" / "tiny-seed0"
    assert default_url() == f"sqlite:///{tmp_cache / 'spectune.db'}"
    assert default_storage() == tmp_cache / "ray_results"
    assert _state_dir() == tmp_cache / "serve"


def test_the_lossless_status_is_typed_in_the_result_and_plain_in_its_row():
    from dataclasses import replace

    from spectune.lossless import LosslessStatus

    result = replace(a_result(), lossless_status="within_tolerance", lossless=True)
    assert result.lossless_status is LosslessStatus.WITHIN_TOLERANCE and result.lossless_status.certified
    row = result.as_dict()
    assert type(row["lossless_status"]) is str and row["lossless_status"] == "within_tolerance"
    assert DecodeResult.from_dict(row).lossless_status is LosslessStatus.WITHIN_TOLERANCE


def test_a_compiled_pair_is_another_loaded_pair(tmp_path):
    folder = pair_folder(tmp_path / "pairs" / "mine")
    eager = PairRef.model_validate({"dir": str(folder)})
    compiled = PairRef.model_validate({"dir": str(folder), "compile": True})
    assert compiled.pair_id == f"{eager.pair_id}|compiled" and eager.compile == "off"
    tuned = PairRef.model_validate({"dir": str(folder), "compile": "max-autotune"})
    assert tuned.pair_id == f"{eager.pair_id}|compiled-max-autotune"
    assert PairRef.model_validate({"dir": str(folder), "compile": False}) == eager


def test_every_compile_mode_of_a_pair_is_one_the_engine_knows():
    from typing import get_args

    from spectune.engine.runner import INDUCTOR_OPTIONS
    from spectune.pair_ref import CompileMode

    assert set(get_args(CompileMode)) - {"off"} == set(INDUCTOR_OPTIONS)


def test_an_unknown_compile_mode_is_one_line_naming_it(tmp_path):
    folder = pair_folder(tmp_path / "pairs" / "mine")
    with pytest.raises(PairError, match="compile") as err:
        parse_pair({"dir": str(folder), "compile": "fastest"})
    assert "\n" not in str(err.value) and "max-autotune" in str(err.value)
