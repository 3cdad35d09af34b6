"""Drive a vLLM server with real concurrent streams and time every request.

One pass sends the prompts in order as streaming completions, cycled up to a whole multiple of
`concurrency` (6 prompts at concurrency 4: 8 requests), keeping `concurrency` in flight: a pass
whose last requests ran at a smaller batch would measure a lighter load than it names. It
records for each request the time to its first token, its end and its tokens (vLLM's
`return_token_ids`). Output tokens/s is the pass's tokens over its wall time.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import httpx


class PromptTokens(Protocol):
    """A prompt as token ids (the worker's encoding with the pair's tokenizer)."""

    id: str
    token_ids: tuple[int, ...]


class RequestFailed(RuntimeError):
    """A completion the server did not finish; the message says how it failed."""


@dataclass(frozen=True)
class RequestRecord:
    prompt_id: str
    token_ids: tuple[int, ...]
    ttft_s: float  # time to the first token
    latency_s: float  # send to the last token

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first."""
        n = len(self.token_ids)
        return (self.latency_s - self.ttft_s) / (n - 1) if n > 1 else None


@dataclass(frozen=True)
class PassRecord:
    concurrency: int
    wall_s: float
    requests: tuple[RequestRecord, ...]

    @property
    def new_tokens(self) -> int:
        return sum(len(r.token_ids) for r in self.requests)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def outputs(self) -> dict[str, tuple[int, ...]]:
        """Each prompt's tokens (its first request in the pass)."""
        first: dict[str, tuple[int, ...]] = {}
        for record in self.requests:
            first.setdefault(record.prompt_id, record.token_ids)
        return first


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


def cycled(prompts: Sequence[PromptTokens], concurrency: int, rounds: int) -> list[PromptTokens]:
    """The prompts cycled over full batches at `concurrency`, every prompt `rounds` times at least."""
    batches = -(-len(prompts) // concurrency) * rounds  # ceil: a batch holds `concurrency` requests
    return [prompts[i % len(prompts)] for i in range(concurrency * batches)]


def run_pass(url: str, model: str, prompts: Sequence[PromptTokens], concurrency: int, sampling: Sampling,
             timeout_s: float = 300.0) -> PassRecord:
    """One timed pass at `concurrency` requests in flight (a blocking call: it runs its own event loop)."""
    return asyncio.run(_pass(url, model, prompts, concurrency, sampling, timeout_s))


def wake(url: str, model: str, prompt: PromptTokens, sampling: Sampling, timeout_s: float = 300.0) -> None:
    """Untimed, just after a thaw: one request of one token. The first pass after a thaw sometimes ran at
    0.4-0.5x (on the micro pair in CI, and as single outliers in a SmolLM2 trace); this takes that moment
    out of the timed pass that follows."""
    run_pass(url, model, [prompt], 1, replace(sampling, max_tokens=1), timeout_s)


async def _pass(url: str, model: str, prompts: Sequence[PromptTokens], concurrency: int, sampling: Sampling,
                timeout_s: float) -> PassRecord:
    total = -(-len(prompts) // concurrency) * concurrency  # ceil to a multiple: the batch stays full
    queue = [prompts[i % len(prompts)] for i in range(total)]
    records: list[RequestRecord | None] = [None] * total
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2)
    next_index = 0

    async def stream_worker(client: httpx.AsyncClient) -> None:
        nonlocal next_index
        while next_index < total:
            index, next_index = next_index, next_index + 1
            records[index] = await _one(client, url, model, queue[index], sampling)

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=10.0), limits=limits) as client:
        await asyncio.gather(*(stream_worker(client) for _ in range(concurrency)))
    wall_s = time.perf_counter() - started
    return PassRecord(concurrency, wall_s, tuple(r for r in records if r is not None))


async def _one(client: httpx.AsyncClient, url: str, model: str, prompt: PromptTokens, sampling: Sampling) -> RequestRecord:
    body = {"model": model, "prompt": list(prompt.token_ids), "max_tokens": sampling.max_tokens,
            "temperature": sampling.temperature, "top_p": sampling.top_p, "seed": sampling.seed,
            "stream": True, "return_token_ids": True}
    tokens: list[int] = []
    first: float | None = None
    sent = time.perf_counter()
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                raise RequestFailed(f"vLLM answered {response.status_code}: {' '.join(text.split())[:300]}")
            async for line in response.aiter_lines():
                chunk = _chunk(line)
                if chunk is None:
                    continue
                ids = [t for choice in chunk.get("choices") or [] for t in choice.get("token_ids") or []]
                if ids and first is None:
                    first = time.perf_counter()
                tokens.extend(ids)
    except httpx.HTTPError as err:
        raise RequestFailed(f"the request for prompt {prompt.id} failed: {type(err).__name__}: {err}") from None
    done = time.perf_counter()
    return RequestRecord(prompt.id, tuple(tokens), (first or done) - sent, done - sent)


def _chunk(line: str) -> dict | None:
    if not line.startswith("data: ") or line == "data: [DONE]":
        return None
    return json.loads(line.removeprefix("data: "))


@dataclass(frozen=True)
class Latencies:
    ttft_s: float | None
    tpot_s: float | None
    p50_latency_s: float | None
    p95_latency_s: float | None


def latencies(passes: Sequence[PassRecord]) -> Latencies:
    """Means of TTFT and TPOT, and request-latency percentiles, over every request of the passes."""
    requests = [r for p in passes for r in p.requests]
    if not requests:
        return Latencies(None, None, None, None)
    tpots = [t for r in requests if (t := r.tpot_s) is not None]
    ordered = sorted(r.latency_s for r in requests)
    return Latencies(statistics.fmean(r.ttft_s for r in requests), statistics.fmean(tpots) if tpots else None,
                     _percentile(ordered, 50), _percentile(ordered, 95))


def _percentile(ordered: Sequence[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
