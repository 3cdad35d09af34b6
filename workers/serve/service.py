"""What the endpoint asks of a backend's completion service, and what every such service shares.

    CompletionService   the protocol `build_app` is typed to (spectune's engine and vLLM implement it)
    ServiceBase         the shared part: the served model's id, GET /v1/models, admission, and the
                        request metrics of GET /metrics (`spectune.workers.serve.metrics`)
    Replica             what Ray gave the replica a service starts in (its CPUs and GPUs)
    RequestRejected     a request the endpoint will not decode (its status and reason go to the client)

Admission is one rule for every backend: the model asked for is the one served, `max_tokens` is
within the endpoint's limit, the prompt is not absurdly long before it is tokenized, and prompt +
`max_tokens` (+ the draft tree, where the engine appends one) fit the served model's context.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from spectune.engine.budget import ContextOverflow, check_fits
from spectune.workers.serve.metrics import RequestMetrics
from spectune.workers.serve.openai_schema import CompletionRequest, CompletionResponse, ModelCard, ModelList
from spectune.workers.serve.served_config import Limits, ServedConfig

# Longest prompt (in characters) worth tokenizing: no token of these tokenizers spans more
# than a few dozen characters, so anything longer cannot fit the context anyway.
CHARS_PER_POSITION_BOUND = 64

Job = TypeVar("Job")


class RequestRejected(ValueError):
    """A request the endpoint will not decode; `status` and the message go back to the client."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param
        self.code = code


class CompletionService(Protocol[Job]):
    """One served configuration answering OpenAI-shaped completion requests."""

    @property
    def model_id(self) -> str: ...

    @property
    def tokenizer(self) -> Any:
        """The served target's tokenizer, for chat templates (every backend's chat is rendered with it)."""

    @property
    def metrics(self) -> RequestMetrics:
        """Its request metrics (the app counts rejected requests there)."""

    def models(self) -> ModelList: ...
    def health(self) -> dict[str, Any]: ...
    def config(self) -> dict[str, Any]: ...

    async def admit(self, request: CompletionRequest) -> Job:
        """The request admitted (tokenized, checked), or `RequestRejected`; off the event loop."""

    async def complete(self, request: CompletionRequest) -> CompletionResponse: ...

    def stream(self, request: CompletionRequest, job: Job,
               is_disconnected: Callable[[], Awaitable[bool]] | None = None) -> AsyncIterator[CompletionResponse]:
        """Chunks in OpenAI's streaming shape for an admitted request."""

    async def prometheus(self) -> bytes:
        """GET /metrics: the service's metrics in Prometheus' text format."""

    def close(self) -> None: ...


@dataclass(frozen=True)
class Replica:
    """The resources Ray gave the replica a service starts in."""

    cpus: float = 1.0
    gpus: float = 0.0

    @classmethod
    def assigned(cls) -> Replica:
        import ray

        resources = ray.get_runtime_context().get_assigned_resources()
        return cls(resources.get("CPU", 1.0), resources.get("GPU", 0.0))

    @property
    def threads(self) -> int:
        """Decoding threads: the replica's CPUs (more would fight the other replicas)."""
        return max(1, int(self.cpus))


class ServiceBase:
    """The part every completion service shares: what is served, and which requests it admits."""

    compare_ar_refused: str | None = None  # why a backend cannot decode AR beside the request (None: it can)

    def __init__(self, served: ServedConfig, limits: Limits) -> None:
        self.served = served
        self.limits = limits
        self.created = int(time.time())
        self.metrics = RequestMetrics(served.model_id)

    async def prometheus(self) -> bytes:
        return self.metrics.exposition()

    @property
    def model_id(self) -> str:
        return self.served.model_id

    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.model_id, created=self.created)])

    def check_request(self, request: CompletionRequest, context: int) -> None:
        """What needs no tokenizer: the model asked for, compare_ar, the max_tokens limit, the prompt's length bound."""
        if request.model is not None and request.model != self.model_id:
            raise RequestRejected(f"model {request.model!r} is not served here; this endpoint serves {self.model_id!r}",
                                  status=404, param="model", code="model_not_found")
        if request.compare_ar and self.compare_ar_refused is not None:
            raise RequestRejected(self.compare_ar_refused, param="compare_ar")
        if request.max_tokens > self.limits.max_tokens_limit:
            raise RequestRejected(f"max_tokens is {request.max_tokens}; this endpoint allows at most "
                                  f"{self.limits.max_tokens_limit}", param="max_tokens")
        if len(request.prompt) > context * CHARS_PER_POSITION_BOUND:
            raise RequestRejected(f"the prompt is {len(request.prompt)} characters, far longer than the model's "
                                  f"context of {context} tokens", param="prompt")

    def check_room(self, prompt_tokens: int, max_tokens: int, context: int, tree_nodes: int = 0) -> None:
        """Prompt + max_tokens (+ a draft tree of `tree_nodes`) fit the context (`spectune.engine.budget`'s rule)."""
        tree = f" allows (the draft tree needs {tree_nodes} more)" if tree_nodes else ""
        drafted = f" + draft tree ({tree_nodes} nodes)" if tree_nodes else ""
        try:
            check_fits(prompt_tokens, max_tokens, tree_nodes, context)
        except ContextOverflow as err:
            if err.room < 1:
                raise RequestRejected(f"the prompt is {prompt_tokens} tokens, longer than the model's context of "
                                      f"{context} tokens{tree}", param="prompt") from None
            raise RequestRejected(f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}){drafted} exceeds the "
                                  f"model's context of {context} tokens; max_tokens can be at most {err.room} for "
                                  "this prompt", param="max_tokens") from None
        except ValueError as err:  # an empty prompt
            raise RequestRejected(str(err), param="prompt") from None
