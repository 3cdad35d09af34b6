"""Serving a vLLM configuration: a vLLM server per replica, behind the endpoint's own app.

`VllmCompletionService` answers like `CompletionService` (so `build_app` gives the same OpenAI
shape, the same one-line 4xx reasons, the same key check and streaming), but decodes by
forwarding to a vLLM OpenAI server it started from the vLLM environment with the chosen
`speculative_config`. Requests are validated here first (model, max_tokens limit, the
context from vLLM's own /tokenize), so vLLM never sees a request the endpoint would refuse.

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
from ray import serve

from spectune.backends.vllm import VllmServerSettings
from spectune.workers.serve.app import DEPLOYMENT_NAME, build_app
from spectune.workers.serve.completion import CHARS_PER_POSITION_BOUND, RequestRejected
from spectune.workers.serve.openai_schema import (
    Choice, CompletionRequest, CompletionResponse, ModelCard, ModelList, Usage,
)
from spectune.workers.serve.served_config import Limits, ServedConfig
from spectune.workers.vllm.server import VllmServer
from spectune.workers.vllm.worker import launch_for

VLLM_SERVED_NAME = "served"


@dataclass(frozen=True)
class VllmJob:
    body: dict[str, Any]  # what goes to vLLM
    prompt_tokens: int


class VllmCompletionService:
    def __init__(self, served: ServedConfig, limits: Limits, server: VllmServer) -> None:
        self.served = served
        self.limits = limits
        self.server = server
        self.created = int(time.time())
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
    def model_id(self) -> str:
        return self.served.model_id

    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.model_id, created=self.created)])

    def health(self) -> dict[str, Any]:
        status = "ok" if self.server.alive() else "vllm server down"
        return {"status": status, "model": self.model_id, "backend": "vllm", "completed_requests": self._completed}

    def config(self) -> dict[str, Any]:
        config = self.served.config()
        return {
            "model": self.model_id, "backend": "vllm", "method": config.method, "label": config.label(),
            "knobs": dict(config.knobs), "speculative_config": self.server.launch.speculative_config,
            "engine_args": self.server.launch.engine_args, "chosen_for_concurrency": self.served.concurrency,
            "pair": self.served.pair.model_dump(), "context": self.settings.max_model_len,
            "source": self.served.source.model_dump(exclude_none=True), "trial_metrics": self.served.trial_metrics,
            "limits": self.limits.model_dump(),
        }

    # --- requests ----------------------------------------------------------------------

    def prepare(self, request: CompletionRequest) -> VllmJob:
        """The request for vLLM, or `RequestRejected` saying what is wrong with it."""
        if request.model is not None and request.model != self.model_id:
            raise RequestRejected(f"model {request.model!r} is not served here; this endpoint serves {self.model_id!r}",
                                  status=404, param="model", code="model_not_found")
        if request.compare_ar:
            raise RequestRejected("compare_ar is not available for a vLLM-served configuration (vLLM counts "
                                  "speculation per server, not per request)", param="compare_ar")
        if request.max_tokens > self.limits.max_tokens_limit:
            raise RequestRejected(f"max_tokens is {request.max_tokens}; this endpoint allows at most "
                                  f"{self.limits.max_tokens_limit}", param="max_tokens")
        context = self.settings.max_model_len
        if len(request.prompt) > context * CHARS_PER_POSITION_BOUND:
            raise RequestRejected(f"the prompt is {len(request.prompt)} characters, far longer than the model's "
                                  f"context of {context} tokens", param="prompt")
        prompt_tokens = self._count_tokens(request.prompt)
        room = context - prompt_tokens
        if room < 1:
            raise RequestRejected(f"the prompt is {prompt_tokens} tokens, longer than the model's context of "
                                  f"{context} tokens", param="prompt")
        if request.max_tokens > room:
            raise RequestRejected(f"prompt ({prompt_tokens} tokens) + max_tokens ({request.max_tokens}) exceeds the "
                                  f"model's context of {context} tokens; max_tokens can be at most {room} for this "
                                  "prompt", param="max_tokens")
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


# --- Ray Serve ----------------------------------------------------------------------------


# Named like spectune's own deployment, so `spectune serve` reads its status the same way; a replica
# whose server cannot start fails again: 2 tries, not Serve's default of 20.
@serve.deployment(name=DEPLOYMENT_NAME, max_ongoing_requests=64, max_constructor_retry_count=2,
                  ray_actor_options={"num_cpus": 1})
@serve.ingress()  # late-bound: the app needs the service this replica builds in __init__
class VllmCompletionDeployment:
    """One replica: starts a vLLM server with the configuration (its CPUs = the engine's threads)."""

    def __init__(self, served: dict[str, Any], limits: dict[str, Any], api_key: str | None = None) -> None:
        import ray

        resources = ray.get_runtime_context().get_assigned_resources()
        self.service = VllmCompletionService.start(
            ServedConfig.model_validate(served), Limits.model_validate(limits),
            threads=max(1, int(resources.get("CPU", 1.0))), gpu=resources.get("GPU", 0.0) > 0)
        self.api_key = api_key

    def __serve_build_asgi_app__(self) -> Any:
        return build_app(self.service, self.api_key)

    def __del__(self) -> None:
        service = getattr(self, "service", None)  # absent when the server failed to start
        if service is not None:
            service.close()
