"""The "Try it live" panel's client: a streamed completion from the spectune endpoint.

The endpoint speaks OpenAI's `/v1/completions` with server-sent events (`data: {...}`
lines, ending with `data: [DONE]`); its chunks also carry spectune's `speculative` stats
and, with ``compare_ar``, an AR `comparison` holding the speedup.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

DEFAULT_ENDPOINT = "http://127.0.0.1:8000"
CONNECT_TIMEOUT_S = 3.0
READ_TIMEOUT_S = 120.0  # a long completion on a CPU endpoint streams slowly but steadily


class EndpointDown(RuntimeError):
    """Nothing answers at the endpoint URL."""


class EndpointRejected(RuntimeError):
    """The endpoint answered with an error status (bad request, auth, ...)."""


@dataclass
class LiveAnswer:
    """What a streamed completion has produced so far (filled while streaming)."""

    text: str = ""
    finish_reason: str | None = None
    speculative: dict[str, Any] = field(default_factory=dict)
    comparison: dict[str, Any] = field(default_factory=dict)


def completions_url(endpoint: str) -> str:
    return endpoint.rstrip("/") + "/v1/completions"


def _error_reason(response: httpx.Response) -> str:
    """The reason in an OpenAI-style error body, FastAPI's ``detail``, or the raw text."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:300] or response.reason_phrase
    if isinstance(body, dict):
        if isinstance(body.get("error"), dict) and body["error"].get("message"):
            return str(body["error"]["message"])
        if body.get("detail"):
            return json.dumps(body["detail"]) if not isinstance(body["detail"], str) else body["detail"]
    return json.dumps(body)[:300]


def _events(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """The JSON payloads of server-sent ``data:`` lines, up to ``[DONE]``."""
    for line in lines:
        if not line.startswith("data:"):
            continue  # blank separators, comments, event names
        payload = line[len("data:"):].strip()
        if payload == "[DONE]":
            return
        yield json.loads(payload)


def _absorb(answer: LiveAnswer, chunk: dict[str, Any]) -> str:
    """Update ``answer`` with one chunk; the text delta it carried."""
    delta = ""
    for choice in chunk.get("choices") or []:
        delta += choice.get("text") or ""
        answer.finish_reason = choice.get("finish_reason") or answer.finish_reason
    if chunk.get("speculative"):
        answer.speculative = dict(chunk["speculative"])
    if chunk.get("comparison"):
        answer.comparison = dict(chunk["comparison"])
    answer.text += delta
    return delta


def stream_completion(endpoint: str, prompt: str, answer: LiveAnswer, *, max_tokens: int = 64,
                      temperature: float = 0.0, compare_ar: bool = True,
                      api_key: str | None = None) -> Iterator[str]:
    """Text deltas of a streamed completion; ``answer`` collects the text and the stats.

    Raises `EndpointDown` when nothing answers and `EndpointRejected` on an error status.
    """
    request = {"prompt": prompt, "max_tokens": max_tokens, "temperature": temperature,
               "stream": True, "compare_ar": compare_ar}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    timeout = httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
    url = completions_url(endpoint)
    try:
        with httpx.Client(timeout=timeout) as client, \
                client.stream("POST", url, json=request, headers=headers) as response:
            if response.status_code >= 400:
                response.read()
                raise EndpointRejected(f"{url} answered {response.status_code}: "
                                       f"{_error_reason(response)}")
            for chunk in _events(response.iter_lines()):
                delta = _absorb(answer, chunk)
                if delta:
                    yield delta
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        raise EndpointDown(f"no endpoint answers at {endpoint} ({exc}); start one with "
                           "`spectune serve` or set its URL in the sidebar") from exc
    except httpx.HTTPError as exc:
        raise EndpointDown(f"the endpoint at {endpoint} stopped answering: {exc}") from exc


__all__ = ["DEFAULT_ENDPOINT", "EndpointDown", "EndpointRejected", "LiveAnswer",
           "completions_url", "stream_completion"]
