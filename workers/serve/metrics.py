"""The endpoint's Prometheus metrics (GET /metrics), named as vLLM names them where the meaning is the same.

    RequestMetrics       every backend: requests by how they ended, finished ones by finish reason,
                         prompt and generated tokens, requests in flight, time to first token and
                         per output token
    SpecDecodeMetrics    spectune's engine: drafts, draft tokens, accepted tokens, accepted tokens per
                         draft position, from the decode's step records
    RequestTrack         one request's bookkeeping (`RequestMetrics.track`)

vLLM's names with the `spectune:` prefix for `vllm:` (`spectune:spec_decode_num_drafts_total` is
`vllm:spec_decode_num_drafts_total`, counted over this endpoint's requests). Each service has a
registry of its own, never the process-wide default: several services may live in one process
(tests), and a scrape shows only what this one served. A vLLM-served configuration adds vLLM's own
`vllm:` metrics to its scrape (`VllmCompletionService.prometheus`).

A drafted step is one draft (`drafted > 0`), its drafted nodes its draft tokens (a tree's nodes
for tree methods), its accepted tokens those of the draft the target kept (the bonus token is
not counted, as in vLLM); accepted tokens per position counts position i once per draft whose
first i+1 tokens were accepted.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from spectune.engine.loop import StepRecord
    from spectune.workers.serve.openai_schema import Usage

PREFIX = "spectune:"
# vLLM's buckets for the same histograms
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0)


@dataclass
class RequestTrack:
    """What one request reported; `finished` marks it answered (else it ends as cancelled or failed)."""

    finished: bool = False


class RequestMetrics:
    """Request-level metrics of one served configuration, in its own registry."""

    def __init__(self, model_id: str) -> None:
        self.registry = CollectorRegistry()
        self.model_id = model_id
        model = ["model_name"]
        self._requests = Counter(f"{PREFIX}requests", "Requests by how they ended: finished, rejected (4xx), "
                                 "cancelled (client gone), failed (5xx or an error mid-stream)",
                                 [*model, "status"], registry=self.registry)
        self._success = Counter(f"{PREFIX}request_success", "Finished requests by finish reason",
                                [*model, "finished_reason"], registry=self.registry)
        self._prompt = Counter(f"{PREFIX}prompt_tokens", "Prompt tokens of finished requests", model,
                               registry=self.registry)
        self._generated = Counter(f"{PREFIX}generation_tokens", "Tokens generated for finished requests", model,
                                  registry=self.registry)
        self._running = Gauge(f"{PREFIX}num_requests_running", "Requests in flight (queued or decoding)", model,
                              registry=self.registry)
        self._ttft = Histogram(f"{PREFIX}time_to_first_token_seconds", "Time from admission to the first token",
                               model, buckets=TTFT_BUCKETS, registry=self.registry)
        self._tpot = Histogram(f"{PREFIX}time_per_output_token_seconds", "Time per output token after the first, "
                               "one observation per request", model, buckets=TPOT_BUCKETS, registry=self.registry)
        for status in ("finished", "rejected", "cancelled", "failed"):  # every series present from the start
            self._requests.labels(model_id, status)
        for reason in ("stop", "length"):
            self._success.labels(model_id, reason)
        self._running.labels(model_id)

    @contextmanager
    def track(self) -> Iterator[RequestTrack]:
        """One admitted request, from admission to its end: in flight meanwhile, then counted by how it ended."""
        track = RequestTrack()
        running = self._running.labels(self.model_id)
        running.inc()
        status = "cancelled"
        try:
            yield track
            status = "finished" if track.finished else "cancelled"
        except (GeneratorExit, asyncio.CancelledError):
            raise
        except Exception:
            status = "failed"
            raise
        finally:
            running.dec()
            self._requests.labels(self.model_id, status).inc()

    def finished(self, track: RequestTrack, usage: Usage | None, finish_reason: str | None,
                 ttft_s: float | None = None, tpot_s: float | None = None) -> None:
        """A request answered: its finish reason, its tokens (from the usage it reported) and its latencies."""
        track.finished = True
        self._success.labels(self.model_id, finish_reason or "stop").inc()
        if usage is not None:
            self._prompt.labels(self.model_id).inc(usage.prompt_tokens)
            self._generated.labels(self.model_id).inc(usage.completion_tokens)
        if ttft_s is not None:
            self._ttft.labels(self.model_id).observe(ttft_s)
        if tpot_s is not None:
            self._tpot.labels(self.model_id).observe(tpot_s)

    def rejected(self) -> None:
        """A request refused before decoding (a 4xx)."""
        self._requests.labels(self.model_id, "rejected").inc()

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)


class SpecDecodeMetrics:
    """vLLM's speculative-decoding counters, from the engine's step records, in a `RequestMetrics` registry."""

    def __init__(self, requests: RequestMetrics) -> None:
        self.model_id = requests.model_id
        model, registry = ["model_name"], requests.registry
        self._drafts = Counter(f"{PREFIX}spec_decode_num_drafts", "Steps that verified a draft", model,
                               registry=registry)
        self._draft_tokens = Counter(f"{PREFIX}spec_decode_num_draft_tokens", "Draft tokens (tree nodes) verified",
                                     model, registry=registry)
        self._accepted = Counter(f"{PREFIX}spec_decode_num_accepted_tokens", "Draft tokens accepted", model,
                                 registry=registry)
        self._per_position = Counter(f"{PREFIX}spec_decode_num_accepted_tokens_per_pos",
                                     "Drafts whose token at this position (0 = first) was accepted",
                                     [*model, "position"], registry=registry)
        for counter in (self._drafts, self._draft_tokens, self._accepted):
            counter.labels(self.model_id)

    def add(self, steps: Iterable[StepRecord]) -> None:
        """The steps of one answered request."""
        drafts = draft_tokens = accepted = 0
        per_position: dict[int, int] = {}
        for step in steps:
            if step.drafted == 0:
                continue
            drafts, draft_tokens, accepted = drafts + 1, draft_tokens + step.drafted, accepted + step.accepted
            for position in range(step.accepted):
                per_position[position] = per_position.get(position, 0) + 1
        self._drafts.labels(self.model_id).inc(drafts)
        self._draft_tokens.labels(self.model_id).inc(draft_tokens)
        self._accepted.labels(self.model_id).inc(accepted)
        for position, count in per_position.items():
            self._per_position.labels(self.model_id, str(position)).inc(count)
