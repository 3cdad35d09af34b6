"""The pair folder: checking it is writable, the build lock, the cache check, and
saving the models so that a reader never sees a half-written pair.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from .card import BUILDER_VERSION, read_card
from .presets import ModelSpec, Preset, preset_spec

ROLES = ("target", "drafter")


def prepare_out(out: Path) -> Path:
    """Create ``out`` and check it is writable, with a message that says what to do."""
    out = Path(out).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise type(exc)(
            exc.errno,
            f"cannot write the model pair to {out}: {exc.strerror or exc}. "
            "Pass another output directory or set SPECTUNE_CACHE to a writable folder",
        ) from exc
    return out


@contextlib.contextmanager
def build_lock(out: Path):
    """An exclusive lock on ``out/.build.lock`` so concurrent builders (pytest-xdist
    workers, two shells) do not write the same pair at once; the second one then finds
    the first one's result in the cache."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        yield
        return
    with open(out / ".build.lock", "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def is_cached(out: Path, preset: Preset, seed: int, target: ModelSpec, drafter: ModelSpec) -> bool:
    """Whether ``out`` holds a complete pair of this build: a card of the same builder
    version, preset (its whole spec), seed and step counts, and both models load."""
    card = read_card(out)
    return bool(card) and _card_matches(card, preset, seed, target, drafter) and _models_load(out, card)


def _card_matches(card: dict, preset: Preset, seed: int, target: ModelSpec, drafter: ModelSpec) -> bool:
    try:
        return not (
            card.get("builder_version") != BUILDER_VERSION
            or card.get("preset") != preset.name
            or card.get("seed") != seed
            or card["target"]["train_steps"] != target.steps
            or card["drafter"]["train_steps"] != drafter.steps
            or card.get("preset_spec") != preset_spec(preset)
        )
    except (KeyError, TypeError):
        return False


def _models_load(out: Path, card: dict) -> bool:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # from_pretrained shows a "Loading weights" bar
    try:
        for role in ROLES:
            path = Path(out) / role
            if AutoConfig.from_pretrained(path).vocab_size != card["vocab_size"]:
                return False
            AutoModelForCausalLM.from_pretrained(path)
            AutoTokenizer.from_pretrained(path)
    except Exception:
        return False
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return True


def save_pair(out: Path, models: dict, tokenizer, progress: bool) -> None:
    """Save each model (``{role: model}``) with the tokenizer: into hidden folders first,
    then swap them in (a reader of the old pair never sees a half-written model directory)."""
    for role, model in models.items():
        _save(model, tokenizer, out / f".{role}.new", progress)
    for role in models:
        _swap_in(out / f".{role}.new", out / role)


def _save(model, tokenizer, path: Path, progress: bool) -> None:
    from transformers.utils import logging as hf_logging

    if path.exists():
        shutil.rmtree(path)
    quiet = not progress and hf_logging.is_progress_bar_enabled()
    if quiet:  # transformers 5 shows a "Writing model shards" bar of its own
        hf_logging.disable_progress_bar()
    try:
        # transformers 5 always writes safetensors (its `safe_serialization` argument is gone).
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    finally:
        if quiet:
            hf_logging.enable_progress_bar()


def _swap_in(new: Path, dest: Path) -> None:
    old = dest.with_name(f".{dest.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if dest.exists():
        os.rename(dest, old)
    os.rename(new, dest)
    if old.exists():
        shutil.rmtree(old)
