"""Serving a vLLM configuration: a vLLM server per replica, behind the endpoint's own app.

`VllmCompletionService` is a `CompletionService` (so `build_app` gives the same OpenAI shape,
the same one-line 4xx reasons, the same key check and streaming), but decodes by forwarding to
a vLLM OpenAI server it started from the vLLM environment with the chosen `speculative_config`.
Requests are admitted here first by the shared rule (`ServiceBase`: model, max_tokens limit, the
context, counted by vLLM's own /tokenize), so vLLM never sees a request the endpoint would refuse.

vLLM reports speculation counts per server, not per request: responses carry no
`speculative` block, and `compare_ar` is refused with a reason. GET /metrics is the endpoint's
own request metrics followed by the vLLM server's whole /metrics (its `vllm:` families, the
speculative-decoding counters `vllm:spec_decode_*` among them).

Prompts go to vLLM as text with `add_special_tokens: false`, as the engine backend tokenizes them
(`Pair.encode`): both backends decode the same token ids. Chat is rendered here with the pair's
own tokenizer (`spectune.workers.serve.chat`), so vLLM gets the same prompt the engine would.
Stop sequences go to vLLM as `stop`: vLLM cuts the text where one begins, stops decoding there,
and while streaming holds back the last (longest stop sequence - 1) characters until they cannot
start one, the endpoint's own rule (`spectune.workers.serve.text`), so its text is passed on as
it comes.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
from transformers import AutoTokenizer

from spectune.backends.vllm import VllmServerSettings
from spectune.workers.serve.openai_schema import Choice, CompletionRequest, CompletionResponse, Usage
from spectune.workers.serve.served_config import Limits, ServedConfig
from spectune.workers.serve.service import Replica, ServiceBase
from spectune.workers.vllm.server import VllmServer
from spectune.workers.vllm.worker import launch_for

VLLM_SERVED_NAME = "served"


@dataclass(frozen=True)
class VllmJob:
    body: dict[str, Any]  # what goes to vLLM
    prompt_tokens: int
    admitted_at: float  # time.perf_counter()


class VllmCompletionService(ServiceBase):
    """One served configuration, decoded by the vLLM server this service started."""

    compare_ar_refused = ("compare_ar is not available for a vLLM-served configuration (vLLM counts "
                          "speculation per server, not per request)")

    def __init__(self, served: ServedConfig, limits: Limits, server: VllmServer) -> None:
        super().__init__(served, limits)
        self.server = server
        self.settings = VllmServerSettings.model_validate(served.server)
        self.client = httpx.AsyncClient(base_url=server.url, timeout=httpx.Timeout(self.settings.request_timeout_s,
                                                                                  connect=10.0))
        self._completed = 0
        # the engine backend's tokenizer too (`Pair`): chat is rendered here, not by vLLM
        self._tokenizer = AutoTokenizer.from_pretrained(served.pair.target)

    @classmethod
    def start(cls, served: ServedConfig, limits: Limits, threads: int = 1, gpu: bool = False) -> VllmCompletionService:
        settings = VllmServerSettings.model_validate(served.server)
        launch = launch_for(served.pair, served.method, served.knobs, settings, threads, gpu, VLLM_SERVED_NAME)
        return cls(served, limits, VllmServer.start(launch))

    def close(self) -> None:
        self.server.stop()

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    async def prometheus(self) -> bytes:
        """The endpoint's request metrics, then vLLM's own (a line saying why, if the server does not answer)."""
        ours = self.metrics.exposition()
        try:
            answer = await self.client.get("/metrics", timeout=10.0)
            answer.raise_for_status()
        except httpx.HTTPError as err:
            return ours + f"# vLLM's /metrics did not answer: {type(err).__name__}\n".encode()
        return ours + answer.content

    def health(self) -> dict[str, Any]:
        status = "ok" if self.server.alive() else "vllm server down"
        return {"status": status, "model": self.model_id, "backend": self.served.backend,
                "completed_requests": self._completed}

    def config(self) -> dict[str, Any]:
        config = self.served.config()
        return {
            "model": self.model_id, "backend": self.served.backend, "method": config.method, "label": config.label(),
            "knobs": dict(config.knobs), "speculative_config": self.server.launch.speculative_config,
            "engine_args": self.server.launch.engine_args, "chosen_for_concurrency": self.served.concurrency,
            "pair": self.served.pair.model_dump(), "context": self.settings.max_model_len,
            "source": self.served.source.model_dump(exclude_none=True), "trial_metrics": self.served.trial_metrics,
            "limits": self.limits.model_dump(),
        }

    # --- requests ----------------------------------------------------------------------

    def prepare(self, request: CompletionRequest) -> VllmJob:
        """The request for vLLM, or `RequestRejected` saying what is wrong with it."""
        context = self.settings.max_model_len
        self.check_request(request, context)
        prompt_tokens = self._count_tokens(request.prompt)
        self.check_room(prompt_tokens, request.max_tokens, context)
        body = {"model": VLLM_SERVED_NAME, "prompt": request.prompt, "max_tokens": request.max_tokens,
                "temperature": request.temperature, "top_p": request.top_p, "add_special_tokens": False}
        if request.seed is not None:
            body["seed"] = request.seed
        if request.stops:
            body["stop"] = list(request.stops)
        return VllmJob(body, prompt_tokens, time.perf_counter())

    async def admit(self, request: CompletionRequest) -> VllmJob:
        """`prepare` off the event loop (it asks vLLM's /tokenize)."""
        return await asyncio.get_running_loop().run_in_executor(None, self.prepare, request)

    def _count_tokens(self, prompt: str) -> int:
        self.server.check_alive()
        body = {"model": VLLM_SERVED_NAME, "prompt": prompt, "add_special_tokens": False}
        answer = httpx.post(f"{self.server.url}/tokenize", json=body, timeout=30.0)
        answer.raise_for_status()
        return int(answer.json()["count"])

    async def complete(self, request: CompletionRequest) -> CompletionResponse:
        job = await self.admit(request)
        with self.metrics.track() as track:
            answer = await self.client.post("/v1/completions", json=job.body)
            if answer.status_code != 200:
                raise RuntimeError(f"vLLM answered {answer.status_code}: {' '.join(answer.text.split())[:300]}")
            data = answer.json()
            choice = data["choices"][0]
            usage = Usage(**{k: data["usage"][k] for k in Usage.model_fields})
            self._completed += 1
            self.metrics.finished(track, usage, _finish(choice))  # vLLM's own histograms time it
        return CompletionResponse(id=_completion_id(), created=int(time.time()), model=self.model_id,
                                  choices=[Choice(text=choice["text"], finish_reason=_finish(choice))], usage=usage)

    async def stream(self, request: CompletionRequest, job: VllmJob,
                     is_disconnected: Callable[[], Awaitable[bool]] | None = None) -> AsyncIterator[CompletionResponse]:
        """vLLM's stream re-shaped as the endpoint's chunks: text deltas, then finish_reason, then usage if asked.
        A client that goes away closes vLLM's stream, which aborts the request there."""
        completion_id, created = _completion_id(), int(time.time())
        body = {**job.body, "stream": True, "stream_options": {"include_usage": True}}
        with self.metrics.track() as track:
            usage, finish, first_at = None, None, None
            async with self.client.stream("POST", "/v1/completions", json=body) as answer:
                if answer.status_code != 200:
                    raise RuntimeError(f"vLLM answered {answer.status_code}")
                async for line in answer.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    if is_disconnected is not None and await is_disconnected():
                        return  # closing vLLM's stream aborts the request there
                    chunk = json.loads(line.removeprefix("data: "))
                    if chunk.get("usage"):
                        usage = Usage(**{k: chunk["usage"][k] for k in Usage.model_fields})
                    for choice in chunk.get("choices") or []:
                        finish = _finish(choice) if choice.get("finish_reason") else finish
                        if choice.get("text"):
                            first_at = first_at or time.perf_counter()
                            yield CompletionResponse(id=completion_id, created=created, model=self.model_id,
                                                     choices=[Choice(text=choice["text"], finish_reason=None)],
                                                     usage=None)
            self._completed += 1
            self.metrics.finished(track, usage, finish or "stop", *_latencies(job, first_at, usage))
            yield CompletionResponse(id=completion_id, created=created, model=self.model_id,
                                     choices=[Choice(text="", finish_reason=finish or "stop")], usage=None)
            if request.stream_options is not None and request.stream_options.include_usage and usage is not None:
                yield CompletionResponse(id=completion_id, created=created, model=self.model_id, choices=[],
                                         usage=usage)


def _latencies(job: VllmJob, first_at: float | None, usage: Usage | None) -> tuple[float | None, float | None]:
    """(time to first token, per output token after it) as the stream showed them."""
    if first_at is None:
        return None, None
    tokens = usage.completion_tokens if usage is not None else 0
    tpot = (time.perf_counter() - first_at) / (tokens - 1) if tokens > 1 else None
    return first_at - job.admitted_at, tpot


def _finish(choice: dict[str, Any]) -> str | None:
    reason = choice.get("finish_reason")
    return None if reason is None else "length" if reason == "length" else "stop"


def _completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex[:24]}"


def start_service(served: ServedConfig, limits: Limits, replica: Replica) -> VllmCompletionService:
    """A Serve replica's service (`spectune.backends.vllm`'s serving): a vLLM server on the replica's CPUs (or GPU)."""
    return VllmCompletionService.start(served, limits, threads=replica.threads, gpu=replica.gpus > 0)
