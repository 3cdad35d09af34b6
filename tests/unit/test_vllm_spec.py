"""The vLLM backend in sweep specs: its methods and knobs come from the backend registry, bad
configurations fail before anything starts (naming the field), and the grid holds one trial per
(configuration, concurrency) point, a configuration's loads adjacent so its server is reused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ray.tune.search.variant_generator import generate_variants

from spectune.backends import BACKENDS
from spectune.backends.vllm import VLLM_METHODS, register_heads_locator, HEADS_LOCATORS, vllm_token_tree
from spectune.config import DecodeConfig
from spectune.pair_ref import PairRef
from spectune.sweeps.callback import stored_config
from spectune.sweeps.space import param_space, trial_config
from spectune.sweeps.spec import SpecError, load_spec, parse_spec

SPECS = Path(__file__).resolve().parents[2] / "sweeps" / "specs"
BASE = {
    "name": "v",
    "pair": {"dir": "~/pairs/micro"},
    "backend": "vllm",
    "space": {"ar": {}, "ngram": {"num_speculative_tokens": [3, 5], "prompt_lookup_max": [3]}},
    "load": {"concurrency": [1, 4]},
}


def error_of(**changes) -> str:
    with pytest.raises(SpecError) as caught:
        parse_spec({**BASE, **changes}, "v.yaml")
    return str(caught.value)


def test_a_vllm_grid_is_every_configuration_at_every_load_with_loads_adjacent():
    spec = parse_spec(BASE)
    assert spec.trials == 6
    configs = [trial_config(v) for _, v in generate_variants(param_space(spec))]
    assert [c.label() for c in configs] == [
        "vllm:ar", "vllm:ar@c=4",
        "vllm:ngram(num_speculative_tokens=3,prompt_lookup_max=3)",
        "vllm:ngram(num_speculative_tokens=3,prompt_lookup_max=3)@c=4",
        "vllm:ngram(num_speculative_tokens=5,prompt_lookup_max=3)",
        "vllm:ngram(num_speculative_tokens=5,prompt_lookup_max=3)@c=4",
    ]
    assert {c.backend for c in configs} == {"vllm"}


def test_stored_configs_carry_backend_concurrency_and_the_draft_length_column():
    point = {"method": "ngram", "num_speculative_tokens": 5, "backend": "vllm", "concurrency": 16}
    config = stored_config({"trial": point, "temperature": 0.0})
    assert (config.backend, config.concurrency, config.columns.draft_len) == ("vllm", 16, 5)
    assert DecodeConfig.from_dict(config.as_dict()) == config  # the store's flat form reads back
    spectune = stored_config({"trial": {"method": "sps", "draft_len": 4}, "temperature": 0.0})
    assert (spectune.backend, spectune.concurrency, spectune.columns.draft_len) == ("spectune", 1, 4)


@pytest.mark.parametrize("changes, message", [
    ({"space": {"lookahead": {}}}, "space.lookahead: unknown vLLM speculative method 'lookahead'; known vLLM speculative methods: ar, draft_model"),
    ({"space": {"ngram": {"window": [2]}}}, "space.ngram.window: unknown knob for ngram; its knobs: max_num_seqs"),
    ({"space": {"ngram": {"num_speculative_tokens": [0]}}}, "space.ngram.num_speculative_tokens: 0 is not allowed"),
    ({"space": {"ngram": {"prompt_lookup_min": [4], "prompt_lookup_max": [3]}}},
     "prompt_lookup_min (4) must be <= prompt_lookup_max (3) (vLLM's rule)"),
    ({"space": {"ar": {"max_num_seqs": [8], "max_num_batched_tokens": [4]}}},
     "max_num_batched_tokens (4) must be >= max_num_seqs (8) (vLLM's rule)"),
    ({"space": {"eagle": {}}}, "space.eagle: method eagle needs eagle heads for"),
    ({"space": {"suffix": {}}}, "space.suffix: method suffix needs the Python package arctic_inference"),
    ({"space": {"eagle": {"model": ["/heads"], "speculative_token_tree": [[[0], [1]]]}}},
     "has no tree drafts"),
    ({"space": {"ngram": {"num_speculative_tokens_per_batch_size": [[[2, 8, 2]]]}}},
     "the first band must start at batch size 1"),
    ({"space": {"ngram": {"num_speculative_tokens": [2], "num_speculative_tokens_per_batch_size": [[[1, 4, 5]]]}}},
     "k = 5 is above num_speculative_tokens (2), which vLLM would silently cut it to"),
    ({"backend": "sglang"}, "backend: unknown backend 'sglang'; known backends: spectune, vllm"),
    ({"backend": "spectune", "space": {"sps": {}}},
     "load.concurrency: backend spectune decodes 1 request(s) at a time; a load axis needs backend: vllm"),
    ({"load": {"concurrency": [4, 4]}}, "load.concurrency: give distinct request counts >= 1"),
    ({"vllm": {"max_model_len": 1024}, "backend": "spectune", "load": {"concurrency": [1]}, "space": {"sps": {}}},
     "vllm: settings for backend vllm, but backend is spectune (set backend: vllm)"),
    ({"vllm": {"kv_cache": 2}}, "vllm.kv_cache: unknown field"),
])
def test_bad_vllm_configurations_fail_before_anything_starts(changes, message):
    assert message in error_of(**changes)


def test_draft_model_needs_the_pairs_drafter():
    message = error_of(pair={"target": "/m/target"}, space={"draft_model": {}})
    assert "space.draft_model: method draft_model drafts with a drafter model; set pair.drafter" in message


def test_speculative_configs_are_vllms_own():
    pair = PairRef(target="/p/target", drafter="/p/drafter")
    ngram = VLLM_METHODS.get("ngram").speculative_config({"num_speculative_tokens": 5, "prompt_lookup_max": 3,
                                                          "max_num_seqs": 8}, pair)
    assert ngram == {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 3}
    drafted = VLLM_METHODS.get("draft_model").speculative_config({"num_speculative_tokens": 2}, pair)
    assert drafted == {"method": "draft_model", "num_speculative_tokens": 2, "model": "/p/drafter"}
    assert VLLM_METHODS.get("ar").speculative_config({"max_num_seqs": 4}, pair) is None


def test_a_per_batch_size_schedule_goes_to_vllm_as_given():
    knobs = {"num_speculative_tokens": 4, "num_speculative_tokens_per_batch_size": [[1, 2, 4], [3, 256, 0]]}
    spec = parse_spec({**BASE, "space": {"ngram": {k: [v] for k, v in knobs.items()}}})
    config = VLLM_METHODS.get("ngram").speculative_config(knobs, spec.pair)
    assert json.loads(json.dumps(config))["num_speculative_tokens_per_batch_size"] == [[1, 2, 4], [3, 256, 0]]


def test_heads_come_from_a_registered_locator(tmp_path):
    heads = tmp_path / "eagle-heads"
    heads.mkdir()

    def locator(pair, method):
        return str(heads) if method == "eagle" else None

    register_heads_locator(locator)
    try:
        spec = parse_spec({**BASE, "space": {"eagle": {"num_speculative_tokens": [2]}}})
        config = VLLM_METHODS.get("eagle").speculative_config({"num_speculative_tokens": 2}, spec.pair)
        assert config == {"method": "eagle", "num_speculative_tokens": 2, "model": str(heads)}
    finally:
        HEADS_LOCATORS.remove(locator)


def test_spectune_trees_in_vllms_token_tree_format():
    assert vllm_token_tree([[0], [1], [0, 0]]) == "[(0,), (1,), (0, 0)]"
    assert vllm_token_tree({"branching": [2, 1]}) == "[(0,), (1,), (0, 0), (1, 0)]"
    sequoia = vllm_token_tree({"sequoia": {"acceptance": [0.7, 0.2], "budget": 4, "max_depth": 3}})
    paths = eval(sequoia)  # noqa: S307 - vLLM reads it with ast.literal_eval; the tuples are plain ints
    assert len(paths) == 4 and (0,) in paths and all(p[:-1] in paths or len(p) == 1 for p in paths)
    with pytest.raises(ValueError, match="skips rank 0"):
        vllm_token_tree([[1]])


def test_backends_are_registered_with_their_methods():
    assert BACKENDS.names() == ["spectune", "vllm"]
    assert "sps" in BACKENDS.get("spectune").methods().names()
    with pytest.raises(ValueError, match="decodes one request at a time"):
        BACKENDS.get("spectune").config("sps", {}, concurrency=4)
    config = BACKENDS.config(DecodeConfig("ngram", {"num_speculative_tokens": 4}, backend="vllm", concurrency=8))
    assert config.label() == "vllm:ngram(num_speculative_tokens=4)@c=8"
    assert json.loads(json.dumps(config.as_dict()))["concurrency"] == 8


def test_the_shipped_vllm_spec_validates(tiny_stand_in):
    spec = load_spec(SPECS / "vllm_load.yaml")
    assert spec.backend == "vllm" and spec.load.concurrency == [1, 2, 4, 8, 16]
    assert {"ar", "ngram"} <= set(spec.space)


def test_the_sweep_summary_names_what_each_backends_workers_did():
    from spectune.cli.sweep_cmd import worker_summary

    engine = BACKENDS.get("spectune").worker_counters
    assert worker_summary([{"worker_id": 0, "pair_loads": 1}], engine) == "1 worker(s), 1 pair load(s)"
    vllm = [{"worker_id": 0, "server_starts": 6, "trials_run": 25}, {"worker_id": 1, "server_starts": 4}]
    assert worker_summary(vllm, BACKENDS.get("vllm").worker_counters) == "2 worker(s), 10 vLLM server start(s)"
