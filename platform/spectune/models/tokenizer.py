"""The byte-level BPE tokenizer both models of a pair share, and the token streams.

One tokenizer for target and drafter: speculative decoding compares their token ids
directly, so the two vocabularies must be the same object, not merely similar.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from .corpus import Corpus
from .presets import Preset

EOS_TOKEN = "<|endoftext|>"  # also the bos token (GPT-2 convention); id 0
PAD_TOKEN = "<|pad|>"  # never in the training data; id 1
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN)
EOS_ID, PAD_ID = 0, 1


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE ``tokenizers.Tokenizer`` (ids 0/1 = ``<|endoftext|>``/``<|pad|>``).

    Byte-level: every string, any Unicode included, encodes and decodes back exactly.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    assert tok.token_to_id(EOS_TOKEN) == EOS_ID and tok.token_to_id(PAD_TOKEN) == PAD_ID
    return tok


def wrap_tokenizer(tok, model_max_length: int = 1024):
    """The ``transformers`` fast tokenizer saved with the models."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=model_max_length,
        padding_side="left",  # decoder-only generation pads on the left
        clean_up_tokenization_spaces=False,  # keep decode(encode(s)) == s
    )


def encode_stream(tok, texts: Sequence[str]) -> torch.Tensor:
    """One token stream: each document preceded by ``<|endoftext|>``, plus a final one."""
    ids: list[int] = []
    for enc in tok.encode_batch(list(texts)):
        ids.append(EOS_ID)
        ids.extend(enc.ids)
    ids.append(EOS_ID)
    return torch.tensor(ids, dtype=torch.long)


@dataclass(frozen=True)
class Tokenized:
    """The corpus as token streams, tokenized once and shared by both models."""

    tokenizer: object  # the transformers fast tokenizer, saved with each model
    train: torch.Tensor
    heldout: torch.Tensor
    vocab_size: int
    seconds: float


def tokenize_corpus(corpus: Corpus, preset: Preset) -> Tokenized:
    """Train the preset's tokenizer on the training files and encode both splits.

    A vocabulary smaller than the preset's (a corpus too small for all the merges) is an
    error: the models' embedding sizes come from the preset.
    """
    t0 = time.perf_counter()
    tok = train_tokenizer((f.text for f in corpus.train), preset.vocab_size)
    train_stream = encode_stream(tok, [f.text for f in corpus.train])
    held_stream = encode_stream(tok, [f.text for f in corpus.heldout])
    seconds = time.perf_counter() - t0
    vocab_size = tok.get_vocab_size()
    if vocab_size != preset.vocab_size:
        raise RuntimeError(f"tokenizer has {vocab_size} tokens, preset {preset.name} expects {preset.vocab_size}")
    return Tokenized(wrap_tokenizer(tok, preset.max_position_embeddings), train_stream, held_stream, vocab_size, seconds)
