"""``card.json``: what a pair is (preset, seed, sizes, held-out losses, corpus, timings).

The card is written last and atomically, so a pair folder with a card is complete; the
cache check (:mod:`.cache`) compares a card with the build that is asked for.
"""

from __future__ import annotations

import json
import math
import os
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .evaluate import EVAL_SEED
from .presets import ModelSpec, Preset, preset_spec
from .tokenizer import EOS_ID, EOS_TOKEN, PAD_ID, PAD_TOKEN

if TYPE_CHECKING:
    from .corpus import Corpus
    from .tokenizer import Tokenized
    from .training import TrainedModel

#: Bumped whenever a change to the builder (this package) changes what a build produces;
#: cached pairs whose card has another version are rebuilt.
BUILDER_VERSION = 2


def read_card(out: Path) -> dict | None:
    try:
        return json.loads((Path(out) / "card.json").read_text())
    except (OSError, ValueError):
        return None


def write_card(out: Path, card: dict) -> None:
    """Write ``out/card.json`` through a temporary file: it appears complete or not at all."""
    tmp = out / "card.json.tmp"
    tmp.write_text(json.dumps(card, indent=2) + "\n")
    os.replace(tmp, out / "card.json")


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _model_card_entry(spec: ModelSpec, model, stats: dict) -> dict:
    return {
        "architecture": model.config.model_type,  # llama; bamba for a hybrid target
        "n_layers": spec.n_layers,
        "hidden_size": spec.hidden_size,
        "n_heads": spec.n_heads,
        "intermediate_size": spec.intermediate_size,
        "n_params": count_params(model),
        "train_steps": spec.steps,
        "batch": spec.batch,
        "seq_len": spec.seq_len,
        "lr": spec.lr,
        "train_tokens": spec.steps * spec.batch * spec.seq_len,
        **stats,
    }


def _eval_entry(p: Preset, vocab_size: int) -> dict:
    return {
        "n_windows": p.eval_windows,
        "seq_len": p.eval_seq_len,
        "window_seed": EVAL_SEED,
        "uniform_loss": round(math.log(vocab_size), 5),
        "note": "mean next-token CE (nats/token) on held-out stdlib files; "
                "target per layer: exit after layer i+1 through the final norm and lm_head",
    }


def _tokenizer_entry(corpus: Corpus, tokens: Tokenized) -> dict:
    n_tok_train = int(tokens.train.numel())
    n_tok_held = int(tokens.heldout.numel())
    return {
        "type": "byte-level BPE (tokenizers)",
        "train_tokens": n_tok_train,
        "heldout_tokens": n_tok_held,
        "bytes_per_token_train": round(corpus.train_bytes / n_tok_train, 4),
        "bytes_per_token_heldout": round(corpus.heldout_bytes / n_tok_held, 4),
        "seconds": round(tokens.seconds, 2),
    }


def _environment() -> dict:
    import tokenizers
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }


def make_card(p: Preset, seed: int, steps: int | None, corpus: Corpus, tokens: Tokenized,
              target: TrainedModel, drafter: TrainedModel, total_seconds: float) -> dict:
    """The card of a finished build (``steps``: the step override, ``None`` if none)."""
    return {
        "builder_version": BUILDER_VERSION,
        "preset": p.name,
        "description": p.description,
        "seed": seed,
        "steps_override": None if steps is None else int(steps),
        "vocab_size": tokens.vocab_size,
        "max_position_embeddings": p.max_position_embeddings,
        "special_tokens": {"eos": EOS_TOKEN, "bos": EOS_TOKEN, "pad": PAD_TOKEN,
                           "eos_id": EOS_ID, "bos_id": EOS_ID, "pad_id": PAD_ID},
        "target": {
            **_model_card_entry(target.spec, target.model, target.stats),
            "heldout_loss_per_layer": [round(x, 5) for x in target.heldout],
            "heldout_loss": round(target.heldout[-1], 5),
        },
        "drafter": {
            **_model_card_entry(drafter.spec, drafter.model, drafter.stats),
            "heldout_loss": round(drafter.heldout[0], 5),
        },
        "eval": _eval_entry(p, tokens.vocab_size),
        "tokenizer": _tokenizer_entry(corpus, tokens),
        "corpus": corpus.describe(),
        "total_seconds": round(total_seconds, 2),
        "environment": _environment(),
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "preset_spec": preset_spec(p),
    }
