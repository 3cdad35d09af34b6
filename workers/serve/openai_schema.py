"""The wire format of the endpoint: OpenAI's `/v1/completions`, plus spectune's `speculative` stats.

Requests are validated here (`extra="forbid"`: a misspelt field is an error, not silently
ignored); limits that depend on the served model (max_tokens, context) are checked by the
service, which knows them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

FinishReason = Literal["length", "stop"]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class CompletionRequest(BaseModel):
    """The fields OpenAI's completions API defines that this endpoint honours, and `compare_ar`."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(description="the text to continue")
    model: str | None = Field(None, description="the served model id (see GET /v1/models); optional")
    max_tokens: int = Field(16, ge=1, description="new tokens at most (OpenAI's default: 16)")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 = greedy (output equals plain decoding); "
                               "below 1e-5 also greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=2**63, description="sampling seed (0 <= seed < 2**63); random when absent")
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = Field(1, description="one completion per request")
    user: str | None = None
    compare_ar: bool = Field(False, description="also decode with plain AR and report both timings and the speedup")

    @field_validator("prompt")
    @classmethod
    def prompt_not_blank(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError("the prompt is empty")
        return prompt


class Choice(BaseModel):
    text: str
    index: int = 0
    logprobs: None = None
    finish_reason: FinishReason | None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class SpeculativeStats(BaseModel):
    """How the speculative decoder did on this request (metric names as in `spectune bench`)."""

    method: str
    label: str  # the configuration's one name, as bench, the store and the dashboard show it
    config: dict[str, Any]  # the method's knobs
    trial_id: int | None
    target_calls: int
    draft_calls: int
    mean_accepted_tokens: float | None  # tokens per target forward, bonus included (AR = 1.0)
    acceptance_rate: float | None  # accepted / drafted draft tokens (None when nothing was drafted)
    tokens_per_s: float
    wall_s: float
    seed: int


class ArComparison(BaseModel):
    """The same request decoded with plain autoregressive decoding, right after."""

    ar_wall_s: float
    ar_tokens_per_s: float
    speculative_tokens_per_s: float
    speedup: float  # speculative tokens/s over AR tokens/s
    outputs_match: bool  # same tokens (always, at temperature 0, for a lossless method)


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage | None
    speculative: SpeculativeStats | None = None
    comparison: ArComparison | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "spectune"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape, so client libraries show the reason."""

    error: ErrorBody
