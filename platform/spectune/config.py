"""One decoding configuration, as every layer passes it: bench, sweep trials, the store, the dashboard, serve.

Torch-free on purpose: a Tune trial process, the store and the dashboard use it without the
engine. Whether the knobs are valid for the method is the method registry's business
(`spectune.methods.METHODS.config(...)` builds a validated one and fills `columns`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from spectune.engine.sampling import Sampling

CONFIG_KEYS = ("method", "temperature", "name")  # the flat form's keys that are not knobs


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
    """A registered method, its knobs, and the temperature it decodes at."""

    method: str
    knobs: Mapping[str, Any] = field(default_factory=dict)
    temperature: float = 0.0
    name: str | None = None  # a label chosen by the user (bench config files); else one is made
    columns: KnobColumns = field(default=KnobColumns(), compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "knobs", dict(self.knobs))  # a copy: nobody else's dict changes it (picklable, for Ray)
        object.__setattr__(self, "temperature", float(self.temperature))

    def label(self) -> str:
        """The one short name of a configuration: `sps(draft_len=4)`, `tree(branching=[4,2,1])@T=0.7`."""
        if self.name:
            return self.name
        args = ",".join(f"{key}={compact(value)}" for key, value in self.knobs.items())
        text = f"{self.method}({args})" if args else self.method
        return f"{text}@T={self.temperature:g}" if self.temperature else text

    def as_dict(self) -> dict[str, Any]:
        """The flat form the store and JSON rows keep: {method, knob: value, ..., temperature}."""
        flat = {"method": self.method, **self.knobs, "temperature": self.temperature}
        return {**flat, "name": self.name} if self.name else flat

    @classmethod
    def from_dict(cls, flat: Mapping[str, Any], columns: KnobColumns = KnobColumns()) -> DecodeConfig:
        """Read the flat form back (knobs may also sit under `knobs:`, as older stores kept them)."""
        method = flat.get("method")
        if not isinstance(method, str) or not method:
            raise ValueError(f"a configuration needs a method name, got {dict(flat)}")
        nested = flat.get("knobs")
        knobs = dict(nested) if isinstance(nested, Mapping) else {k: v for k, v in flat.items() if k not in CONFIG_KEYS}
        return cls(method, knobs, float(flat.get("temperature") or 0.0), flat.get("name"), columns)

    def with_temperature(self, temperature: float) -> DecodeConfig:
        return DecodeConfig(self.method, self.knobs, temperature, self.name, self.columns)


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


class Settings(BaseModel):
    """How a configuration is measured: tokens per prompt, sampling, repeats (CLI flags and sweep specs)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: int = Field(128, ge=1, description="new tokens per prompt")
    temperature: float = Field(0.0, ge=0.0, le=5.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int = 0
    repeats: int = Field(3, ge=1, description="timed passes over the prompt set")
    warmup: int = Field(2, ge=0, description="untimed prompts each configuration decodes first")

    @property
    def sampling(self) -> Sampling:
        from spectune.engine.sampling import Sampling  # the engine (torch) only where decoding happens

        return Sampling(self.temperature, self.top_p)
