"""The wire format of the endpoint: OpenAI's `/v1/completions`, plus spectune's `speculative` stats.

Requests are validated here (`extra="forbid"`: a misspelt field is an error, not silently
ignored); limits that depend on the served model (max_tokens, context) are checked by the
service, which knows them.

`stop` is OpenAI's: a string or up to 4, none empty; the text is cut where the first one begins
and `finish_reason` is "stop" (`spectune.workers.serve.text`). Fields that change what is
sampled, or ask for what the endpoint does not return, are accepted only at their neutral
values, which clients and load tools send with every request (`vllm bench serve` sends
`repetition_penalty: 1.0` and `logprobs: null`); any other value is a one-line 400 naming the
field and why (`NEUTRAL`). `logprobs` in particular is not returned: the engine's verification
phase keeps no per-token probabilities, and a method's accepted tokens would need the target's
log-softmax threaded through every phase; null (or absent) is accepted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

FinishReason = Literal["length", "stop"]
MAX_STOP_SEQUENCES = 4  # OpenAI's limit

_NOT_APPLIED = "not applied: decoding samples the target's own distribution (temperature and top_p only)"


@dataclass(frozen=True)
class Neutral:
    """A field accepted only at the values that leave decoding as it is, and why."""

    values: tuple[Any, ...]
    why: str

    def shown(self) -> str:
        return " or ".join("null" if v is None else "{}" if v == {} else str(v).lower() if isinstance(v, bool)
                           else repr(v) for v in self.values)


# OpenAI's fields every request model has, then vLLM's sampling extensions, at their neutral values.
NEUTRAL: dict[str, Neutral] = {
    "n": Neutral((1,), "one completion per request"),
    "presence_penalty": Neutral((0,), f"penalties are {_NOT_APPLIED}"),
    "frequency_penalty": Neutral((0,), f"penalties are {_NOT_APPLIED}"),
    "logit_bias": Neutral((None, {}), f"logit biases are {_NOT_APPLIED}"),
    "repetition_penalty": Neutral((1,), f"penalties are {_NOT_APPLIED}"),
    "top_k": Neutral((-1, 0), f"top_k is {_NOT_APPLIED}"),
    "min_p": Neutral((0,), f"min_p is {_NOT_APPLIED}"),
    "ignore_eos": Neutral((False,), "decoding ends at the end-of-sequence token"),
}
_NO_LOGPROBS = "log probabilities are not returned"
COMPLETION_NEUTRAL = {"logprobs": Neutral((None,), _NO_LOGPROBS),
                      "echo": Neutral((False,), "the prompt is not echoed back")}
CHAT_NEUTRAL = {"logprobs": Neutral((None, False), _NO_LOGPROBS), "top_logprobs": Neutral((None, 0), _NO_LOGPROBS)}


def neutral_only(rules: dict[str, Neutral]) -> Callable[[Any, ValidationInfo], Any]:
    """A field validator: the field at one of its neutral values in `rules`, or a ValueError saying which and why."""

    def check(value: Any, info: ValidationInfo) -> Any:
        rule = rules[info.field_name]
        if not any(_same(value, neutral) for neutral in rule.values):
            raise ValueError(f"only {rule.shown()} is accepted: {rule.why}")
        return value

    return check


def _same(value: Any, neutral: Any) -> bool:
    if isinstance(value, bool) or isinstance(neutral, bool):  # false is not 0 here, nor true 1
        return value is neutral
    return value == neutral


def check_stop(stop: str | list[str] | None) -> str | list[str] | None:
    stops = [stop] if isinstance(stop, str) else stop or []
    if len(stops) > MAX_STOP_SEQUENCES:
        raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {len(stops)}")
    if any(not s for s in stops):
        raise ValueError("a stop sequence is empty")
    return stop


class OpenAIFields(BaseModel):
    """What completions and chat share: stop sequences, and OpenAI's and vLLM's fields at neutral values."""

    model_config = ConfigDict(extra="forbid")

    stop: str | list[str] | None = Field(None, description=f"up to {MAX_STOP_SEQUENCES} stop sequences: the text "
                                         "ends where the first begins (not included), finish_reason 'stop'")
    n: int = Field(1, description="one completion per request (1 only)")
    presence_penalty: float = Field(0.0, description="0 only")
    frequency_penalty: float = Field(0.0, description="0 only")
    logit_bias: dict[str, float] | None = Field(None, description="null or {} only")
    repetition_penalty: float = Field(1.0, description="vLLM's extension; 1 only")
    top_k: int = Field(-1, description="vLLM's extension; -1 or 0 (off) only")
    min_p: float = Field(0.0, description="vLLM's extension; 0 only")
    ignore_eos: bool = Field(False, description="vLLM's extension; false only")

    _neutral = field_validator(*NEUTRAL)(neutral_only(NEUTRAL))
    _stop = field_validator("stop")(check_stop)

    @property
    def stops(self) -> tuple[str, ...]:
        """The stop sequences as a tuple (empty: none)."""
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class CompletionRequest(OpenAIFields):
    """The fields OpenAI's completions API defines that this endpoint honours, and `compare_ar`."""

    prompt: str = Field(description="the text to continue")
    model: str | None = Field(None, description="the served model id (see GET /v1/models); optional")
    max_tokens: int = Field(16, ge=1, description="new tokens at most (OpenAI's default: 16)")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 = greedy (output equals plain decoding); "
                               "below 1e-5 also greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=2**63, description="sampling seed (0 <= seed < 2**63); random when absent")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logprobs: int | None = Field(None, description="null only: log probabilities are not returned")
    echo: bool = Field(False, description="false only")
    compare_ar: bool = Field(False, description="also decode with plain AR and report both timings and the speedup")

    _neutral_here = field_validator(*COMPLETION_NEUTRAL)(neutral_only(COMPLETION_NEUTRAL))

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
