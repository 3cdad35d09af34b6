"""`/v1/chat/completions`: the conversation through the served model's chat template, plain and streamed.

Each test runs twice: in-process (FastAPI's TestClient) and over HTTP against a real `spectune serve`
(Ray Serve, its own local Ray; one start for the module, ~30 s), through the same httpx client calls."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from fastapi.testclient import TestClient

from gguf_export import chat_micro_pair
from support import serving
from spectune.engine.loop import Decoder
from spectune.methods import METHODS
from spectune.pair import Pair, load_pair
from spectune.pair_ref import PairRef
from spectune.workers.serve.app import build_app
from spectune.workers.serve.completion import SpectuneCompletionService
from spectune.workers.serve.served_config import Limits, from_config_file

MESSAGES = [{"role": "user", "content": "Write a function that adds two numbers."}]


@pytest.fixture(scope="module")
def chat_pair_dir(micro_pair: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The micro target through GGUF (which carries a chat template) beside the micro drafter."""
    return chat_micro_pair(micro_pair, tmp_path_factory.mktemp("chat-serve"))


def _client(pair_dir: Path, folder: Path) -> Iterator[tuple[TestClient, Pair]]:
    config = folder / "served.yaml"
    config.write_text(yaml.safe_dump({"pair": str(pair_dir), "method": "sps", "knobs": {"draft_len": 3}}))
    pair = load_pair(PairRef.model_validate(str(pair_dir)))
    service = SpectuneCompletionService(pair, from_config_file(str(config)), Limits(max_tokens_limit=64))
    yield TestClient(build_app(service)), pair
    service.close()


@pytest.fixture(scope="module", params=["in-process", pytest.param("http", marks=pytest.mark.slow)])
def chat(request: pytest.FixtureRequest, chat_pair_dir: Path,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[httpx.Client, Pair]]:
    if request.param == "in-process":
        yield from _client(chat_pair_dir, tmp_path_factory.mktemp("served"))
        return
    config = {"pair": str(chat_pair_dir), "method": "sps", "knobs": {"draft_len": 3}}
    with serving(config, tmp_path_factory.mktemp("chat-http"), "--num-cpus", "1",
                 "--max-tokens-limit", "64") as served, \
            httpx.Client(base_url=served.url, timeout=60) as http:
        yield http, load_pair(PairRef.model_validate(str(chat_pair_dir)))


def _ar(pair: Pair, prompt_ids: list[int], max_tokens: int) -> list[int]:
    models = pair.runners()
    return Decoder(models.target, METHODS.build("ar", {}, models), pair.eos_token_id).generate(prompt_ids, max_tokens).tokens


def test_a_chat_completion_is_the_templated_prompt_decoded_greedily(chat) -> None:
    client, pair = chat
    answer = client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 20, "temperature": 0})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    templated = pair.tokenizer.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True,
                                                   return_dict=False)
    reference = _ar(pair, list(templated), 20)
    assert body["choices"][0]["message"] == {"role": "assistant", "content": pair.decode(reference)}
    assert body["usage"]["prompt_tokens"] == len(templated) and body["speculative"]["method"] == "sps"


def test_a_streamed_chat_completion_reassembles_to_the_whole(chat) -> None:
    client, _ = chat
    request = {"messages": MESSAGES, "max_tokens": 20, "temperature": 0}
    whole = client.post("/v1/chat/completions", json=request).json()["choices"][0]["message"]["content"]
    with client.stream("POST", "/v1/chat/completions", json={**request, "stream": True}) as response:
        assert response.status_code == 200
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"]["content"] or "" for c in chunks) == whole
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_the_openai_client_talks_to_it(chat) -> None:
    import openai

    client, pair = chat
    api = openai.OpenAI(base_url=str(client.base_url).rstrip("/") + "/v1", api_key="none", http_client=client,
                        max_retries=0)
    (model,) = [m.id for m in api.models.list()]
    answer = api.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8, temperature=0)
    templated = list(pair.tokenizer.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True,
                                                        return_dict=False))
    reference = _ar(pair, templated, 8)
    assert answer.object == "chat.completion" and answer.model == model and answer.id.startswith("chatcmpl-")
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == pair.decode(reference)  # the greedy answer, through the SDK
    assert answer.choices[0].finish_reason == ("stop" if reference[-1] == pair.eos_token_id else "length")
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(templated), len(reference))
    streamed = api.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == pair.decode(reference)


def test_bad_chat_requests_get_a_reason(chat) -> None:
    client, _ = chat
    empty = client.post("/v1/chat/completions", json={"messages": []})
    assert empty.status_code == 400 and "messages" in empty.json()["error"]["message"]
    role = client.post("/v1/chat/completions", json={"messages": [{"role": "robot", "content": "hi"}]})
    assert role.status_code == 400


def test_a_pair_without_a_chat_template_refuses_chat(micro_pair: Path, tmp_path: Path) -> None:
    plain, _ = next(_client(micro_pair, tmp_path))  # the micro pair has no chat template
    refused = plain.post("/v1/chat/completions", json={"messages": MESSAGES})
    assert refused.status_code == 400 and "has no chat template: use /v1/completions" in refused.json()["error"]["message"]
