"""Sweep specs: every shipped spec validates; bad specs fail naming the field and what is allowed;
the spec becomes the search space Tune (grid, random) or Optuna (NSGA-II) actually samples."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.tune.search.variant_generator import generate_variants

from spectune.backends import BACKENDS
from spectune.methods import METHODS
from spectune.config import DecodeConfig
from spectune.sweeps.space import optuna_searcher, param_space, trial_config
from spectune.sweeps.spec import SpecError, grid_configs, load_spec, parse_spec

SPECS = sorted((Path(__file__).resolve().parents[2] / "sweeps" / "specs").glob("*.yaml"))
BASE = {
    "name": "t",
    "pair": {"dir": "~/pairs/micro"},
    "space": {"sps": {"draft_len": [2, 4]}, "tree": {"branching": [[2, 2, 1], [4, 2, 1]]}, "pld": {}},
}


def spec_with(**changes):
    return parse_spec({**BASE, **changes}, "t.yaml")


def error_of(**changes) -> str:
    with pytest.raises(SpecError) as caught:
        spec_with(**changes)
    return str(caught.value)


def test_the_shipped_specs_are_all_there():
    assert {p.stem for p in SPECS} >= {"quick", "tree_shapes", "draft_lengths", "exit_layers", "budgets", "gpu_cluster"}


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_every_shipped_spec_validates(path: Path, tiny_stand_in, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # specs naming ~/.cache/... validate as on a fresh machine: what a user's own cache holds (SmolLM2 imported by
    # `make demo`, its heads not trained) must not decide this test
    monkeypatch.setenv("HOME", str(tmp_path))
    data = yaml.safe_load(path.read_text())
    known = BACKENDS.get(data.get("backend", "spectune")).methods().names()
    assert set(data["space"]) <= set(known), f"{path.name} names methods its backend does not have"
    spec = load_spec(path)
    assert spec.name == path.stem
    assert spec.trials >= 1
    assert "~" not in spec.pair.target  # the home folder is expanded


def test_quick_runs_sps_tree_and_pld_on_the_tiny_pair():
    spec = load_spec(next(p for p in SPECS if p.stem == "quick"))
    assert set(spec.space) == {"sps", "tree", "pld"}
    assert spec.pair.target.endswith("pairs/tiny-seed0/target") and spec.pair.drafter.endswith("tiny-seed0/drafter")
    assert spec.search == "grid" and spec.resources.gpus == 0


def test_gpu_cluster_asks_for_gpus_and_a_hub_pair():
    spec = load_spec(next(p for p in SPECS if p.stem == "gpu_cluster"))
    assert spec.pair.target == "Qwen/Qwen2.5-7B-Instruct" and spec.pair.device == "cuda"
    assert spec.pair.dtype == "bfloat16" and spec.resources.gpus > 0


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"space": {"sps": {"draftlen": [2]}}}, "space.sps.draftlen: unknown knob for sps; its knobs: draft_len"),
        ({"space": {"nope": {}}}, "space.nope: unknown method 'nope'; known methods:"),
        ({"space": {"sps": {"draft_len": [100]}}}, "space.sps.draft_len: 100 is not allowed: Input should be less than or equal to 64"),
        ({"space": {"sps": {"draft_len": 4}}}, "space.sps.draft_len: give a list of choices (e.g. [4]) or a range"),
        ({"space": {"sps": {"draft_len": []}}}, "space.sps.draft_len: give at least one choice"),
        ({"space": {"tree": {"branching": [2, 2, 1]}}}, "a list-valued knob takes a list of lists"),
        ({"space": {"sps": {"draft_len": {"low": 2, "high": 8}}}}, "space.sps.draft_len: a range {low, high} needs search random or optuna-nsga2"),
        ({"space": {"sps": {"draft_len": {"low": 8, "high": 2}}}, "search": "random"}, "space.sps.draft_len: bad range: low (8) must be below high (2)"),
        ({"space": {"pld": {"min_ngram": [4], "max_ngram": [3]}}}, "space.pld: the combination {'min_ngram': 4, 'max_ngram': 3} is not allowed"),
        ({"space": {}}, "space: Dictionary should have at least 1 item"),
        ({"pair": {"target": "org/model"}}, "space.sps: method sps drafts with a drafter model; set pair.drafter"),
        ({"pair": {"dir": "x", "target": "y"}}, "pair: give either dir or target/drafter, not both"),
        ({"pair": {"dir": "x", "device": "gpu"}}, "pair.device: device must be cpu, cuda, cuda:N, mps or auto"),
        ({"pair": {"dir": "x", "device": "cuda"}}, "resources.gpus: pair.device is cuda, so each trial needs gpus > 0"),
        ({"pair": {"dir": "x", "device": "cuda:1"}, "resources": {"gpus": 1}}, "pair.device: use cuda, not cuda:1"),
        ({"pair": {"dir": "x", "dtype": "int8"}}, "pair.dtype: Input should be 'float32', 'bfloat16' or 'float16'"),
        ({"objectives": [{"metric": "sped"}]}, "objectives.0.metric: unknown metric 'sped'; allowed: "),
        ({"objectives": [{"metric": "speedup", "mode": "up"}]}, "objectives.0.mode: Input should be 'max' or 'min'"),
        ({"search": "bayes"}, "search: Input should be 'grid', 'random' or 'optuna-nsga2'"),
        ({"num_samples": 5}, "num_samples: grid runs every combination once"),
        ({"temperatures": [9]}, "temperatures: each temperature must be within 0..5"),
        ({"name": "has space"}, "name: use letters, digits and _ . -"),
        ({"resources": {"cpus": 0}}, "resources.cpus: Input should be greater than or equal to 0.01"),
        ({"resources": {"gpu": 1}}, "resources.gpu: unknown field"),
        ({"trials": 3}, "trials: unknown field"),
    ],
)
def test_a_bad_spec_names_the_field_and_what_is_allowed(changes, expected):
    message = error_of(**changes)
    assert message.startswith("t.yaml: ")
    assert expected in message
    assert "\n" not in message


def test_a_spec_file_that_is_missing_or_not_yaml_says_so(tmp_path: Path):
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "none.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="is not valid YAML"):
        load_spec(broken)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n")
    with pytest.raises(SpecError, match="expected a mapping"):
        load_spec(listed)


def test_the_grid_is_every_combination_of_each_method_and_temperature():
    spec = spec_with(space={"sps": {"draft_len": [2, 4], "schedule": ["fixed", "heuristic"]}, "pld": {}},
                     temperatures=[0.0, 0.5])
    assert grid_configs(spec.space) == [
        {"method": "sps", "draft_len": 2, "schedule": "fixed"},
        {"method": "sps", "draft_len": 2, "schedule": "heuristic"},
        {"method": "sps", "draft_len": 4, "schedule": "fixed"},
        {"method": "sps", "draft_len": 4, "schedule": "heuristic"},
        {"method": "pld"},
    ]
    assert spec.trials == 10
    variants = [trial_config(config) for _, config in generate_variants(param_space(spec))]
    assert len(variants) == 10
    assert DecodeConfig("sps", {"draft_len": 4, "schedule": "heuristic"}, 0.5) in variants
    assert DecodeConfig("pld", {}, 0.0) in variants


def test_random_search_draws_only_the_chosen_methods_knobs_within_their_ranges():
    spec = spec_with(search="random", num_samples=40, space={
        "sps": {"draft_len": {"low": 2, "high": 6}},
        "tree": {"branching": [[2, 1], [3, 2, 1]]},
        "pld": {"max_ngram": {"low": 1, "high": 8, "log": True}},
    })
    drawn = [trial_config(config) for _ in range(40) for _, config in generate_variants(param_space(spec))]
    for trial in drawn:
        METHODS.knobs(trial.method, trial.knobs)  # every draw is a valid configuration
        assert set(trial.knobs) == set(spec.space[trial.method])
    sps_lengths = {t.knobs["draft_len"] for t in drawn if t.method == "sps"}
    assert sps_lengths <= {2, 3, 4, 5, 6} and len(sps_lengths) > 1
    assert {tuple(t.knobs["branching"]) for t in drawn if t.method == "tree"} <= {(2, 1), (3, 2, 1)}
    assert {t.method for t in drawn} == {"sps", "tree", "pld"}


def test_optuna_nsga2_suggests_a_method_then_only_its_knobs_decoding_list_choices():
    spec = spec_with(search="optuna-nsga2", num_samples=30, temperatures=[0.0, 0.7], space={
        "sps": {"draft_len": {"low": 2, "high": 8}, "schedule": ["fixed", "heuristic"]},
        "tree": {"branching": [[2, 2, 1], [4, 2, 1]]},
    })
    search = optuna_searcher(spec)  # Ray Tune's OptunaSearch, driven here the way Tune drives it
    seen = []
    for i in range(30):
        chosen = trial_config(search.suggest(f"t{i}"))
        METHODS.knobs(chosen.method, chosen.knobs)
        assert set(chosen.knobs) == set(spec.space[chosen.method])
        seen.append(chosen)
        search.on_trial_complete(f"t{i}", {"speedup": 1.0 + i / 30, "tree_tokens_per_step": 2.0 + i % 3})
    assert {t.method for t in seen} == {"sps", "tree"}
    assert {tuple(t.knobs["branching"]) for t in seen if t.method == "tree"} <= {(2, 2, 1), (4, 2, 1)}
    assert all(2 <= t.knobs["draft_len"] <= 8 for t in seen if t.method == "sps")
    assert {t.temperature for t in seen} == {0.0, 0.7}


def test_every_search_hands_the_trial_one_shape_the_typed_configurations_flat_form():
    space = {"sps": {"draft_len": [4]}}
    grid = param_space(spec_with(space=space, temperatures=[0.7]))
    drawn = param_space(spec_with(search="random", num_samples=1, space=space, temperatures=[0.7]))
    suggested = optuna_searcher(spec_with(search="optuna-nsga2", num_samples=1, space=space, temperatures=[0.7]))
    handed = [c for _, c in generate_variants(grid)] + [c for _, c in generate_variants(drawn)] + [suggested.suggest("t0")]
    expected = DecodeConfig("sps", {"draft_len": 4}, 0.7)
    assert len(handed) == 3
    for config in handed:
        assert config["trial"] == expected.as_dict() == {"method": "sps", "draft_len": 4, "temperature": 0.7}
        assert trial_config(config) == expected
    assert DecodeConfig("tree", {"branching": [2, 1]}, 0.7).label() == "tree(branching=[2,1])@T=0.7"


def test_the_demo_sweeps_the_heads_trained_beside_the_pair_and_says_how_to_train_them(tmp_path) -> None:
    """`make demo`'s front shows trained heads when they are cached (issue 19), else a note on training them."""
    from spectune.cli.sweep_cmd import _with_cached_heads

    space = {"pld": {"draft_len": [3, 5]}}
    same, note = _with_cached_heads(tmp_path, space)
    assert same == space and "spectune heads train --pair smollm2 --kind eagle3 --text chat" in note
    for kind in ("eagle3", "medusa"):
        (tmp_path / "heads" / kind).mkdir(parents=True)
        (tmp_path / "heads" / kind / "heads.safetensors").write_bytes(b"")
    (tmp_path / "heads" / "eagle").mkdir()  # a folder without weights: not trained (an interrupted build)
    grown, none = _with_cached_heads(tmp_path, space)
    assert grown == {"pld": {"draft_len": [3, 5]}, "medusa": {},
                     "rasd-eagle3": {"budget": [8], "draft_nodes": [4]},
                     "eagle3": {"budget": [6], "max_depth": [5], "per_pass": [4]}} and none is None
