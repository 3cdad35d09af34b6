"""Loading a target/drafter pair through the real path: `from_pretrained(path_or_hub_id)`.

The same call takes the project's own small pairs here and a hub pair on a GPU cluster.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from spectune.engine.runner import CausalLM
from spectune.methods.base import Models


class PairError(ValueError):
    """A model pair that cannot be used, with the reason in words."""


@dataclass(frozen=True)
class Pair:
    target_id: str
    drafter_id: str | None
    tokenizer: PreTrainedTokenizerBase
    target: PreTrainedModel
    drafter: PreTrainedModel | None

    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    @property
    def max_positions(self) -> int:
        return int(self.target.config.max_position_embeddings)

    def runners(self) -> Models:
        """Fresh cache owners over the loaded weights (cheap: weights are shared)."""
        return Models(CausalLM(self.target), CausalLM(self.drafter) if self.drafter is not None else None)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)


def load_pair(target: str, drafter: str | None = None, device: str = "cpu", dtype: str = "float32") -> Pair:
    torch_dtype = _dtype(dtype)
    tokenizer = _load_tokenizer(target)
    target_model = _load_model(target, device, torch_dtype)
    drafter_model = None
    if drafter:
        check_same_vocabulary(target, tokenizer, drafter, _load_tokenizer(drafter))
        drafter_model = _load_model(drafter, device, torch_dtype)
        if drafter_model.config.vocab_size != target_model.config.vocab_size:
            raise PairError(
                f"drafter {drafter} has {drafter_model.config.vocab_size} output logits but target {target} "
                f"has {target_model.config.vocab_size}: speculative decoding needs one vocabulary"
            )
    return Pair(target, drafter, tokenizer, target_model, drafter_model)


def check_same_vocabulary(
    target: str, target_tok: PreTrainedTokenizerBase, drafter: str, drafter_tok: PreTrainedTokenizerBase
) -> None:
    target_vocab, drafter_vocab = target_tok.get_vocab(), drafter_tok.get_vocab()
    if target_vocab != drafter_vocab:
        differing = len(set(target_vocab.items()) ^ set(drafter_vocab.items()))
        raise PairError(
            f"drafter {drafter} uses a different tokenizer than target {target} "
            f"({len(drafter_vocab)} vs {len(target_vocab)} tokens, {differing} entries differ): "
            "speculative decoding needs one vocabulary"
        )


def _dtype(name: str) -> torch.dtype:
    allowed = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in allowed:
        raise PairError(f"dtype must be one of {', '.join(allowed)}, got {name!r}")
    return allowed[name]


def _check_exists(path_or_id: str) -> None:
    """A local-looking path that is missing gets a clear error instead of a hub lookup."""
    path = Path(path_or_id).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise PairError(f"model folder {path} has no config.json (build one with `spectune models build`)")
        return
    if path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") > 1:  # not a hub id "org/name"
        raise PairError(f"model path {path_or_id} does not exist (build one with `spectune models build`)")


def _load_tokenizer(path_or_id: str) -> PreTrainedTokenizerBase:
    _check_exists(path_or_id)
    try:
        return AutoTokenizer.from_pretrained(path_or_id)
    except OSError as err:
        raise PairError(f"cannot load the tokenizer of {path_or_id}: {err}") from None


def _load_model(path_or_id: str, device: str, dtype: torch.dtype) -> PreTrainedModel:
    try:
        model = AutoModelForCausalLM.from_pretrained(path_or_id, dtype=dtype, use_safetensors=True)
    except OSError as err:
        raise PairError(f"cannot load model {path_or_id}: {err}") from None
    return model.to(device).eval()
