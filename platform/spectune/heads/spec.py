"""What a heads folder holds and what it was trained for: `heads.json`, and the checks against a target.

Torch-free on purpose: a sweep spec or a serve config can be checked against a pair's
`target/config.json` before any model loads (`check_config`); `check_model` adds the weights'
fingerprint once the target is loaded (`spectune.heads.load`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from spectune.validation import one_line

KINDS = ("medusa", "hydra", "eagle", "eagle3", "falcon", "ppd", "transfer")
Kind = Literal["medusa", "hydra", "eagle", "eagle3", "falcon", "ppd", "transfer"]
HEADS_VERSION = 1  # bumped when a change here changes what a heads folder means
SPEC_FILE = "heads.json"
WEIGHTS_FILE = "heads.safetensors"
TRAIN_HINT = "train them with `spectune heads train --pair {pair} --kind {kind}`"


class HeadsError(ValueError):
    """Heads that cannot draft for this target, with the reason in one line."""


class TargetPrint(BaseModel):
    """The target a heads folder was trained on: its shape, and a fingerprint of its weights."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="the target's path or hub id when trained")
    model_type: str
    hidden_size: int = Field(ge=1)
    vocab_size: int = Field(ge=1)
    num_hidden_layers: int = Field(ge=1)
    weights: str = Field(description="sha1 of its LM head and input embeddings rounded to bf16 (spectune.heads.load)")


class HeadsSpec(BaseModel):
    """heads.json: the kind, its sizes, the target's layers it reads, and the target it was trained for."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = HEADS_VERSION
    kind: Kind
    n_heads: int = Field(ge=1, description="medusa/hydra: heads, one per draft depth; eagle: positions trained (TTT); "
                                         "falcon: the block, tokens drafted per pass; "
                                         "ppd: prompt tokens, one per draft depth; "
                                         "transfer: transfer maps, one per draft depth")
    n_layers: int = Field(1, ge=1, description="medusa/hydra: residual layers per head; eagle/falcon: decoder layers")
    feature_layers: tuple[int, ...] = Field(description="target layers read (1..L; L = the final norm's output); "
                                                        "transfer: (l,), the block after which its pseudo states enter")
    draft_vocab_size: int = Field(ge=1, description="tokens the heads can propose (the corpus's most frequent)")
    target: TargetPrint
    train: dict[str, Any] = Field(default_factory=dict, description="the training options (seed, steps, ...)")

    @property
    def reduced_vocab(self) -> bool:
        return self.draft_vocab_size < self.target.vocab_size


def read_spec(folder: Path, kind: str | None = None) -> HeadsSpec:
    """Parse `folder/heads.json`; a missing, unreadable or malformed file is a HeadsError naming it."""
    path = Path(folder) / SPEC_FILE
    if not Path(folder).is_dir():
        raise HeadsError(f"heads folder {folder} does not exist" + _hint(folder, kind))
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise HeadsError(f"{folder} is not a heads folder (no {SPEC_FILE})" + _hint(folder, kind)) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise HeadsError(f"{path} does not parse: {err}") from None
    try:
        spec = HeadsSpec.model_validate(data)
    except ValidationError as err:
        problem = one_line(err, root="file", limit=3)
        raise HeadsError(f"{path} does not parse as heads: {problem}") from None
    if spec.version != HEADS_VERSION:
        raise HeadsError(f"{path} is heads format {spec.version}; this spectune reads {HEADS_VERSION}" + _hint(folder, kind))
    if kind is not None and spec.kind != kind:
        raise HeadsError(f"{folder} holds {spec.kind} heads, not {kind}")
    return spec


def write_spec(folder: Path, spec: HeadsSpec) -> None:
    (Path(folder) / SPEC_FILE).write_text(spec.model_dump_json(indent=2) + "\n")


def check_config(spec: HeadsSpec, config: Mapping[str, Any], folder: Path | str = "heads") -> None:
    """The target's config (its config.json as a mapping) must have the shape the heads were trained for."""
    mismatches = [
        f"{field} {config.get(field)} (heads trained for {getattr(spec.target, field)})"
        for field in ("hidden_size", "vocab_size", "num_hidden_layers")
        if config.get(field) != getattr(spec.target, field)
    ]
    if mismatches:
        raise HeadsError(
            f"{spec.kind} heads at {folder} were trained for another target ({spec.target.name}): this target has "
            + ", ".join(mismatches)
        )
    layers = int(config["num_hidden_layers"])
    bad = [layer for layer in spec.feature_layers if not 1 <= layer <= layers]
    if bad:
        raise HeadsError(f"{spec.kind} heads at {folder} read target layers {bad}; the target has 1..{layers}")


def check_pair_heads(kind: str, heads: str | None, target: str) -> None:
    """Before anything loads (a sweep spec, a served config): the `kind` heads a method would load for this
    target exist, parse and fit the target's config.json. A target not on this machine (a hub id, a cluster
    path) is left to the worker that loads it."""
    config_file = Path(target).expanduser() / "config.json"
    if not config_file.is_file():
        return
    folder = Path(heads).expanduser() if heads else default_folder(target, kind)
    if folder is None:
        raise HeadsError(f"no {kind} heads for target {target}: it is not a pair folder's target/, "
                         "so give the heads folder (knob heads=DIR)")
    if not folder.is_dir() and not heads:
        raise HeadsError(f"no {kind} heads for target {target} (looked in {folder}): "
                         + TRAIN_HINT.format(pair=folder.parent.parent, kind=kind))
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise HeadsError(f"{config_file} does not parse: {err}") from None
    check_config(read_spec(folder, kind), config, folder)


def default_folder(target_path: str, kind: str) -> Path | None:
    """`<pair>/heads/<kind>` for a target at `<pair>/target`; None for a hub id or a folder outside a pair."""
    target = Path(target_path).expanduser()
    if target.name != "target" or not (target / "config.json").is_file():
        return None
    return target.parent / "heads" / kind


def _hint(folder: Path, kind: str | None) -> str:
    folder = Path(folder)
    if kind is None or folder.name != kind or folder.parent.name != "heads":
        return ""
    return ": " + TRAIN_HINT.format(pair=folder.parent.parent, kind=kind)
