"""A small client for the endpoint (the dashboard's "Try it live" panel, scripts, the benchmark).

    for event in complete("http://127.0.0.1:8000", "def add(a, b):", max_tokens=64):
        if isinstance(event, Delta):
            print(event.text, end="")
        else:  # Finished: the whole text, finish_reason, speculative stats, AR comparison
            print(event.speculative.mean_accepted_tokens, event.comparison and event.comparison.speedup)

With stream=False the server answers in one piece and the iterator yields one `Finished`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
from pydantic import ValidationError

from spectune.validation import one_line
from spectune.workers.serve.openai_schema import ArComparison, CompletionResponse, SpeculativeStats, Usage


class EndpointError(RuntimeError):
    """The endpoint refused the request or could not be reached; the message says why."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Delta:
    """Text the server streamed as a step was accepted."""

    text: str


@dataclass(frozen=True)
class Finished:
    text: str  # the whole completion
    finish_reason: str
    usage: Usage | None
    speculative: SpeculativeStats
    comparison: ArComparison | None  # with compare_ar=True


def complete(
    url: str,
    prompt: str,
    *,
    max_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    compare_ar: bool = False,
    stream: bool = True,
    api_key: str | None = None,
    timeout_s: float = 300.0,
) -> Iterator[Delta | Finished]:
    """POST /v1/completions at `url` (the server's base URL); text deltas, then one `Finished`.

    Greedy (temperature 0) by default, so the answer equals plain decoding. Raises
    `EndpointError` with the server's reason for a 4xx/5xx or a connection failure.
    """
    body: dict[str, Any] = {"prompt": prompt, "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p,
                            "stream": stream, "compare_ar": compare_ar}
    if seed is not None:
        body["seed"] = seed
    if stream:
        body["stream_options"] = {"include_usage": True}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    endpoint = url.rstrip("/") + "/v1/completions"
    try:
        with httpx.Client(timeout=timeout_s) as client, client.stream("POST", endpoint, json=body,
                                                                        headers=headers) as response:
            _raise_for_error(response)
            if stream:
                yield from _events(response.iter_lines())
            else:
                response.read()
                whole = _parse(response.text)
                yield Finished(whole.choices[0].text, whole.choices[0].finish_reason or "length", whole.usage,
                               _stats(whole), whole.comparison)
    except httpx.HTTPError as err:
        raise EndpointError(f"cannot reach the endpoint at {endpoint}: {err}") from None


def _events(lines: Iterator[str]) -> Iterator[Delta | Finished]:
    parts: list[str] = []
    final: CompletionResponse | None = None
    usage: Usage | None = None
    for line in lines:
        if not line.startswith("data: "):
            continue  # blank separators and comments
        data = line.removeprefix("data: ")
        if data == "[DONE]":
            break
        chunk = _parse(data)
        if chunk.usage is not None:
            usage = chunk.usage
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        if choice.text:
            parts.append(choice.text)
            yield Delta(choice.text)
        if choice.finish_reason is not None:
            final = chunk
    if final is None:
        raise EndpointError("the stream ended without a final chunk")
    yield Finished("".join(parts), final.choices[0].finish_reason or "length", usage, _stats(final), final.comparison)


def _parse(data: str) -> CompletionResponse:
    try:
        payload = json.loads(data)
    except json.JSONDecodeError:
        raise EndpointError(f"the endpoint sent something that is not JSON: {data[:200]!r}") from None
    if isinstance(payload, dict) and "error" in payload:
        raise EndpointError(_reason(payload))
    try:
        return CompletionResponse.model_validate(payload)
    except ValidationError as err:
        raise EndpointError(f"unexpected answer from the endpoint: {one_line(err, locations=False, limit=1)}") from None


def _stats(response: CompletionResponse) -> SpeculativeStats:
    if response.speculative is None:
        raise EndpointError("the endpoint's answer has no speculative stats (is it a spectune endpoint?)")
    return response.speculative


def _raise_for_error(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    response.read()
    try:
        reason = _reason(response.json())
    except ValueError:
        reason = response.text[:200] or response.reason_phrase
    raise EndpointError(f"HTTP {response.status_code}: {reason}", response.status_code)


def _reason(payload: Any) -> str:
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        return str(payload["error"].get("message", payload["error"]))
    return str(payload)[:200]
