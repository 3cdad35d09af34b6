"""The JSON files the tree tools exchange: acceptance vectors, forward-time profiles and path lists.

`spectune trees measure` / `profile` / `optimize` write them; `spectune trees optimize`, the
`sequoia` method and the template methods (`paths_file`) read them back here, so a malformed
file fails with the file and field named.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from spectune.trees.sequoia import Profile, check_acceptance
from spectune.validation import one_line


class AcceptanceFile(BaseModel):
    """`spectune trees measure` output; only `acceptance` is needed to optimise a tree."""

    model_config = ConfigDict(extra="allow")

    acceptance: list[float] = Field(min_length=1, description="p[k]: probability the k-th ranked child is accepted")

    @field_validator("acceptance")
    @classmethod
    def probabilities(cls, value: list[float]) -> list[float]:
        return list(check_acceptance(value))


class ProfileFile(BaseModel):
    """`spectune trees profile` output: milliseconds for 1..N tokens after `past` cached tokens."""

    model_config = ConfigDict(extra="allow")

    past: int = Field(ge=0)
    target_ms: list[float] = Field(min_length=1)
    drafter_ms: list[float] = Field(default_factory=list)

    @field_validator("target_ms", "drafter_ms")
    @classmethod
    def positive(cls, value: list[float]) -> list[float]:
        if any(t <= 0 for t in value):
            raise ValueError("forward times must be > 0 ms")
        return value

    def profile(self) -> Profile:
        return Profile(tuple(self.target_ms), tuple(self.drafter_ms))


def _read_json(path: str | Path, what: str) -> object:
    file = Path(path).expanduser()
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise ValueError(f"{what} file {file} does not exist") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} file {file} is not valid JSON: {err}") from None


def _validate(model: type[BaseModel], data: object, path: str | Path, what: str) -> BaseModel:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        problem = one_line(err, root="file")
        raise ValueError(f"{what} file {path}: {problem}") from None


def load_acceptance(path: str | Path) -> tuple[float, ...]:
    """An acceptance vector from a `trees measure` file (or a bare JSON list)."""
    data = _read_json(path, "acceptance")
    if isinstance(data, list):
        data = {"acceptance": data}
    return tuple(_validate(AcceptanceFile, data, path, "acceptance").acceptance)


def load_profile(path: str | Path) -> Profile:
    data = _read_json(path, "profile")
    return _validate(ProfileFile, data, path, "profile").profile()


def load_paths(path: str | Path) -> list[list[int]]:
    """A Medusa-style path list from a `spectune trees optimize` file (or a bare JSON list of paths)."""
    data = _read_json(path, "tree")
    paths = data.get("paths") if isinstance(data, dict) else data
    if not isinstance(paths, list):
        raise ValueError(f"tree file {path} must hold a list of paths or {{'paths': [...]}}")
    return paths
