"""spectune's engine serving, without HTTP: one loaded pair answering completion requests.

`SpectuneCompletionService` (a `CompletionService`) admits a request by the shared rule
(`ServiceBase`: model, max_tokens limit, context with the draft tree), decodes it with the
served speculative configuration (and, on request, with plain AR to compare) and returns
OpenAI-shaped objects. Decoding runs on a small thread
pool so the event loop stays free, and so does tokenising. Built decoders wait in a pool
(`DecoderPool`): a request leases one for itself (its own KV caches and drafter state over
the shared weights; nothing a request changes is seen by another running at the same time),
so a method's set-up (DEL's timings, PEARL's threads) is paid once per replica, not per
request. Each request has a cancel flag the loop checks between steps, so a client that goes
away stops costing compute after the current step.

Stop sequences are found on the decoded text after every step (`CompletionText`, on the decode
thread): decoding stops at the step that completes one, the text is cut where it begins, the
tokens kept are those through the one that completed it (a speculative step may have emitted
more; AR would not have), and streaming never sends text that could still start one. GET
/metrics counts requests and the engine's drafts and accepted tokens
(`spectune.workers.serve.metrics`).
"""

from __future__ import annotations

import asyncio
import queue
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from spectune.config import DecodeConfig
from spectune.engine.loop import Decoder, Generation, StepRecord
from spectune.engine.sampling import Sampling
from spectune.methods import METHODS
from spectune.metrics import step_metrics
from spectune.pair import Pair, load_pair
from spectune.workers.serve.metrics import RequestTrack, SpecDecodeMetrics
from spectune.workers.serve.openai_schema import (
    ArComparison, Choice, CompletionRequest, CompletionResponse, SpeculativeStats, Usage,
)
from spectune.workers.serve.served_config import Limits, ServedConfig
from spectune.workers.serve.service import Replica, ServiceBase
from spectune.workers.serve.text import CompletionText

AR_METHOD = "ar"
# Temperatures below this decode greedily (as vLLM does below its 1e-5): dividing logits by less
# overflows float32 into inf/nan probabilities, and the distribution is one-hot long before.
GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class DecodeJob:
    prompt_ids: tuple[int, ...]
    max_tokens: int
    sampling: Sampling
    seed: int
    stops: tuple[str, ...] = ()
    admitted_at: float = 0.0  # time.perf_counter() when admitted (time to first token counts from here)


@dataclass(frozen=True)
class DecodeOutcome:
    tokens: list[int]  # through the token that completed a stop sequence, if one did
    text: str  # cut where the stop sequence begins
    steps: list[StepRecord]
    wall_s: float
    cancelled: bool
    stopped: bool = False  # a stop sequence ended it
    first_at: float | None = None  # time.perf_counter() at the first step's tokens
    done_at: float | None = None

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.wall_s if self.wall_s > 0 else 0.0

    def ttft_s(self, job: DecodeJob) -> float | None:
        return None if self.first_at is None else self.first_at - job.admitted_at

    @property
    def tpot_s(self) -> float | None:
        """Per output token after the first (None below two tokens)."""
        if self.first_at is None or self.done_at is None or len(self.tokens) < 2:
            return None
        return (self.done_at - self.first_at) / (len(self.tokens) - 1)


@dataclass(frozen=True)
class Counts:
    active: int = 0
    completed: int = 0
    cancelled: int = 0
    most_active: int = 0  # the most requests decoding at once since start (at most the decode threads)


class DecoderPool:
    """Built decoders of one configuration; a request leases one and has it to itself.

    At most as many are ever built as requests decode at once (the service's decode threads): a
    lease takes a free one, or builds one when all are busy. A decoder whose decode raised is
    dropped, not reused (its drafter may hold half a step).
    """

    def __init__(self, build: Callable[[], Decoder]) -> None:
        self._build = build
        self._free: queue.SimpleQueue[Decoder] = queue.SimpleQueue()
        self.built = 0
        self._free.put(self._new())  # built now: a configuration that cannot build fails at start-up

    def _new(self) -> Decoder:
        decoder = self._build()
        self.built += 1
        return decoder

    def peek(self) -> Decoder:
        """A built decoder, to read what it declares (max_tree_size); not for decoding."""
        with self.lease() as decoder:
            return decoder

    @contextmanager
    def lease(self) -> Iterator[Decoder]:
        try:
            decoder = self._free.get_nowait()
        except queue.Empty:
            decoder = self._new()
        yield decoder  # an exception skips the put: the decoder is dropped
        self._free.put(decoder)


class SpectuneCompletionService(ServiceBase):
    """One served configuration over one loaded pair, decoded by spectune's engine."""

    def __init__(self, pair: Pair, served: ServedConfig, limits: Limits = Limits()) -> None:
        super().__init__(served, limits)
        self.pair = pair
        self.decode_config = served.config()
        self._pools: dict[str, DecoderPool] = {}
        self._pools_lock = threading.Lock()
        self.max_tree_size = self._pool(self.decode_config).peek().drafter.max_tree_size  # also checks it builds
        self._executor = ThreadPoolExecutor(max_workers=limits.decode_threads, thread_name_prefix="spectune-decode")
        self._tokenizer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spectune-tokenize")
        self._counts = Counts()
        self._counts_lock = threading.Lock()
        self.spec_metrics = SpecDecodeMetrics(self.metrics)

    @classmethod
    def load(cls, served: ServedConfig, limits: Limits = Limits()) -> SpectuneCompletionService:
        return cls(load_pair(served.pair), served, limits)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._tokenizer.shutdown(wait=False, cancel_futures=True)

    # --- what is served ----------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        return self.pair.tokenizer

    def health(self) -> dict[str, Any]:
        counts = self._counts
        return {"status": "ok", "model": self.model_id, "active_requests": counts.active,
                "completed_requests": counts.completed, "cancelled_requests": counts.cancelled,
                "most_active_requests": counts.most_active}

    def config(self) -> dict[str, Any]:
        method = METHODS.get(self.decode_config.method)
        return {
            "model": self.model_id,
            "method": self.decode_config.method,
            "label": self.decode_config.label(),
            "knobs": dict(self.decode_config.knobs),
            "lossless": method.lossless,
            "summary": method.summary,
            "pair": self.served.pair.model_dump(),
            "device": str(self.pair.target.device),
            "context": self.pair.max_positions,
            "max_tree_size": self.max_tree_size,
            "source": self.served.source.model_dump(exclude_none=True),
            "trial_metrics": self.served.trial_metrics,
            "limits": self.limits.model_dump(),
        }

    # --- requests ----------------------------------------------------------------------

    def prepare(self, request: CompletionRequest) -> DecodeJob:
        """The decode job for a request, or `RequestRejected` saying what is wrong with it."""
        context = self.pair.max_positions
        self.check_request(request, context)
        prompt_ids = self.pair.encode(request.prompt)
        self.check_room(len(prompt_ids), request.max_tokens, context, self.max_tree_size)
        seed = request.seed if request.seed is not None else secrets.randbelow(2**31)
        temperature = request.temperature if request.temperature >= GREEDY_BELOW_TEMPERATURE else 0.0
        return DecodeJob(tuple(prompt_ids), request.max_tokens, Sampling(temperature, request.top_p), seed,
                         request.stops, time.perf_counter())

    async def admit(self, request: CompletionRequest) -> DecodeJob:
        """`prepare` off the event loop: tokenising a long prompt takes milliseconds the loop
        owes to every other connection."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer, self.prepare, request)

    async def complete(self, request: CompletionRequest) -> CompletionResponse:
        job = await self.admit(request)
        with self.metrics.track() as track:
            outcome = await self._run(self.decode_config, job)
            comparison = await self._compare(job, outcome) if request.compare_ar else None
            self._answered(track, job, outcome)
        return CompletionResponse(
            id=_completion_id(), created=int(time.time()), model=self.model_id,
            choices=[Choice(text=outcome.text, finish_reason=self._finish_reason(outcome))],
            usage=_usage(job, outcome), speculative=self._stats(job, outcome), comparison=comparison,
        )

    async def stream(
        self, request: CompletionRequest, job: DecodeJob, is_disconnected: Callable[[], Awaitable[bool]] | None = None
    ) -> AsyncIterator[CompletionResponse]:
        """Chunks in OpenAI's streaming shape: text deltas as steps are accepted, then one chunk
        with finish_reason, the speculative stats (and the AR comparison when asked), then a
        usage-only chunk when `stream_options.include_usage`.

        `job` comes from `admit(request)` (or `prepare`), called first so that a bad request gets
        its error status before the stream starts.
        """
        completion_id, created = _completion_id(), int(time.time())

        def chunk(text: str, finish_reason: str | None = None, **extra: Any) -> CompletionResponse:
            return CompletionResponse(id=completion_id, created=created, model=self.model_id,
                                      choices=[Choice(text=text, finish_reason=finish_reason)], usage=None, **extra)

        loop = asyncio.get_running_loop()
        arrived: asyncio.Queue[str | None] = asyncio.Queue()
        cancel = threading.Event()

        def push(text: str | None) -> None:
            loop.call_soon_threadsafe(arrived.put_nowait, text)

        future = loop.run_in_executor(self._executor, self._decode_then_close, self.decode_config, job, cancel, push)
        future.add_done_callback(_consume_exception)  # a stream abandoned mid-way never awaits it
        with self.metrics.track() as track:
            try:
                while (text := await arrived.get()) is not None:
                    if is_disconnected is not None and await is_disconnected():
                        return  # the finally stops the decode after its current step
                    yield chunk(text)
                outcome = await future
                comparison = await self._compare(job, outcome) if request.compare_ar else None
                self._answered(track, job, outcome)
                yield chunk("", self._finish_reason(outcome), speculative=self._stats(job, outcome),
                            comparison=comparison)
                if request.stream_options is not None and request.stream_options.include_usage:
                    yield CompletionResponse(id=completion_id, created=created, model=self.model_id, choices=[],
                                             usage=_usage(job, outcome))
            finally:
                cancel.set()

    # --- decoding ----------------------------------------------------------------------

    def _pool(self, config: DecodeConfig) -> DecoderPool:
        """The decoders of `config` (the served one, and AR for compare_ar), built on first use."""
        key = config.label()
        with self._pools_lock:
            if key not in self._pools:
                self._pools[key] = DecoderPool(lambda: self._build_decoder(config))
            return self._pools[key]

    def _build_decoder(self, config: DecodeConfig) -> Decoder:
        models = self.pair.runners()
        return Decoder(models.target, METHODS.build(config.method, config.knobs, models), self.pair.eos_token_id)

    async def _run(self, config: DecodeConfig, job: DecodeJob) -> DecodeOutcome:
        cancel = threading.Event()
        future = asyncio.get_running_loop().run_in_executor(self._executor, self._decode, config, job, cancel)
        future.add_done_callback(_consume_exception)
        try:
            return await future
        finally:
            cancel.set()  # a cancelled request (client gone) stops after the current step

    def _decode_then_close(self, config: DecodeConfig, job: DecodeJob, cancel: threading.Event,
                           push: Callable[[str | None], None]) -> DecodeOutcome:
        try:
            return self._decode(config, job, cancel, push)
        finally:
            push(None)

    def _decode(self, config: DecodeConfig, job: DecodeJob, cancel: threading.Event,
                on_text: Callable[[str], None] | None = None) -> DecodeOutcome:
        """Runs on a worker thread: decode step by step until done, stopped by a stop sequence, or cancelled;
        `on_text` gets the text as it becomes safe to send."""
        if cancel.is_set():  # the client left while the request queued
            self._count(cancelled=1)
            return DecodeOutcome([], "", [], 0.0, cancelled=True)
        self._count(active=1)
        text = CompletionText(self.pair.decode, job.stops)
        steps: list[StepRecord] = []
        started = time.perf_counter()
        first_at: float | None = None
        try:
            with self._pool(config).lease() as decoder:
                stream = decoder.stream(job.prompt_ids, job.max_tokens, job.sampling, job.seed)
                try:
                    for emitted in stream:
                        first_at = first_at or time.perf_counter()
                        steps.append(emitted.record)
                        piece = text.add(emitted.tokens)
                        if on_text is not None and piece:
                            on_text(piece)
                        if text.stopped or cancel.is_set():
                            break
                finally:
                    stream.close()
            rest = text.flush()
            if on_text is not None and rest:
                on_text(rest)
        finally:
            tokens = text.tokens
            stopped_early = (cancel.is_set() and not text.stopped and len(tokens) < job.max_tokens
                             and not self._ended(tokens))
            self._count(active=-1, cancelled=int(stopped_early), completed=int(not stopped_early))
        done_at = time.perf_counter()
        return DecodeOutcome(tokens, text.text, steps, done_at - started, cancelled=stopped_early,
                             stopped=text.stopped, first_at=first_at, done_at=done_at)

    async def _compare(self, job: DecodeJob, speculative: DecodeOutcome) -> ArComparison:
        plain = await self._run(METHODS.config(AR_METHOD, {}), job)
        return ArComparison(
            ar_wall_s=plain.wall_s, ar_tokens_per_s=plain.tokens_per_s,
            speculative_tokens_per_s=speculative.tokens_per_s,
            speedup=speculative.tokens_per_s / plain.tokens_per_s if plain.tokens_per_s else 0.0,
            outputs_match=plain.tokens == speculative.tokens,
        )

    def _count(self, active: int = 0, completed: int = 0, cancelled: int = 0) -> None:
        with self._counts_lock:
            now = self._counts
            self._counts = Counts(now.active + active, now.completed + completed, now.cancelled + cancelled,
                                  max(now.most_active, now.active + active))

    def _ended(self, tokens: list[int]) -> bool:
        return bool(tokens) and tokens[-1] == self.pair.eos_token_id

    def _finish_reason(self, outcome: DecodeOutcome) -> str:
        return "stop" if outcome.stopped or self._ended(outcome.tokens) else "length"

    def _answered(self, track: RequestTrack, job: DecodeJob, outcome: DecodeOutcome) -> None:
        """The request's metrics once its answer is complete."""
        self.metrics.finished(track, _usage(job, outcome), self._finish_reason(outcome), outcome.ttft_s(job),
                              outcome.tpot_s)
        self.spec_metrics.add(outcome.steps)

    def _stats(self, job: DecodeJob, outcome: DecodeOutcome) -> SpeculativeStats:
        counted = step_metrics([Generation(job.prompt_ids, outcome.tokens, outcome.steps)])
        return SpeculativeStats(
            method=self.decode_config.method, label=self.decode_config.label(), config=dict(self.decode_config.knobs),
            trial_id=self.served.source.trial_id, target_calls=counted.target_calls, draft_calls=counted.draft_calls,
            mean_accepted_tokens=counted.mean_accepted_tokens, acceptance_rate=counted.acceptance_rate,
            tokens_per_s=outcome.tokens_per_s, wall_s=outcome.wall_s, seed=job.seed,
        )


def _usage(job: DecodeJob, outcome: DecodeOutcome) -> Usage:
    prompt, completion = len(job.prompt_ids), len(outcome.tokens)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def _consume_exception(future: asyncio.Future[Any]) -> None:
    """Mark a failed decode's exception as seen when nobody awaits it (client gone)."""
    if not future.cancelled():
        future.exception()


def start_service(served: ServedConfig, limits: Limits, replica: Replica) -> SpectuneCompletionService:
    """A Serve replica's service (`spectune.backends.spectune`'s serving): torch threads = the replica's CPUs."""
    import torch

    torch.set_num_threads(replica.threads)
    return SpectuneCompletionService.load(served, limits)
