"""`spectune bench` end to end on the micro pair, and every bad input it must refuse clearly."""

import json

import pytest
from typer.testing import CliRunner

from spectune.cli import app

runner = CliRunner()


def bench(*args):
    return runner.invoke(app, ["bench", *map(str, args)])


def test_bench_json_reports_every_field(micro_pair):
    result = bench("--pair", micro_pair, "--limit", 3, "--max-new-tokens", 12, "--repeats", 2, "--warmup", 1,
                   "--method", "sps", "--set", "draft_len=3", "--method", "pld", "--json")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r["method"] for r in rows] == ["ar", "sps", "pld"]
    required = {"method", "config", "n_prompts", "new_tokens", "target_calls", "draft_calls", "mean_accepted_tokens",
                "acceptance_rate", "acceptance_by_position", "wall_s", "tokens_per_s", "ar_tokens_per_s", "speedup",
                "lossless", "mismatches"}
    for row in rows:
        assert required <= row.keys()
        assert row["lossless"] is True and row["mismatches"] == 0
        assert row["n_prompts"] == 3 and row["new_tokens"] > 0
        assert len(row["speedups"]) == 2
    sps = rows[1]
    assert sps["config"] == {"method": "sps", "draft_len": 3, "temperature": 0.0}
    assert sps["target_calls"] < sps["new_tokens"]  # some drafts were accepted
    assert len(sps["acceptance_by_position"]) == 3
    assert rows[0]["speedup"] == pytest.approx(1.0)


def test_bench_sampling_reports_lossless_null(micro_pair):
    result = bench("--pair", micro_pair, "--limit", 2, "--max-new-tokens", 8, "--repeats", 1, "--warmup", 0,
                   "--method", "tree", "--set", "branching=[2,2]", "--temperature", 0.7, "--top-p", 0.9, "--json")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert all(r["lossless"] is None and r["mismatches"] is None for r in rows)


def test_bench_markdown_table(micro_pair):
    result = bench("--pair", micro_pair, "--limit", 2, "--max-new-tokens", 8, "--repeats", 2, "--warmup", 0,
                   "--method", "pld", "--set", "matches=2", "--markdown")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line.startswith("|")]
    assert lines[0].startswith("| configuration | speedup | ± std | repeats |")
    assert len(lines) == 4  # header, rule, ar, pld
    ar, pld = (line.split(" | ") for line in lines[2:])
    assert ar[0] == "| `ar`" and ar[1] == "1.00x" and pld[0] == "| `pld(matches=2)`"
    assert len(pld[3].split(", ")) == 2 and pld[-1] == "yes |"  # both repeats; lossless


def test_hf_peer_rows(micro_pair):
    result = bench("--pair", micro_pair, "--limit", 2, "--max-new-tokens", 12, "--repeats", 1, "--warmup", 0,
                   "--method", "sps", "--peer", "hf", "--json")
    assert result.exit_code == 0, result.output
    rows = {json.loads(line)["method"]: json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")}
    assert {"hf-ar", "hf-assisted", "hf-pld"} <= rows.keys()
    assert rows["hf-assisted"]["lossless"] is True  # HF's greedy assisted generation is lossless too
    assert rows["hf-assisted"]["speedup"] > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--max-new-tokens", 0], "--max-new-tokens: Input should be greater than or equal to 1"),
        (["--method", "tree", "--set", "paths=[[0,0]]"], "prefix [0] is not"),
        (["--method", "tree", "--set", "branching=[40,40,40]"],  # refused at build, before any decoding
         "tree: branching=[40, 40, 40] makes a draft tree of 65640 nodes; the model context of 1024 positions allows "
         "1..1022"),
        (["--method", "sps", "--set", "draft_len=0"], "draft_len"),
        (["--method", "nosuch"], "unknown method 'nosuch'"),
        (["--method", "sps", "--set", "bogus=1"], "no --method given takes the knob 'bogus'"),
        (["--target", "/nonexistent/model"], "model path /nonexistent/model does not exist"),
        (["--peer", "vllm"], "unknown peer"),
    ],
)
def test_bad_input_is_named(micro_pair, args, message):
    result = bench("--pair", micro_pair, "--limit", 1, "--max-new-tokens", 4, "--repeats", 1, "--warmup", 0, *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_broken_prompt_file_names_the_line(micro_pair, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "a", "prompt": "def f():"}\n{"id": "b", "prompt": \n')
    result = bench("--pair", micro_pair, "--prompts", prompts)
    assert result.exit_code == 2 and "line 2: not valid JSON" in result.output


def test_empty_and_overlong_prompts(micro_pair, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"id": "a", "prompt": "   "}\n')
    result = bench("--pair", micro_pair, "--prompts", empty)
    assert result.exit_code == 2 and "line 1: prompt: Value error, the prompt is empty" in result.output
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"id": "huge", "prompt": "x = 1\n" * 3000}) + "\n")
    result = bench("--pair", micro_pair, "--prompts", long, "--repeats", 1, "--warmup", 0)
    assert result.exit_code == 2 and "prompt 'huge' is" in result.output and "exceeds the target's context" in result.output


def test_drafter_with_another_vocabulary_is_refused(micro_pair, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from support import random_llama

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(["def f(x): return x + 1"] * 10, trainers.BpeTrainer(vocab_size=300))
    other = tmp_path / "other"
    random_llama(seed=3, vocab=tok.get_vocab_size()).save_pretrained(other)
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(other)
    result = bench("--target", micro_pair / "target", "--drafter", other)
    assert result.exit_code == 2
    assert "uses a different tokenizer" in result.output


def test_bench_takes_a_hybrid_pair(hybrid_micro_pair):
    """A hybrid SSM-attention pair: chains and STree (and its branch-by-branch baseline) decode it losslessly."""
    result = bench("--pair", hybrid_micro_pair, "--limit", 2, "--max-new-tokens", 12, "--repeats", 1, "--warmup", 0,
                   "--method", "sps", "--method", "stree", "--set", "verify=branches", "--json")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r["method"] for r in rows] == ["ar", "sps", "stree"]
    assert all(r["lossless"] is True for r in rows)


def test_a_method_that_cannot_decode_a_hybrid_is_refused_in_one_line(hybrid_micro_pair):
    result = bench("--pair", hybrid_micro_pair, "--limit", 1, "--max-new-tokens", 4, "--repeats", 1, "--warmup", 0,
                   "--method", "layerskip")
    assert result.exit_code == 2, result.output
    assert "method 'layerskip' cannot decode a hybrid SSM-attention target: it drafts with" in result.output
    assert "Traceback" not in result.output


def test_compiled_target_runs_compiled_for_ours_and_hf_and_stays_certified(micro_pair):
    """`--compile`: the target's forward is torch.compile'd once for every contender (HF's generate too),
    and every greedy output still passes the certificate (exact, or within the dtype's tolerance)."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    result = bench("--pair", micro_pair, "--limit", 2, "--max-new-tokens", 12, "--repeats", 1, "--warmup", 1,
                   "--method", "pld", "--method", "tree", "--peer", "hf", "--json", "--compile", "default")
    assert result.exit_code == 0, result.output
    rows = {json.loads(line)["method"]: json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")}
    assert {"ar", "pld", "tree", "hf-ar", "hf-pld"} <= rows.keys()
    assert all(row["lossless_status"] in ("exact", "within_tolerance") for row in rows.values()), rows
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # a chain and a tree (and HF's) compiled


def test_max_autotune_compiles_tuned_products_and_stays_certified(micro_pair):
    """`--compile max-autotune`: inductor freezes the weights and prepacks them for its tuned matrix products, and
    every greedy output still passes the certificate (a prompt's prefill, a one-token step and a chain compiled)."""
    import torch._dynamo
    import torch._inductor.config

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch._inductor.config.patch(fx_graph_cache=False, autotune_local_cache=False):  # tune here, not read back
        result = bench("--pair", micro_pair, "--limit", 1, "--max-new-tokens", 8, "--repeats", 1, "--warmup", 0,
                       "--method", "pld", "--json", "--compile", "max-autotune")
    assert result.exit_code == 0, result.output
    rows = {json.loads(line)["method"]: json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")}
    assert {"ar", "pld"} <= rows.keys()
    assert all(row["lossless_status"] in ("exact", "within_tolerance") for row in rows.values()), rows
    inductor = torch._dynamo.utils.counters["inductor"]  # the frozen weights were prepacked for oneDNN or C++ GEMMs
    assert inductor["mkldnn_linear_weight_pack_matcher_count"] + inductor["cpp_templated_kernel_counter"] >= 1, dict(
        inductor)


def test_an_unknown_compile_mode_is_refused_in_one_line(micro_pair):
    result = bench("--pair", micro_pair, "--limit", 1, "--compile", "fastest")
    assert result.exit_code != 0 and "compile" in result.output and "max-autotune" in result.output
    assert "Traceback" not in result.output
