"""The one reference to a target/drafter pair: what the CLI, sweep specs, workers, serve and bench name.

Forms it reads (YAML, CLI flags, a stored sweep spec, a serve config file):

    tiny                                  a preset built by `spectune models build` (seed 0)
    smollm2                               a pretrained model imported by `spectune models import smollm2`
    {preset: micro, seed: 1}              a preset and seed
    ~/pairs/mine  |  {dir: ~/pairs/mine}  a pair folder holding target/ (and drafter/)
    {target: Qwen/Qwen2.5-7B-Instruct, drafter: Qwen/Qwen2.5-0.5B-Instruct}   paths or hub ids

plus `device` and `dtype`. Torch-free: a Tune trial process and the store read it without the
engine; `spectune.pair.load_pair(ref)` loads it. A new kind of pair is a new form here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from spectune.validation import one_line

DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
BUILT_PAIR = re.compile(r"pairs/([a-z]+)-seed(\d+)(/|$)")
CompileMode = Literal["off", "default", "max-autotune"]  # the engine's `INDUCTOR_OPTIONS` holds what each one sets


class PairError(ValueError):
    """A model pair that cannot be used, with the reason in words."""


class PairRef(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    target: str = Field(description="target model: a local folder or a hub id")
    drafter: str | None = Field(None, description="drafter model: a local folder or a hub id (methods without one need none)")
    device: str = Field("cpu", description="cpu, cuda, cuda:N, mps, or auto (cuda when there is a GPU)")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    compile: CompileMode = Field("off", description="torch.compile the target's forward (dynamic shapes): every "
                                 "caller, spectune's engine and HF's generate alike, runs the compiled one; each new "
                                 "input form (a chain, a tree mask, hidden layers) compiles once. 'default': about a "
                                 "minute a form on 2 CPU cores; 'max-autotune': inductor's tuned matrix products over "
                                 "frozen, prepacked weights (on CPUs its C++ kernels), minutes a form; true means "
                                 "'default', false 'off'")

    @model_validator(mode="before")
    @classmethod
    def from_forms(cls, data: Any) -> Any:
        if isinstance(data, (str, Path)):
            return _folder_form(_named_folder(str(data)), {})
        if not isinstance(data, Mapping):
            return data
        options = {key: value for key, value in data.items() if value is not None}
        if "preset" in options:
            preset, seed = str(options.pop("preset")), int(options.pop("seed", 0))
            return _folder_form(_preset_folder(preset, seed), options)
        folder = options.pop("dir", None) or options.pop("path", None)
        if folder is not None:  # a folder here, else a name (tiny, smollm2: `--pair smollm2`)
            local = Path(str(folder)).expanduser()
            return _folder_form(local if local.exists() else _named_folder(str(folder)), options)
        return options

    @field_validator("compile", mode="before")
    @classmethod
    def compile_from_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):  # the key's first form, `compile: true`
            return "default" if value else "off"
        return value

    @field_validator("target", "drafter")
    @classmethod
    def expand_home(cls, value: str | None) -> str | None:
        return str(Path(value).expanduser()) if value and value.startswith("~") else value

    @field_validator("device")
    @classmethod
    def known_device(cls, value: str) -> str:
        if not DEVICE_PATTERN.match(value):
            raise ValueError(f"device must be cpu, cuda, cuda:N, mps or auto, got {value!r}")
        return value

    @property
    def pair_id(self) -> str:
        """Names the pair in the store and routes trials to the workers holding it."""
        loaded = f"{self.target}|{self.drafter or '-'}|{self.device}|{self.dtype}"
        if self.compile == "off":
            return loaded
        suffix = "compiled" if self.compile == "default" else f"compiled-{self.compile}"
        return f"{loaded}|{suffix}"  # a compiled pair is another loaded object

    @property
    def name(self) -> str:
        """A short name: the pair folder (…/micro-seed0/target -> micro-seed0) or the target id."""
        target = Path(self.target)
        return target.parent.name if target.name == "target" and target.parent.name else self.target

    def absolute(self) -> PairRef:
        """Existing local folders as absolute paths (a replica or worker may run elsewhere); hub ids unchanged."""
        return self.model_copy(update={"target": _absolute(self.target),
                                       "drafter": _absolute(self.drafter) if self.drafter else None})

    def check_local(self) -> None:
        """Every local-looking model path must be a model folder here; hub ids ("org/name") are left to the hub."""
        for role, value in (("target", self.target), ("drafter", self.drafter)):
            if not value or not is_local(value) or (Path(value) / "config.json").is_file():
                continue
            built = BUILT_PAIR.search(value)
            hint = f" (build it with `spectune models build --preset {built[1]} --seed {built[2]}`)" if built else ""
            hint = hint or _imported_hint(value, role)
            if not Path(value).exists():
                raise PairError(f"pair.{role}: model path {value} does not exist{hint}")
            raise PairError(f"pair.{role}: {value} is not a model folder (no config.json){hint}")


def parse_pair(value: Any) -> PairRef:
    """Any form above as a PairRef; a bad one is a PairError in one line naming what is wrong."""
    try:
        return PairRef.model_validate(value)
    except ValidationError as err:
        problems = one_line(err)
        raise PairError(f"pair: {problems}") from None


def pair_from_options(folder: str | Path | None, target: str | None, drafter: str | None,
                      device: str = "cpu", dtype: str = "float32", compile: CompileMode | bool = "off") -> PairRef:
    """The CLI's --pair / --target / --drafter: --target and --drafter override the folder's; nothing = tiny."""
    options = {"drafter": drafter, "device": device, "dtype": dtype, "compile": compile}
    if target is None:
        return parse_pair({"dir": folder, **options} if folder is not None else {"preset": "tiny", **options})
    if drafter is None and folder is not None:
        options["drafter"] = str(Path(folder).expanduser() / "drafter")
    return parse_pair({"target": target, **options})


def is_local(path_or_id: str) -> bool:
    """A path on this machine rather than a hub id "org/name"."""
    return path_or_id.startswith(("/", ".", "~")) or path_or_id.count("/") > 1 or Path(path_or_id).exists()


def _folder_form(folder: Path, options: Mapping[str, Any]) -> dict[str, Any]:
    """A pair folder: its target/, and its drafter/ unless another drafter is named or the folder here has none."""
    target = str(folder / "target")
    given = options.get("target")
    if given is not None and str(given).rstrip("/") != target:
        raise ValueError("give either dir or target/drafter, not both")
    if folder.exists() and not (folder / "target").is_dir():
        raise ValueError(f"pair folder {folder} has no target/ (expected target/ and drafter/ from "
                         "`spectune models build`)")
    drafter = options.get("drafter")
    if drafter is None and not (folder.exists() and not (folder / "drafter").is_dir()):
        drafter = str(folder / "drafter")  # a folder not on this machine (a cluster path): assume both
    return {**options, "target": target, "drafter": drafter}


def _named_folder(value: str) -> Path:
    """A preset name (micro, tiny), an imported model's name (smollm2), or a folder path."""
    from spectune.models.imported import PACKAGED
    from spectune.models.presets import PRESETS

    if value in PRESETS:
        return _preset_folder(value, 0)
    return _imported_folder(value) if value in PACKAGED else Path(value).expanduser()


def _imported_folder(name: str) -> Path:
    from spectune.models.imported import imported_pair_dir

    folder = imported_pair_dir(name)
    if not (folder / "target").is_dir():
        raise ValueError(f"the {name} pair is not imported at {folder}: run `spectune models import {name}` "
                         f"(then `spectune models distill --pair {name}` for its drafter)")
    return folder


def _imported_hint(path: str, role: str) -> str:
    """What makes a missing part of an imported pair (…/pairs/smollm2/target or /drafter)."""
    from spectune.models.imported import PACKAGED

    name = Path(path).parent.name
    if Path(path).name != role or name not in PACKAGED:
        return ""
    if role == "target":
        return f" (import it with `spectune models import {name}`)"
    return f" (distil it with `spectune models distill --pair {name}`, 15-30 min on 2 cores)"


def _preset_folder(preset: str, seed: int) -> Path:
    from spectune.models.presets import default_pair_dir

    folder = default_pair_dir(preset, seed)
    if not (folder / "target").is_dir():
        raise ValueError(f"the {preset} pair is not built at {folder}: run `spectune models build --preset {preset}`"
                         + (f" --seed {seed}" if seed else ""))
    return folder


def _absolute(path_or_id: str) -> str:
    path = Path(path_or_id).expanduser()
    return str(path.resolve()) if path.exists() else path_or_id
