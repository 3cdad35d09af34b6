"""OpenAI's request shape, without a model: stop sequences cut on the decoded text (across tokens and
across streamed steps), chat content parts flattened as the chat template reads them, neutral fields
accepted and anything else refused with the field and why, and the metrics counted from step records."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from spectune.engine.loop import StepRecord
from spectune.workers.serve.chat import ChatCompletionRequest, flatten_content
from spectune.workers.serve.metrics import RequestMetrics, SpecDecodeMetrics
from spectune.workers.serve.openai_schema import CompletionRequest, Usage
from spectune.workers.serve.text import CompletionText, StopText, first_stop, partial_stop

# A toy detokenizer: token i is the i-th piece (several characters each, one split mid-character).
PIECES = ["def", " add", "(a", ", b", "):\n", "    ret", "urn", " a + b", "\n\nde", "f sub"]
E_ACUTE = "é".encode()


def decode(tokens: list[int]) -> str:
    return "".join(PIECES[t] for t in tokens)


def streamed(text: CompletionText, steps: list[list[int]]) -> list[str]:
    """What a client receives, step by step, then the flush."""
    pieces = []
    for step in steps:
        pieces.append(text.add(step))
        if text.stopped:
            break
    pieces.append(text.flush())
    return pieces


def test_the_first_stop_sequence_and_what_could_start_one() -> None:
    assert first_stop("abc\n\ndef", ["\n\n", "c"]) == 2  # the earliest, whichever is listed first
    assert first_stop("abc", ["x"]) is None and first_stop("", ["x"]) is None
    assert partial_stop("return a\n", ["\n\n"]) == 1
    assert partial_stop("abcEN", ["END", "ENDING"]) == 2
    assert partial_stop("abc", ["END"]) == 0 and partial_stop("abc", []) == 0


def test_a_stop_sequence_split_over_two_steps_of_several_tokens_is_cut_and_never_sent() -> None:
    # "+ b\n\nde" begins in token 7 (" a + b", the last of step 2's five) and completes in token 8 of step 3
    text = CompletionText(decode, ["+ b\n\nde"])
    received = streamed(text, [[0, 1, 2], [3, 4, 5, 6, 7], [8, 9]])
    assert received == ["def add(a", ", b):\n    return a ", "", ""]  # "+ b" held back, then never sent
    assert "".join(received) == text.text == "def add(a, b):\n    return a "
    assert text.stopped and text.tokens == [0, 1, 2, 3, 4, 5, 6, 7, 8]  # through the token that completed it


def test_a_stop_sequence_across_tokens_of_one_step_keeps_only_the_tokens_it_took() -> None:
    # "(a, b)" spans tokens 2 .. 4 of one step of six; the step's last tokens are dropped
    text = CompletionText(decode, ["a, b)"])
    received = streamed(text, [[0, 1, 2, 3, 4, 5, 6]])
    assert "".join(received) == "def add(" and text.stopped and text.tokens == [0, 1, 2, 3, 4]


def test_streaming_holds_back_what_could_start_a_stop_sequence_then_releases_it() -> None:
    stop = StopText(["\n\n"])
    assert stop.add("return a") == "return a"
    assert stop.add(" + b\n") == " + b"  # "\n" might begin "\n\n"
    assert stop.add("x") == "\nx"  # it did not
    assert stop.add("\n") == ""
    assert stop.flush() == "\n" and not stop.stopped  # the end: nothing can follow
    split = StopText(["STOP"])
    assert [split.add(p) for p in ("ab", "cS", "T", "OPde")] == ["ab", "c", "", ""]
    assert split.stopped and split.text == "abc" and split.flush() == ""


def test_stop_text_equals_the_whole_text_cut_whatever_the_chunking() -> None:
    whole = "one\ntwo END three\n\nEND"
    stops = ["END", "\n\n"]
    cut = whole[:first_stop(whole, stops)]
    for size in (1, 2, 3, 5, len(whole)):
        stop = StopText(stops)
        sent = "".join(stop.add(whole[i:i + size]) for i in range(0, len(whole), size)) + stop.flush()
        assert sent == cut == "one\ntwo ", size


def test_without_stop_sequences_the_text_is_the_decoded_tokens() -> None:
    text = CompletionText(decode)
    received = streamed(text, [[0, 1], [2, 3, 4], [5, 6, 7, 8, 9]])
    assert "".join(received) == decode(list(range(10))) and not text.stopped and text.tokens == list(range(10))


def test_half_a_character_is_never_matched_or_sent() -> None:
    raw = [b"ab", E_ACUTE[:1], E_ACUTE[1:], b"cd"]

    def bytes_decode(tokens: list[int]) -> str:
        return b"".join(raw[t] for t in tokens).decode("utf-8", errors="replace")

    text = CompletionText(bytes_decode, ["\u00e9c"])
    assert [text.add([0]), text.add([1]), text.add([2])] == ["ab", "", ""]  # "é" might begin "éc"
    assert text.add([3]) == "" and text.stopped and text.text == "ab" and text.tokens == [0, 1, 2, 3]


@pytest.mark.parametrize("content, expected", [
    ("plain", "plain"),
    ([{"type": "text", "text": "first"}], "first"),
    ([{"type": "text", "text": "first"}, {"type": "text", "text": "second"}], "first\nsecond"),
    ([], ""),
])
def test_content_parts_are_flattened_as_the_chat_template_reads_them(content, expected) -> None:
    assert flatten_content(content) == expected
    request = ChatCompletionRequest(messages=[{"role": "user", "content": content}])
    assert request.messages[0].content == expected


@pytest.mark.parametrize("content, reason", [
    ([{"type": "image_url", "image_url": {"url": "http://x/y.png"}}], "content part 0 is type 'image_url'"),
    ([{"type": "text", "text": "a"}, "b"], "content part 1 is str"),
    ([{"type": "text"}], "content part 0 must be {'type': 'text', 'text': <string>}"),
    (7, "content must be a string or a list of text parts"),
])
def test_other_content_is_refused_naming_the_message(content, reason) -> None:
    with pytest.raises(ValidationError) as caught:
        ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}, {"role": "user", "content": content}])
    [error] = caught.value.errors()
    assert error["loc"] == ("messages", 1, "content") and reason in error["msg"]


NEUTRAL_REQUEST = {"presence_penalty": 0, "frequency_penalty": 0.0, "logprobs": None, "echo": False, "n": 1,
                   "logit_bias": {}, "repetition_penalty": 1.0, "top_k": -1, "min_p": 0, "ignore_eos": False,
                   "stream_options": {"include_usage": True}}


def test_neutral_values_are_accepted_as_clients_and_load_tools_send_them() -> None:
    CompletionRequest(prompt="x", **NEUTRAL_REQUEST)
    CompletionRequest(prompt="x", top_k=0, logit_bias=None)
    chat = {k: v for k, v in NEUTRAL_REQUEST.items() if k != "echo"}
    ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], **chat, top_logprobs=0)
    ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], logprobs=False)


def test_what_vllm_bench_serve_sends_is_accepted() -> None:
    # vLLM 0.32's benchmarks/lib/endpoint_request_func.py, openai-completions and openai-chat backends
    completion = {"model": "m", "prompt": "x", "repetition_penalty": 1.0, "max_tokens": 8, "logprobs": None,
                  "stream": True, "stream_options": {"include_usage": True}}
    assert CompletionRequest.model_validate(completion).stream
    chat = {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}],
            "max_completion_tokens": 8, "stream": True, "stream_options": {"include_usage": True}}
    assert ChatCompletionRequest.model_validate(chat).completion("x").max_tokens == 8


@pytest.mark.parametrize("field, value, reason", [
    ("presence_penalty", 0.5, "only 0 is accepted: penalties are not applied"),
    ("frequency_penalty", -1, "only 0 is accepted: penalties are not applied"),
    ("logprobs", 0, "only null is accepted: log probabilities are not returned"),
    ("logprobs", 5, "only null is accepted"),
    ("echo", True, "only false is accepted: the prompt is not echoed back"),
    ("n", 2, "only 1 is accepted: one completion per request"),
    ("logit_bias", {"50256": -100}, "only null or {} is accepted: logit biases are not applied"),
    ("repetition_penalty", 1.1, "only 1 is accepted"),
    ("top_k", 40, "only -1 or 0 is accepted: top_k is not applied"),
    ("min_p", 0.05, "only 0 is accepted: min_p is not applied"),
    ("ignore_eos", True, "only false is accepted: decoding ends at the end-of-sequence token"),
    ("stop", ["a", "b", "c", "d", "e"], "at most 4 stop sequences are allowed, got 5"),
    ("stop", "", "a stop sequence is empty"),
    ("stop", ["\n", ""], "a stop sequence is empty"),
])
def test_anything_else_is_refused_naming_the_field_and_why(field, value, reason) -> None:
    with pytest.raises(ValidationError) as caught:
        CompletionRequest(prompt="x", **{field: value})
    [error] = caught.value.errors()
    assert error["loc"] == (field,) and reason in error["msg"]


def test_chat_logprobs_are_refused_when_asked_for() -> None:
    for field, value in (("logprobs", True), ("top_logprobs", 3)):
        with pytest.raises(ValidationError, match=f"{field}\n.*log probabilities are not returned"):
            ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], **{field: value})


def test_stop_is_a_string_or_a_list_and_reaches_the_rendered_completion() -> None:
    assert CompletionRequest(prompt="x", stop="\n").stops == ("\n",)
    assert CompletionRequest(prompt="x", stop=["a", "bc"]).stops == ("a", "bc")
    assert CompletionRequest(prompt="x").stops == () == CompletionRequest(prompt="x", stop=None).stops
    chat = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], stop=["\n"], max_completion_tokens=9)
    assert chat.completion("rendered").stops == ("\n",) and chat.completion("rendered").max_tokens == 9


def samples(metrics: RequestMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "model_name"))
            found[(sample.name, labels)] = sample.value
    return found


def test_metrics_count_requests_and_drafts_from_step_records_in_a_registry_of_their_own() -> None:
    metrics, other = RequestMetrics("m"), RequestMetrics("m")  # two services in one process
    spec = SpecDecodeMetrics(metrics)
    with metrics.track() as track:
        metrics.finished(track, Usage(prompt_tokens=5, completion_tokens=7, total_tokens=12), "stop", 0.02, 0.005)
    spec.add([StepRecord(drafted=4, depth=4, accepted=2, draft_calls=4), StepRecord(0, 0, 0, 0),
              StepRecord(drafted=6, depth=3, accepted=3, draft_calls=3)])
    with pytest.raises(RuntimeError), metrics.track():
        raise RuntimeError("decode failed")
    with metrics.track():
        pass  # ended without an answer: the client went away
    metrics.rejected()
    seen = samples(metrics)
    assert seen[("spectune:requests_total", (("status", "finished"),))] == 1
    assert seen[("spectune:requests_total", (("status", "failed"),))] == 1
    assert seen[("spectune:requests_total", (("status", "cancelled"),))] == 1
    assert seen[("spectune:requests_total", (("status", "rejected"),))] == 1
    assert seen[("spectune:request_success_total", (("finished_reason", "stop"),))] == 1
    assert seen[("spectune:request_success_total", (("finished_reason", "length"),))] == 0
    assert seen[("spectune:prompt_tokens_total", ())] == 5 and seen[("spectune:generation_tokens_total", ())] == 7
    assert seen[("spectune:num_requests_running", ())] == 0
    assert seen[("spectune:time_to_first_token_seconds_count", ())] == 1
    assert seen[("spectune:time_per_output_token_seconds_sum", ())] == pytest.approx(0.005)
    assert seen[("spectune:spec_decode_num_drafts_total", ())] == 2  # the AR step drafted nothing
    assert seen[("spectune:spec_decode_num_draft_tokens_total", ())] == 10
    assert seen[("spectune:spec_decode_num_accepted_tokens_total", ())] == 5
    per_position = {dict(labels)["position"]: value for (name, labels), value in seen.items()
                    if name == "spectune:spec_decode_num_accepted_tokens_per_pos_total"}
    assert per_position == {"0": 2, "1": 2, "2": 1}
    assert samples(other)[("spectune:requests_total", (("status", "finished"),))] == 0  # not shared
