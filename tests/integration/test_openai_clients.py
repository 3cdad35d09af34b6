"""The endpoint as OpenAI clients and operators use it: the real `openai` SDK against `spectune serve`
(Ray Serve over HTTP on 127.0.0.1) serving the micro pair with a chat template (sps).

Completions and chat, plain and streamed, equal to plain AR decoding; stop sequences cut the answer
where AR's text holds the stop sequence first (and its token count is AR's through the token that
completed it); content parts; neutral fields accepted and others refused naming the field; a
non-JSON body refused with 415; GET /metrics scraped before and after, its counters moved by what
the responses reported; a client dropping a stream leaves no work and one log line. One
`spectune serve` start for the engine tests (~30 s here), and one vLLM-served configuration
(`backend: vllm`, ngram) answering completions and chat as the engine's AR does, with stop
sequences and vLLM's own counters in /metrics (one vLLM server start, ~50 s)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gguf_export import chat_micro_pair
from support import Served, shut_down, spectune_serve
from spectune.engine.loop import Decoder
from spectune.engine.sampling import Sampling
from spectune.methods import METHODS
from spectune.pair import Pair, load_pair
from spectune.pair_ref import PairRef

openai = pytest.importorskip("openai")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

PROMPT = "def add(a, b):\n"
MESSAGES = [{"role": "system", "content": "You write Python."},
            {"role": "user", "content": "Write a function that adds two numbers."}]
PARTS = [{"role": "system", "content": [{"type": "text", "text": "You write Python."}]},
         {"role": "user", "content": [{"type": "text", "text": "Write a function"},
                                      {"type": "text", "text": "that adds two numbers."}]}]
MAX_TOKENS = 40


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics as {(sample name, labels other than model_name): value}."""
    answer = httpx.get(f"{url}/metrics", timeout=30)
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
    found = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "model_name"))
            found[(sample.name, labels)] = sample.value
    return found


def moved(before: dict, after: dict, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def moved_in_all(before: dict, after: dict, name: str) -> float:
    """How far a metric moved, summed over its label sets (vLLM labels its engine)."""
    return sum(value - before.get(key, 0.0) for key, value in after.items() if key[0] == name)


def ar_tokens(pair: Pair, prompt_ids: list[int], max_tokens: int) -> list[int]:
    models = pair.runners()
    decoder = Decoder(models.target, METHODS.build("ar", {}, models), pair.eos_token_id)
    return decoder.generate(prompt_ids, max_tokens, Sampling(0.0, 1.0), 0).tokens


def ar_until(pair: Pair, tokens: list[int], stop_text: str) -> tuple[str, int]:
    """AR's answer cut at `stop_text`, and how many of its tokens it took to complete it."""
    for count in range(1, len(tokens) + 1):
        text = pair.decode(tokens[:count])
        if stop_text in text:
            return text[:text.index(stop_text)], count
    raise AssertionError(f"{stop_text!r} is not in AR's answer")


def a_stop_inside(text: str) -> str:
    """A 3-character stop sequence from the middle of `text` (its first occurrence is there)."""
    for start in range(len(text) // 3, len(text) - 3):
        candidate = text[start:start + 3]
        if candidate.strip() and text.index(candidate) == start:
            return candidate
    raise AssertionError(f"no stop sequence to pick from {text!r}")


@pytest.fixture(scope="module")
def chat_pair_dir(micro_pair: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return chat_micro_pair(micro_pair, tmp_path_factory.mktemp("openai-pair"))


@pytest.fixture(scope="module")
def pair(chat_pair_dir: Path) -> Pair:
    return load_pair(PairRef.model_validate(str(chat_pair_dir)))


@pytest.fixture(scope="module")
def served(chat_pair_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    folder = tmp_path_factory.mktemp("openai-serve")
    config = folder / "served.yaml"
    config.write_text(yaml.safe_dump({"pair": str(chat_pair_dir), "method": "sps", "knobs": {"draft_len": 3}}))
    started = spectune_serve(config, folder, "--num-cpus", "1")
    try:
        yield started
    finally:
        shut_down(started)


@pytest.fixture(scope="module")
def answers(pair: Pair) -> dict[str, list[int]]:
    """AR greedy tokens of the completion prompt and of the templated conversation."""
    templated = pair.tokenizer.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True,
                                                   return_dict=False)
    return {"completion": ar_tokens(pair, pair.encode(PROMPT), MAX_TOKENS),
            "chat": ar_tokens(pair, list(templated), MAX_TOKENS)}


def test_completions_and_chat_plain_and_streamed_equal_ar(served: Served, pair: Pair, answers) -> None:
    client = served.client()
    (model,) = [m.id for m in client.models.list()]
    reference = pair.decode(answers["completion"])
    whole = client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    assert whole.choices[0].text == reference and whole.usage.completion_tokens == len(answers["completion"])
    stream = client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == reference

    chat_reference = pair.decode(answers["chat"])
    for messages in (MESSAGES, PARTS[:1] + MESSAGES[1:]):  # a string, or text parts (one here: same prompt)
        answer = client.chat.completions.create(model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0)
        assert answer.choices[0].message.content == chat_reference
    streamed = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0,
                                              stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices) == chat_reference


def test_text_parts_are_joined_by_newlines_as_the_template_reads_them(served: Served, pair: Pair) -> None:
    client, model = served.client(), served.model
    joined = [{"role": "system", "content": "You write Python."},
              {"role": "user", "content": "Write a function\nthat adds two numbers."}]
    templated = list(pair.tokenizer.apply_chat_template(joined, tokenize=True, add_generation_prompt=True,
                                                        return_dict=False))
    answer = client.chat.completions.create(model=model, messages=PARTS, max_tokens=16, temperature=0)
    assert answer.choices[0].message.content == pair.decode(ar_tokens(pair, templated, 16))
    assert answer.usage.prompt_tokens == len(templated)  # the parts joined by "\n", nothing else
    with pytest.raises(openai.BadRequestError, match=r"messages.1.content: content part 0 is type 'image_url'"):
        client.chat.completions.create(model=model, messages=[MESSAGES[0], {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://example.com/cat.png"}}]}], max_tokens=4)


def test_stop_sequences_cut_the_answer_where_ar_first_holds_one(served: Served, pair: Pair, answers) -> None:
    client, model = served.client(), served.model
    stop = a_stop_inside(pair.decode(answers["completion"]))
    expected, tokens = ar_until(pair, answers["completion"], stop)
    for stops in (stop, ["\x00never", stop]):
        whole = client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, stop=stops)
        assert (whole.choices[0].text, whole.choices[0].finish_reason) == (expected, "stop")
        assert whole.usage.completion_tokens == tokens  # AR's count, though a step may have emitted more
    chunks = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                            stop=[stop], stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert all(stop not in c.choices[0].text for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop"

    chat_stop = "\n\n"  # the micro model answers any conversation with newlines, one per token
    chat_expected, chat_tokens = ar_until(pair, answers["chat"], chat_stop)
    answer = client.chat.completions.create(model=model, messages=PARTS[:1] + MESSAGES[1:], max_tokens=MAX_TOKENS,
                                            temperature=0, stop=chat_stop)
    assert (answer.choices[0].message.content, answer.choices[0].finish_reason) == (chat_expected, "stop")
    assert answer.usage.completion_tokens == chat_tokens
    streamed = list(client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0,
                                                   stop=[chat_stop], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == chat_expected
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_neutral_fields_are_accepted_and_others_refused_naming_the_field(served: Served, pair: Pair, answers) -> None:
    client, model = served.client(), served.model
    neutral = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, presence_penalty=0, frequency_penalty=0,
        logprobs=None, echo=False, n=1, logit_bias={}, stream=False,
        extra_body={"repetition_penalty": 1.0, "top_k": -1, "min_p": 0, "ignore_eos": False})
    assert neutral.choices[0].text == pair.decode(answers["completion"])
    refusals = [({"presence_penalty": 0.5}, "presence_penalty: only 0 is accepted"),
                ({"logprobs": 2}, "logprobs: only null is accepted"),
                ({"stop": ["a", "b", "c", "d", "e"]}, "stop: at most 4 stop sequences"),
                ({"stop": ""}, "stop: a stop sequence is empty"),
                ({"extra_body": {"repetition_penalty": 1.2}}, "repetition_penalty: only 1 is accepted")]
    for fields, reason in refusals:
        with pytest.raises(openai.BadRequestError, match=reason):
            client.completions.create(model=model, prompt=PROMPT, max_tokens=4, **fields)
    with pytest.raises(openai.BadRequestError, match="frequency_penalty: only 0 is accepted"):
        client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=4, frequency_penalty=1)


def test_a_body_not_sent_as_json_gets_415(served: Served) -> None:
    body = '{"prompt": "x", "max_tokens": 2}'
    for route in ("/v1/completions", "/v1/chat/completions"):
        refused = httpx.post(f"{served.url}{route}", content=body, headers={"content-type": "text/plain"}, timeout=30)
        assert refused.status_code == 415, refused.text
        assert refused.json()["error"]["message"] == ("send the body as JSON with 'Content-Type: application/json' "
                                                      "(got 'text/plain')")
    sent = httpx.post(f"{served.url}/v1/completions", content=body,
                      headers={"content-type": "application/json; charset=utf-8"}, timeout=30)
    assert sent.status_code == 200


def test_metrics_move_by_what_the_responses_reported(served: Served, pair: Pair, answers) -> None:
    client, model = served.client(), served.model
    before = scrape(served.url)
    plain = [client.completions.create(model=model, prompt=p, max_tokens=24, temperature=0)
             for p in (PROMPT, "import os\n", "class Stack:\n")]
    chat = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=24, temperature=0)
    stop = a_stop_inside(pair.decode(answers["completion"]))
    stopped = client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, stop=stop)
    streamed = list(client.completions.create(model=model, prompt="for i in range(10):\n", max_tokens=24, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model, prompt=PROMPT, max_tokens=4, presence_penalty=1)
    after = scrape(served.url)

    answered = [*plain, chat, stopped]
    usages = [a.usage for a in answered] + [streamed[-1].usage]
    finish = [a.choices[0].finish_reason for a in answered] + [streamed[-2].choices[0].finish_reason]
    assert moved(before, after, "spectune:requests_total", status="finished") == 6
    assert moved(before, after, "spectune:requests_total", status="rejected") == 1
    assert moved(before, after, "spectune:requests_total", status="failed") == 0
    for reason in ("stop", "length"):
        assert moved(before, after, "spectune:request_success_total", finished_reason=reason) == finish.count(reason)
    assert moved(before, after, "spectune:prompt_tokens_total") == sum(u.prompt_tokens for u in usages)
    assert moved(before, after, "spectune:generation_tokens_total") == sum(u.completion_tokens for u in usages)
    assert moved(before, after, "spectune:time_to_first_token_seconds_count") == 6
    assert after[("spectune:num_requests_running", ())] == 0

    # one answer not cut by a stop sequence or the end-of-sequence token: each step drafted (sps; not the
    # last when one token was left) and emitted its accepted draft tokens plus the target's own token
    before = after
    single = client.completions.create(model=model, prompt="with open(path) as f:\n", max_tokens=24,
                                       temperature=0)
    after = scrape(served.url)
    stats, tokens = single.model_extra["speculative"], single.usage.completion_tokens
    assert single.choices[0].finish_reason == "length"
    accepted = moved(before, after, "spectune:spec_decode_num_accepted_tokens_total")
    assert accepted == tokens - stats["target_calls"]
    assert moved(before, after, "spectune:spec_decode_num_drafts_total") in (stats["target_calls"] - 1,
                                                                              stats["target_calls"])
    draft_tokens = moved(before, after, "spectune:spec_decode_num_draft_tokens_total")
    assert accepted / draft_tokens == pytest.approx(stats["acceptance_rate"])
    per_position = {labels[0][1]: after[(name, labels)] - before.get((name, labels), 0.0)
                    for name, labels in after if name == "spectune:spec_decode_num_accepted_tokens_per_pos_total"}
    assert sum(per_position.values()) == accepted  # position i once per draft that kept its first i+1 tokens
    assert all(per_position.get(str(i), 0) >= per_position.get(str(i + 1), 0) for i in range(3))


def test_a_client_dropping_a_stream_leaves_no_work_and_one_log_line(served: Served) -> None:
    deadline = time.monotonic() + 30
    while "serving " not in served.log.read_text(errors="replace") and time.monotonic() < deadline:
        time.sleep(0.5)  # start-up's last lines are in
    before = scrape(served.url)
    health = httpx.get(f"{served.url}/healthz", timeout=30).json()
    logged = served.log.read_text(errors="replace")
    drops = 3
    with httpx.Client(base_url=served.url, timeout=60) as http:
        for _ in range(drops):
            request = {"prompt": PROMPT, "max_tokens": 300, "temperature": 0, "stream": True}
            with http.stream("POST", "/v1/completions", json=request) as response:
                next(line for line in response.iter_lines() if line.startswith("data: "))
    deadline = time.monotonic() + 30
    while (after := scrape(served.url))[("spectune:num_requests_running", ())] and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(2)  # the replica's log lines reach the driver's output
    assert after[("spectune:num_requests_running", ())] == 0
    assert moved(before, after, "spectune:requests_total", status="cancelled") == drops
    now = httpx.get(f"{served.url}/healthz", timeout=30).json()
    assert now["active_requests"] == 0
    assert now["cancelled_requests"] == health["cancelled_requests"] + drops  # stopped early, not decoded to 300
    new = served.log.read_text(errors="replace")[len(logged):].splitlines()
    assert not [line for line in new if any(word in line for word in ("Traceback", "ERROR", "WARNING", "Error"))], new
    served_lines = [line for line in new if "(ProxyActor" in line or "(ServeReplica" in line]
    others = [line for line in served_lines if " -- POST /v1/" not in line and " -- GET /" not in line]
    assert len(others) == drops and all("disconnected, cancelling request" in line for line in others), new


# --- a vLLM-served configuration (one vLLM server start, ~40 s) ------------------------------


def _vllm_environment() -> bool:
    from spectune.backends.vllm import vllm_python

    return Path(vllm_python()).exists()


@pytest.mark.timeout(900)
@pytest.mark.skipif(not _vllm_environment(), reason="no vLLM environment: run `make vllm`")
def test_a_vllm_served_configuration_answers_chat_stop_and_metrics(chat_pair_dir: Path, pair: Pair, answers,
                                                                   tmp_path: Path) -> None:
    config = tmp_path / "served.yaml"
    config.write_text(yaml.safe_dump({
        "pair": str(chat_pair_dir), "backend": "vllm", "method": "ngram",
        "knobs": {"num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1},
        "vllm": {"max_model_len": 1024, "kv_cache_gb": 1, "start_timeout_s": 240}}))
    vllm = spectune_serve(config, tmp_path, "--num-cpus", "2")
    try:
        client, model = vllm.client(), vllm.model
        before = scrape(vllm.url)
        # the engine backend's answers (AR, exact): vLLM decodes the same token ids of the same prompts
        reference = pair.decode(answers["completion"])
        whole = client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
        assert whole.choices[0].text == reference
        chat = client.chat.completions.create(model=model, messages=PARTS[:1] + MESSAGES[1:],
                                              max_tokens=MAX_TOKENS, temperature=0)
        assert chat.choices[0].message.content == pair.decode(answers["chat"])
        assert chat.usage.prompt_tokens == len(pair.tokenizer.apply_chat_template(
            MESSAGES, tokenize=True, add_generation_prompt=True, return_dict=False))  # rendered here, once
        streamed = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=MAX_TOKENS,
                                                  temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == pair.decode(answers["chat"])

        stop_text = a_stop_inside(reference)
        expected, _ = ar_until(pair, answers["completion"], stop_text)
        stopped = client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                            stop=[stop_text])
        assert (stopped.choices[0].text, stopped.choices[0].finish_reason) == (expected, "stop")
        chunks = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS,
                                                temperature=0, stop=stop_text, stream=True))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
        assert chunks[-1].choices[0].finish_reason == "stop"
        chat_stopped = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=MAX_TOKENS,
                                                      temperature=0, stop="\n\n")
        assert (chat_stopped.choices[0].message.content, chat_stopped.choices[0].finish_reason) == (
            ar_until(pair, answers["chat"], "\n\n")[0], "stop")
        with pytest.raises(openai.BadRequestError, match="top_k: only -1 or 0 is accepted"):
            client.completions.create(model=model, prompt=PROMPT, max_tokens=4, extra_body={"top_k": 5})
        after = scrape(vllm.url)
    finally:
        shut_down(vllm)
    answered = [whole, chat, stopped, chat_stopped]
    assert moved(before, after, "spectune:requests_total", status="finished") == 6  # two streams among them
    assert moved(before, after, "spectune:requests_total", status="rejected") == 1
    assert moved(before, after, "spectune:generation_tokens_total") >= sum(a.usage.completion_tokens for a in answered)
    assert moved(before, after, "spectune:request_success_total", finished_reason="stop") == 3
    assert moved(before, after, "spectune:request_success_total", finished_reason="length") == 3
    # vLLM's own counters, in the same scrape: its speculation on these requests
    assert moved_in_all(before, after, "vllm:spec_decode_num_drafts_total") > 0
    assert moved_in_all(before, after, "vllm:spec_decode_num_draft_tokens_total") >= moved_in_all(
        before, after, "vllm:spec_decode_num_accepted_tokens_total")
