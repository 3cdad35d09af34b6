"""A sweep's dtype axis: every configuration in each dtype, each trial decoded in its own (and labelled so)."""

from __future__ import annotations

from pathlib import Path

import pytest
from ray.tune.search.variant_generator import generate_variants

from spectune.bench import contender
from spectune.config import DecodeConfig, Settings
from spectune.methods import METHODS
from spectune.pair import load_pair
from spectune.pair_ref import PairRef
from spectune.prompts import load_prompts
from spectune.sweeps.space import param_space, trial_config
from spectune.sweeps.spec import SpecError, parse_spec
from spectune.workers.trials.pair_worker import PairWorker, TrialRequest

BASE = {"name": "t", "pair": {"dir": "~/pairs/micro"}, "space": {"pld": {}, "sps": {"draft_len": [2, 4]}}}


def test_the_grid_runs_every_configuration_in_each_dtype() -> None:
    spec = parse_spec({**BASE, "dtypes": ["float32", "bfloat16"]})
    assert spec.trials == 6
    configs = [trial_config(variant) for _, variant in generate_variants(param_space(spec))]
    assert sorted(c.label() for c in configs) == sorted(
        ["pld@fp32", "pld@bf16", "sps(draft_len=2)@fp32", "sps(draft_len=2)@bf16", "sps(draft_len=4)@fp32",
         "sps(draft_len=4)@bf16"])
    assert parse_spec(BASE).trials == 3 and "dtype" not in param_space(parse_spec(BASE))


def test_bad_dtype_axes_are_one_line_errors() -> None:
    with pytest.raises(SpecError, match="dtypes repeat a value"):
        parse_spec({**BASE, "dtypes": ["bfloat16", "bfloat16"]})
    with pytest.raises(SpecError, match="dtypes.0: Input should be 'float32', 'bfloat16' or 'float16'"):
        parse_spec({**BASE, "dtypes": ["int8"]})


def test_the_dtype_travels_with_the_configuration() -> None:
    config = DecodeConfig("sps", {"draft_len": 3}, 0.7, dtype="bfloat16")
    assert config.label() == "sps(draft_len=3)@bf16@T=0.7"
    assert DecodeConfig.from_dict(config.as_dict()) == config
    assert "dtype" not in DecodeConfig("sps").as_dict()


def test_a_worker_decodes_each_trial_in_its_dtype(micro_pair: Path) -> None:
    worker = PairWorker(PairRef.model_validate({"dir": micro_pair}), threads=1)
    settings = Settings(max_new_tokens=8, repeats=1, warmup=0)
    prompts = tuple(load_prompts("default", 2))
    bf16 = worker.run(TrialRequest(DecodeConfig("pld", dtype="bfloat16"), settings, prompts))
    assert bf16.error is None and bf16.result.config.dtype == "bfloat16" and bf16.result.label == "pld@bf16"
    assert str(worker.in_dtype["bfloat16"].target.dtype) == "torch.bfloat16"
    assert bf16.baselines[0].pair_id.endswith("|bfloat16")
    plain = worker.run(TrialRequest(METHODS.config("pld", {}), settings, prompts))
    assert plain.error is None and plain.result.config.dtype is None and worker.counters.pair_loads == 2


def test_bench_refuses_a_configuration_in_another_dtype_than_the_pair(micro_pair: Path) -> None:
    pair = load_pair(PairRef.model_validate({"dir": micro_pair}))
    with pytest.raises(ValueError, match="decodes in bfloat16, but the pair is loaded in float32"):
        contender(pair, DecodeConfig("pld", dtype="bfloat16"))
