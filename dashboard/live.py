"""The "Try it live" panel's side of the endpoint: a streamed completion through
`spectune.workers.serve.client` (OpenAI's `/v1/completions` plus spectune's speculative stats),
turned into text deltas for `st.write_stream` and one `LiveAnswer` for the stats."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from spectune.workers.serve.client import Delta, EndpointError, Finished, complete

DEFAULT_ENDPOINT = "http://127.0.0.1:8000"
TIMEOUT_S = 120.0  # a long completion (with the AR comparison) on a CPU endpoint


class EndpointDown(RuntimeError):
    """No usable answer from the endpoint (not listening, connection lost, not spectune)."""


class EndpointRejected(RuntimeError):
    """The endpoint answered with an error status (bad request, auth, ...)."""


@dataclass
class LiveAnswer:
    """What a streamed completion has produced so far (filled while streaming)."""

    text: str = ""
    finished: Finished | None = None


def stream_completion(endpoint: str, prompt: str, answer: LiveAnswer, *, max_tokens: int = 64,
                      temperature: float = 0.0, compare_ar: bool = True,
                      api_key: str | None = None) -> Iterator[str]:
    """Text deltas of a streamed completion; ``answer`` collects the text and the final stats.

    Raises `EndpointRejected` on an error status, `EndpointDown` on anything else.
    """
    try:
        for event in complete(endpoint, prompt, max_tokens=max_tokens, temperature=temperature,
                              compare_ar=compare_ar, api_key=api_key, timeout_s=TIMEOUT_S):
            if isinstance(event, Delta):
                answer.text += event.text
                yield event.text
            else:
                answer.finished = event
    except EndpointError as exc:
        if exc.status is not None:
            raise EndpointRejected(str(exc)) from exc
        raise EndpointDown(str(exc)) from exc


__all__ = ["DEFAULT_ENDPOINT", "EndpointDown", "EndpointRejected", "LiveAnswer",
           "stream_completion"]
