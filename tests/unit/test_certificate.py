"""The greedy certificate: every emitted token is the target's argmax within the dtype's rounding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from spectune.certificate import certify, margins, tolerance
from spectune.config import Settings
from spectune.engine.runner import CausalLM
from spectune.methods import METHODS
from spectune.pair import load_pair
from spectune.pair_ref import PairRef
from spectune.prompts import load_prompts


def _ar_outputs(pair, n: int = 6, new: int = 24) -> tuple[list[list[int]], list[list[int]]]:
    from spectune.engine.loop import Decoder

    models = pair.runners()
    decoder = Decoder(models.target, METHODS.build("ar", {}, models), pair.eos_token_id)
    prompts = [pair.encode_prompt(p) for p in load_prompts("default", n)]
    return prompts, [decoder.generate(p, new).tokens for p in prompts]


@pytest.fixture(scope="module")
def bf16_pair(micro_pair: Path):
    return load_pair(PairRef(target=str(micro_pair / "target"), dtype="bfloat16"))


@pytest.fixture(scope="module")
def fp32_pair(micro_pair: Path):
    return load_pair(PairRef(target=str(micro_pair / "target")))


def test_bf16_ar_passes_its_own_certificate(bf16_pair) -> None:
    prompts, outputs = _ar_outputs(bf16_pair)
    checked = certify(CausalLM(bf16_pair.target), prompts, [[o] for o in outputs], outputs)
    assert checked.status == "exact" and checked.exact_match_rate == 1.0 and not checked.failures
    assert checked.dtype == "bfloat16" and 0.0 <= checked.worst_margin


def _replaced(pair, index: int, position: int):
    """AR's outputs with one token replaced by the target's least likely there (far below the argmax: no
    rounding explains it), and that output's certificate against AR's."""
    prompts, outputs = _ar_outputs(pair)
    target = CausalLM(pair.target)
    logits = target.forward([*prompts[index], *outputs[index][:position]])[-1]  # [V]: what predicts output[position]
    target.reset()
    broken = [list(o) for o in outputs]
    broken[index][position] = int(logits.argmin())
    return outputs, broken, certify(target, prompts, [[o] for o in broken], outputs)


def test_a_replaced_token_fails_with_its_position(bf16_pair) -> None:
    position = 5
    _, broken, checked = _replaced(bf16_pair, 2, position)
    worst_token = broken[2][position]
    assert checked.status == "lossy" and not checked.lossless
    (failure,) = checked.failures
    assert (failure.prompt_index, failure.position, failure.token) == (2, position, worst_token)
    assert failure.margin > failure.tolerance > 0


def test_fp32_exact_outputs_are_exact(fp32_pair) -> None:
    prompts, outputs = _ar_outputs(fp32_pair)
    checked = certify(CausalLM(fp32_pair.target), prompts, [[o, o] for o in outputs], outputs)
    assert checked.status == "exact" and checked.worst_margin < 1e-3


def test_argmax_outputs_that_differ_from_the_reference_are_within_tolerance(fp32_pair) -> None:
    prompts, outputs = _ar_outputs(fp32_pair)
    other = [list(o) for o in outputs]
    other[0][-1] = (other[0][-1] + 1) % fp32_pair.target.config.vocab_size  # the reference, not the output, differs
    checked = certify(CausalLM(fp32_pair.target), prompts, [[o] for o in outputs], other)
    assert checked.status == "within_tolerance" and checked.exact_match_rate == pytest.approx(5 / 6)


def test_the_tolerance_follows_the_dtype() -> None:
    top = torch.tensor([20.0, 0.5])
    assert tolerance(top, torch.bfloat16).tolist() == pytest.approx([2 * 2**-7 * 20, 2 * 2**-7])
    assert tolerance(top, torch.float32)[0] == pytest.approx(2 * 2**-23 * 20)
    assert tolerance(top, torch.bfloat16, 0.0).tolist() == [0.0, 0.0]


def test_a_negative_tolerance_is_an_error(fp32_pair) -> None:
    with pytest.raises(ValueError, match="tolerance must be >= 0"):
        tolerance(torch.tensor([1.0]), torch.float32, -1.0)
    with pytest.raises(ValueError, match="tolerance must be >= 0"):
        certify(CausalLM(fp32_pair.target), [[1]], [[[2]]], [[2]], ulps=-0.5)
    with pytest.raises(ValidationError, match="tolerance_ulps"):
        Settings(tolerance_ulps=-1)


def test_margins_line_up_with_the_emitted_tokens(fp32_pair) -> None:
    prompts, outputs = _ar_outputs(fp32_pair, n=1)
    top, emitted, argmax = margins(CausalLM(fp32_pair.target), prompts[0], outputs[0])
    assert argmax.tolist() == outputs[0]  # greedy AR emits the argmax everywhere
    assert torch.equal(top, emitted)


def test_serve_says_which_certificate_its_trial_passed() -> None:
    from spectune.cli.serve_cmd import _certificate

    assert "identical to AR on every prompt" in _certificate({"lossless_status": "exact"})
    line = _certificate({"lossless_status": "within_tolerance", "exact_match_rate": 0.5, "worst_margin": 0.125})
    assert "within tolerance: 50% identical to AR" in line and "0.12 logits" in line
    assert _certificate({"lossless_status": "unchecked"}) is None and _certificate(None) is None


def test_bench_takes_the_tolerance_and_refuses_a_negative_one(micro_pair: Path) -> None:
    from typer.testing import CliRunner

    from spectune.cli import app

    bad = CliRunner().invoke(app, ["bench", "--pair", str(micro_pair), "-m", "ar", "--limit", "1",
                                   "--max-new-tokens", "2", "--repeats", "1", "--tolerance-ulps", "-1"])
    assert bad.exit_code == 2 and "--tolerance-ulps: Input should be greater than or equal to 0" in bad.output


def test_a_lossy_rows_json_names_the_failed_token_and_its_prompt(bf16_pair) -> None:
    from spectune.bench import failed_tokens

    outputs, broken, checked = _replaced(bf16_pair, 1, 3)
    named = load_prompts("default", len(outputs))
    [row] = failed_tokens(checked, named)["certificate_failures"]
    assert (row["prompt_id"], row["position"], row["token"]) == (named[1].id, 3, broken[1][3])
    assert row["argmax"] == outputs[1][3] and row["margin"] > row["tolerance"] > 0
