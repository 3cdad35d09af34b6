"""Prompt sets: JSONL, one {"id": ..., "prompt": ..., "category": ...} per line."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

DEFAULT_PROMPTS = "default"


class Prompt(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    id: str = Field(min_length=1)
    prompt: str
    category: str = "uncategorised"

    @field_validator("id", mode="before")
    @classmethod
    def id_as_text(cls, value: object) -> object:
        return str(value) if isinstance(value, int) else value

    @field_validator("prompt")
    @classmethod
    def not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the prompt is empty")
        return value


class PromptFileError(ValueError):
    pass


def load_prompts(path: str | Path = DEFAULT_PROMPTS, limit: int | None = None) -> list[Prompt]:
    """Read a JSONL prompt set; `default` is the set shipped with spectune."""
    name, text = _read(path)
    prompts: list[Prompt] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            prompts.append(_parse_line(name, number, line))
    if not prompts:
        raise PromptFileError(f"{name}: no prompts (expected one JSON object per line)")
    duplicates = sorted({p.id for p in prompts if sum(q.id == p.id for q in prompts) > 1})
    if duplicates:
        raise PromptFileError(f"{name}: duplicate prompt ids {duplicates}")
    return prompts[:limit] if limit else prompts


def _read(path: str | Path) -> tuple[str, str]:
    if str(path) == DEFAULT_PROMPTS:
        return "default prompts", resources.files("spectune.data").joinpath("prompts.jsonl").read_text()
    file = Path(path)
    if not file.is_file():
        raise PromptFileError(f"prompts file {file} does not exist")
    return str(file), file.read_text(encoding="utf-8")


def _parse_line(name: str, number: int, line: str) -> Prompt:
    try:
        return Prompt.model_validate(json.loads(line))
    except json.JSONDecodeError as err:
        raise PromptFileError(f"{name} line {number}: not valid JSON ({err.msg})") from None
    except ValidationError as err:
        problem = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'line'}: {e['msg']}" for e in err.errors())
        raise PromptFileError(f"{name} line {number}: {problem}") from None
