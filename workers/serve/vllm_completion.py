"""Serving a vLLM configuration: a vLLM server per replica, behind the endpoint's own app.

`VllmCompletionService` is a `CompletionService` (so `build_app` gives the same OpenAI shape,
the same one-line 4xx reasons, the same key check and streaming), but decodes by forwarding to
a vLLM OpenAI server it started from the vLLM environment with the chosen `speculative_config`.
Requests are admitted here first by the shared rule (`ServiceBase`: model, max_tokens limit, the
context, counted by vLLM's own /tokenize), so vLLM never sees a request the endpoint would refuse.

vLLM reports speculation counts per server, not per request: responses carry no
`speculative` block, and `compare_ar` is refused with a reason.
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

    @classmethod
    def start(cls, served: ServedConfig, limits: Limits, threads: int = 1, gpu: bool = False) -> VllmCompletionService:
        settings = VllmServerSettings.model_validate(served.server)
        launch = launch_for(served.pair, served.method, served.knobs, settings, threads, gpu, VLLM_SERVED_NAME)
        return cls(served, limits, VllmServer.start(launch))

    def close(self) -> None:
        self.server.stop()

    @property
    def tokenizer(self) -> None:
        return None  # vLLM renders no chat template for us: /v1/completions only

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
                "temperature": request.temperature, "top_p": request.top_p}
        if request.seed is not None:
            body["seed"] = request.seed
        return VllmJob(body, prompt_tokens)

    async def admit(self, request: CompletionRequest) -> VllmJob:
        """`prepare` off the event loop (it asks vLLM's /tokenize)."""
        return await asyncio.get_running_loop().run_in_executor(None, self.prepare, request)

    def _count_tokens(self, prompt: str) -> int:
        self.server.check_alive()
        answer = httpx.post(f"{self.server.url}/tokenize", json={"model": VLLM_SERVED_NAME, "prompt": prompt},
                            timeout=30.0)
        answer.raise_for_status()
        return int(answer.json()["count"])

    async def complete(self, request: CompletionRequest) -> CompletionResponse:
        job = self.prepare(request)
        answer = await self.client.post("/v1/completions", json=job.body)
        if answer.status_code != 200:
            raise RuntimeError(f"vLLM answered {answer.status_code}: {' '.join(answer.text.split())[:300]}")
        data = answer.json()
        choice = data["choices"][0]
        self._completed += 1
        return CompletionResponse(id=_completion_id(), created=int(time.time()), model=self.model_id,
                                  choices=[Choice(text=choice["text"], finish_reason=_finish(choice))],
                                  usage=Usage(**{k: data["usage"][k] for k in Usage.model_fields}))

    async def stream(self, request: CompletionRequest, job: VllmJob,
                     is_disconnected: Callable[[], Awaitable[bool]] | None = None) -> AsyncIterator[CompletionResponse]:
        """vLLM's stream re-shaped as the endpoint's chunks: text deltas, then finish_reason, then usage if asked.
        A client that goes away closes vLLM's stream, which aborts the request there."""
        completion_id, created = _completion_id(), int(time.time())
        body = {**job.body, "stream": True, "stream_options": {"include_usage": True}}
        usage: Usage | None = None
        finish: str | None = None
        async with self.client.stream("POST", "/v1/completions", json=body) as answer:
            if answer.status_code != 200:
                raise RuntimeError(f"vLLM answered {answer.status_code}")
            async for line in answer.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                if is_disconnected is not None and await is_disconnected():
                    return
                chunk = json.loads(line.removeprefix("data: "))
                if chunk.get("usage"):
                    usage = Usage(**{k: chunk["usage"][k] for k in Usage.model_fields})
                for choice in chunk.get("choices") or []:
                    finish = _finish(choice) if choice.get("finish_reason") else finish
                    if choice.get("text"):
                        yield CompletionResponse(id=completion_id, created=created, model=self.model_id,
                                                 choices=[Choice(text=choice["text"], finish_reason=None)], usage=None)
        self._completed += 1
        yield CompletionResponse(id=completion_id, created=created, model=self.model_id,
                                 choices=[Choice(text="", finish_reason=finish or "stop")], usage=None)
        if request.stream_options is not None and request.stream_options.include_usage and usage is not None:
            yield CompletionResponse(id=completion_id, created=created, model=self.model_id, choices=[], usage=usage)


def _finish(choice: dict[str, Any]) -> str | None:
    reason = choice.get("finish_reason")
    return None if reason is None else "length" if reason == "length" else "stop"


def _completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex[:24]}"


def start_service(served: ServedConfig, limits: Limits, replica: Replica) -> VllmCompletionService:
    """A Serve replica's service (`spectune.backends.vllm`'s serving): a vLLM server on the replica's CPUs (or GPU)."""
    return VllmCompletionService.start(served, limits, threads=replica.threads, gpu=replica.gpus > 0)
