"""One decoding configuration, as every layer passes it: bench, sweep trials, the store, the dashboard, serve.

Torch-free on purpose: a Tune trial process, the store and the dashboard use it without the
engine. Whether the knobs are valid for the method is the method registry's business
(`spectune.methods.METHODS.config(...)` builds a validated one and fills `columns`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

CONFIG_KEYS = ("method", "temperature", "name", "backend", "concurrency", "dtype")  # the flat form's keys that are not knobs
DTYPE_TAGS = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}  # how a dtype reads in a label
DEFAULT_BACKEND = "spectune"  # spectune's own engine; "vllm": the engine users deploy
MAX_TEMPERATURE = 5.0


def check_temperature(value: float) -> float:
    """The one temperature rule (a configuration checks its own; a spec's `temperatures` use it too)."""
    if not 0.0 <= value <= MAX_TEMPERATURE:  # also NaN
        raise ValueError(f"each temperature must be within 0..{MAX_TEMPERATURE:g} (0 = greedy), got {value}")
    return float(value)


@dataclass(frozen=True)
class KnobColumns:
    """The knobs the store keeps as columns, so sweeps can filter and plot them.

    Each registered method names which of its knobs fill which column (`Method.columns`);
    a column the method has no knob for stays None.
    """

    draft_len: int | None = None
    tree_shape: str | None = None  # compact JSON of a branching / path list, or a file name
    node_budget: int | None = None
    exit_layer: int | None = None


@dataclass(frozen=True)
class DecodeConfig:
    """A method of a backend, its knobs, the temperature it decodes at and the load it is measured under."""

    method: str
    knobs: Mapping[str, Any] = field(default_factory=dict)
    temperature: float = 0.0
    name: str | None = None  # a label chosen by the user (bench config files); else one is made
    columns: KnobColumns = field(default=KnobColumns(), compare=False)
    backend: str = DEFAULT_BACKEND  # whose engine decodes: spectune's, or vllm (method = its speculative method)
    concurrency: int = 1  # requests in flight at once while measured (spectune's engine: 1)
    dtype: str | None = None  # the weights' dtype it decodes in (a sweep's dtype axis); None: the pair's own

    def __post_init__(self) -> None:
        object.__setattr__(self, "knobs", dict(self.knobs))  # a copy: nobody else's dict changes it (picklable, for Ray)
        object.__setattr__(self, "temperature", check_temperature(float(self.temperature)))
        object.__setattr__(self, "concurrency", int(self.concurrency))

    def label(self) -> str:
        """The one short name of a configuration: `sps(draft_len=4)`, `tree(branching=[4,2,1])@T=0.7`,
        `pld@bf16` (a dtype other than the pair's), `vllm:ngram(num_speculative_tokens=5)@c=4`."""
        if self.name:
            return self.name
        args = ",".join(f"{key}={compact(value)}" for key, value in self.knobs.items())
        text = f"{self.method}({args})" if args else self.method
        if self.backend != DEFAULT_BACKEND:
            text = f"{self.backend}:{text}"
        if self.dtype:
            text = f"{text}@{DTYPE_TAGS.get(self.dtype, self.dtype)}"
        if self.temperature:
            text = f"{text}@T={self.temperature:g}"
        return f"{text}@c={self.concurrency}" if self.concurrency != 1 else text

    def as_dict(self) -> dict[str, Any]:
        """The flat form the store and JSON rows keep: {method, knob: value, ..., temperature}
        (+ backend and concurrency when not spectune's engine at 1, + name when chosen)."""
        flat = {"method": self.method, **self.knobs, "temperature": self.temperature}
        if self.backend != DEFAULT_BACKEND:
            flat["backend"] = self.backend
        if self.concurrency != 1:
            flat["concurrency"] = self.concurrency
        if self.dtype:
            flat["dtype"] = self.dtype
        return {**flat, "name": self.name} if self.name else flat

    @classmethod
    def from_dict(cls, flat: Mapping[str, Any], columns: KnobColumns = KnobColumns()) -> DecodeConfig:
        """Read the flat form back (knobs may also sit under `knobs:`, as older stores kept them)."""
        method = flat.get("method")
        if not isinstance(method, str) or not method:
            raise ValueError(f"a configuration needs a method name, got {dict(flat)}")
        nested = flat.get("knobs")
        knobs = dict(nested) if isinstance(nested, Mapping) else {k: v for k, v in flat.items() if k not in CONFIG_KEYS}
        return cls(method, knobs, float(flat.get("temperature") or 0.0), flat.get("name"), columns,
                   str(flat.get("backend") or DEFAULT_BACKEND), int(flat.get("concurrency") or 1),
                   flat.get("dtype") or None)

    def with_temperature(self, temperature: float) -> DecodeConfig:
        return replace(self, temperature=float(temperature))


def compact(value: Any) -> str:
    """A knob value as it reads in a label: lists and mappings as compact JSON, the rest as str."""
    if isinstance(value, (list, tuple, dict, Mapping)):
        return json.dumps(_plain(value), separators=(",", ":"))
    return str(value)


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# How a run is measured: each field declared once, here. `Settings` has no defaults for the three a
# boundary chooses (`spectune bench`: 128 tokens, 3 repeats, 2 warm-up prompts; a sweep spec: 64, 1, 1).
MaxNewTokens = Annotated[int, Field(ge=1, description="new tokens per prompt")]
TopP = Annotated[float, Field(gt=0.0, le=1.0, description="nucleus sampling mass")]
Repeats = Annotated[int, Field(ge=1, description="timed passes over the prompt set (AR's too)")]
Warmup = Annotated[int, Field(ge=0, description="untimed warm-up prompts each configuration decodes first")]


class Settings(BaseModel):
    """How configurations are measured: tokens per prompt, sampling mass, seed, repeats (a run's, not a
    configuration's: the temperature belongs to `DecodeConfig`). Made once at a boundary: the bench CLI's
    flags or a sweep spec (`SweepSpec.settings`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: MaxNewTokens
    repeats: Repeats
    warmup: Warmup
    top_p: TopP = 1.0
    seed: int = 0
    tolerance_ulps: float = Field(2.0, ge=0.0, description="greedy certificate: how far below the argmax an emitted "
                                  "token's logit may be, in units of the dtype's rounding of that logit (spectune.certificate)")
