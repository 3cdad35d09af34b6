"""OpenAI's `/v1/chat/completions` over the completion service: messages rendered by the model's chat template.

OpenAI clients talk to chat models through this route and expect the server to apply the chat
template; a raw-text `/v1/completions` request to a chat model gets a continuation, not an answer.
A chat request becomes the completion request of its rendered prompt (the conversation, then the
start of the assistant's turn), is decoded by the served configuration, and comes back in the
chat shapes: `chat.completion`, or `chat.completion.chunk` deltas when streaming (the first delta
carries the role). A model without a chat template gets a 400 naming /v1/completions instead.

Every backend renders here, with the pair's own tokenizer (a vLLM-served configuration gets the
rendered prompt on vLLM's /v1/completions), so a chat answer is the same text whichever engine
decodes it. A message's `content` is a string or OpenAI's list of text parts; parts are joined
with "\n" into one string (`flatten_content`), as vLLM does for the string-content chat templates
these models carry (SmolLM2's, Qwen2.5's, Llama's read `message['content']` as text). Any other
part type (an image) is a 400 naming the message.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, field_validator

from spectune.workers.serve.openai_schema import (
    CHAT_NEUTRAL, ArComparison, CompletionRequest, CompletionResponse, FinishReason, OpenAIFields, SpeculativeStats,
    StreamOptions, Usage, neutral_only,
)
from spectune.workers.serve.service import CompletionService, RequestRejected

PART_SEPARATOR = "\n"  # between a message's text parts, as vLLM joins them for string-content templates
CONTENT_SCHEMA = {"anyOf": [{"type": "string"}, {"type": "array", "items": {
    "type": "object", "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
    "required": ["type", "text"], "additionalProperties": False}}]}


def flatten_content(content: Any) -> str:
    """A message's content as the chat template reads it: a string as it is, text parts joined by "\n"."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError("content must be a string or a list of text parts")
    texts = []
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            shown = f"type {kind!r}" if isinstance(part, dict) else type(part).__name__
            raise ValueError(f"content part {index} is {shown}; only text parts "
                             "({'type': 'text', 'text': ...}) are served")
        if not isinstance(part.get("text"), str) or set(part) - {"type", "text"}:
            raise ValueError(f"content part {index} must be {{'type': 'text', 'text': <string>}}")
        texts.append(part["text"])
    return PART_SEPARATOR.join(texts)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: Annotated[str, BeforeValidator(flatten_content), WithJsonSchema(CONTENT_SCHEMA)] = Field(
        description="a string, or a list of text parts (joined by newlines)")


class ChatCompletionRequest(OpenAIFields):
    """The fields OpenAI's chat completions API defines that this endpoint honours (as /v1/completions)."""

    messages: list[ChatMessage] = Field(min_length=1, description="the conversation so far")
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, description="new tokens at most (default 16)")
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logprobs: bool | None = Field(None, description="null or false only: log probabilities are not returned")
    top_logprobs: int | None = Field(None, description="null or 0 only")
    compare_ar: bool = False

    _neutral_here = field_validator(*CHAT_NEUTRAL)(neutral_only(CHAT_NEUTRAL))

    def completion(self, prompt: str) -> CompletionRequest:
        """The completion request of the rendered conversation (its neutral fields are left at their defaults)."""
        max_tokens = self.max_completion_tokens or self.max_tokens or 16
        return CompletionRequest(prompt=prompt, model=self.model, max_tokens=max_tokens, temperature=self.temperature,
                                 top_p=self.top_p, seed=self.seed, stop=self.stop, stream=self.stream,
                                 stream_options=self.stream_options, user=self.user, compare_ar=self.compare_ar)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None
    speculative: SpeculativeStats | None = None
    comparison: ArComparison | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    speculative: SpeculativeStats | None = None
    comparison: ArComparison | None = None


def chat_request(service: CompletionService[Any], request: ChatCompletionRequest) -> CompletionRequest:
    """The conversation rendered by the served target's chat template, as a completion request."""
    tokenizer = service.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise RequestRejected(f"the served model {service.model_id!r} has no chat template: use /v1/completions "
                              "with a plain prompt", param="messages")
    messages = [m.model_dump() for m in request.messages]
    try:
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as err:  # noqa: BLE001 - a template may reject a conversation (e.g. roles out of order)
        raise RequestRejected(f"the model's chat template rejects these messages: {err}", param="messages") from None
    return request.completion(prompt)


def chat_response(completion: CompletionResponse) -> ChatCompletionResponse:
    return ChatCompletionResponse(
        id=completion.id.replace("cmpl-", "chatcmpl-", 1), created=completion.created, model=completion.model,
        choices=[ChatChoice(index=c.index, message=AssistantMessage(content=c.text), finish_reason=c.finish_reason)
                 for c in completion.choices],
        usage=completion.usage, speculative=completion.speculative, comparison=completion.comparison)


async def chat_complete(service: CompletionService[Any], request: CompletionRequest) -> ChatCompletionResponse:
    return chat_response(await service.complete(request))


async def chat_stream(service: CompletionService[Any], request: CompletionRequest, job: Any,
                      is_disconnected: Callable[[], Awaitable[bool]] | None = None) -> AsyncIterator[ChatCompletionChunk]:
    """The completion stream as chat chunks: the first delta names the role, then content deltas."""
    first = True
    async for chunk in service.stream(request, job, is_disconnected):
        choices = []
        for c in chunk.choices:
            delta = ChatDelta(role="assistant" if first else None, content=c.text)
            choices.append(ChatChunkChoice(index=c.index, delta=delta, finish_reason=c.finish_reason))
            first = False
        yield ChatCompletionChunk(id=chunk.id.replace("cmpl-", "chatcmpl-", 1), created=chunk.created,
                                  model=chunk.model, choices=choices, usage=chunk.usage,
                                  speculative=chunk.speculative, comparison=chunk.comparison)
