"""Prompt sets: JSONL, one {"id": ..., "prompt": ..., "category": ..., "chat": false} per line.

A prompt with `"chat": true` is a user's request to a chat model: it is sent through the model's
chat template (a user turn, then the start of the assistant's) rather than as raw text, and a
model without a template cannot take it. Shipped sets: `default` (code completion, raw text)
and `chat` (63 requests in 7 Spec-Bench-style categories, all chat, the categories interleaved so
that the first N prompts, `--limit N`, span them).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from spectune.validation import one_line

DEFAULT_PROMPTS = "default"
CHAT_PROMPTS = "chat"
SHIPPED = {DEFAULT_PROMPTS: "prompts.jsonl", CHAT_PROMPTS: "chat.jsonl"}  # name -> file in spectune.data


class Prompt(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    id: str = Field(min_length=1)
    prompt: str
    category: str = "uncategorised"
    chat: bool = False  # send through the model's chat template as a user turn

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
    """Read a JSONL prompt set; `default` and `chat` are the sets shipped with spectune."""
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
    if str(path) in SHIPPED:
        return f"{path} prompts", resources.files("spectune.data").joinpath(SHIPPED[str(path)]).read_text()
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
        problem = one_line(err, root="line", verbatim=True)
        raise PromptFileError(f"{name} line {number}: {problem}") from None


class ChatTemplateMissing(ValueError):
    """A chat prompt given to a model that has no chat template."""


def prompt_text(prompt: Prompt, tokenizer: Any, model: str = "the model") -> str:
    """The text the model is given: the prompt itself, or a chat prompt rendered by the tokenizer's chat template."""
    if not prompt.chat:
        return prompt.prompt
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateMissing(f"prompt {prompt.id!r} is a chat prompt but {model} has no chat template: "
                                  "use a chat model (e.g. --pair smollm2) or a prompt set without \"chat\": true")
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt.prompt}], tokenize=False,
                                         add_generation_prompt=True)
