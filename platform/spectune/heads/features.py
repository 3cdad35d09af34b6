"""One teacher-forced pass of the target over the corpus: what every kind of head learns from, cached.

For windows of a text tokenized by the pair's own tokenizer, the pass keeps, in bf16 on disk:

    tokens  [N, T]        int32    the window
    last    [N, T, d]     bf16     the final norm's output at every token (what Medusa/Hydra/EAGLE read)
    fused   [N, T, 3, d]  bf16     a low, a middle and a high block output (EAGLE-3), when L >= 4
    top_ids / top_logits [N, T, k] the target's k best next tokens and their logits (the heads' targets)

The text (`FeatureSpec.text`): `stdlib`, the standard-library corpus (`spectune.models.corpus`, on
every machine); `chat`, the target's own answers to chat requests (`spectune.heads.chat_text`:
self-distillation, what the heads will be asked); `mixed`, both for training, judged on chat.

A train and a held-out split (the corpus's own file split), in one safetensors file each, beside the
pair under `heads/features/<digest>/`; the digest covers everything the pass depends on, so a
changed setting (or another target) makes a new cache. Written to a temporary name and renamed, so a
reader never sees half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from spectune.heads.chat_text import ChatText, answer_windows, chat_answers
from spectune.models.corpus import Corpus, load_corpus
from spectune.models.seeding import derive_seed

FEATURES_VERSION = 1


def fused_layers(n_layers: int) -> tuple[int, ...]:
    """EAGLE-3's low, middle and high layer: vLLM's default (2, L//2, L-3) where that gives three distinct
    layers below the last (L >= 8), else (1, L//2, L-1); () when the target has fewer than 4 layers."""
    if n_layers >= 8:
        return (2, n_layers // 2, n_layers - 3)
    if n_layers >= 4:
        return (1, n_layers // 2, n_layers - 1)
    return ()


@dataclass(frozen=True)
class FeatureSpec:
    """What the pass depends on besides the target (whose fingerprint joins the digest)."""

    seq_len: int = 256
    train_windows: int = 512
    heldout_windows: int = 32
    topk: int = 16
    max_train_bytes: int = 12_000_000
    max_heldout_bytes: int = 1_000_000
    seed: int = 0
    batch: int = 4
    text: Literal["stdlib", "chat", "mixed"] = "stdlib"
    chat: ChatText = field(default_factory=ChatText)  # how the chat answers are made (text chat / mixed)

    def described(self) -> dict:
        """As a dict; a stdlib pass without the text keys, as it was before chat text existed (so heads and
        feature caches made then stay valid)."""
        keyed = asdict(self)
        if self.text == "stdlib":
            keyed.pop("text"), keyed.pop("chat")
        return keyed

    def digest(self, target_print: str, dtype: str) -> str:
        keyed = {**self.described(), "batch": None, "target": target_print, "dtype": dtype, "version": FEATURES_VERSION}
        return hashlib.sha1(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Features:
    """One split, memory-mapped from its file (tensors are read on demand, rows at a time)."""

    path: Path
    last_layer: int
    fused: tuple[int, ...]

    def tensor(self, name: str) -> torch.Tensor:
        with safe_open(self.path, framework="pt") as f:
            return f.get_tensor(name)

    def load(self) -> dict[str, torch.Tensor]:
        with safe_open(self.path, framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}


def window_streams(corpus: Corpus, tokenizer, seq_len: int, eos: int | None) -> dict[str, torch.Tensor]:
    """Each split as one token stream (files joined by eos) cut into [n, seq_len] windows."""
    out = {}
    for split, files in (("train", corpus.train), ("heldout", corpus.heldout)):
        ids: list[int] = []
        for encoded in tokenizer([f.text for f in files], add_special_tokens=False)["input_ids"]:
            ids.extend(encoded)
            if eos is not None:
                ids.append(eos)
        n = len(ids) // seq_len
        out[split] = torch.tensor(ids[: n * seq_len], dtype=torch.int32).view(n, seq_len)  # [n, T]
    return out


def pick_windows(windows: torch.Tensor, count: int, seed: int, split: str) -> torch.Tensor:
    """`count` windows drawn without replacement by a seeded permutation (spread over the whole library)."""
    if windows.shape[0] < count:
        raise ValueError(f"the {split} corpus gives {windows.shape[0]} windows; {count} were asked for")
    order = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(derive_seed(seed, f"heads:{split}")))
    return windows[order[:count].sort().values]


@torch.inference_mode()
def feature_pass(model, windows: torch.Tensor, spec: FeatureSpec, fused: tuple[int, ...], desc: str,
                 progress: bool) -> dict[str, torch.Tensor]:
    """The target over [N, T] windows, `spec.batch` at a time: final features, fused layers, top-k logits."""
    from tqdm.auto import tqdm

    n_layers = model.config.num_hidden_layers
    parts: dict[str, list[torch.Tensor]] = {"last": [], "fused": [], "top_ids": [], "top_logits": []}
    device = model.device
    for batch in tqdm(windows.split(spec.batch), desc=desc, disable=not progress, dynamic_ncols=True):
        out = model.model(input_ids=batch.long().to(device), use_cache=False, output_hidden_states=[*fused, n_layers])
        last = out.last_hidden_state  # [b, T, d] the final norm's output
        logits = model.lm_head(last).float()  # [b, T, V]
        top = logits.topk(spec.topk, dim=-1)  # [b, T, k]
        parts["last"].append(last.to("cpu", torch.bfloat16))
        parts["top_ids"].append(top.indices.to("cpu", torch.int32))
        parts["top_logits"].append(top.values.to("cpu", torch.bfloat16))
        if fused:
            parts["fused"].append(torch.stack([out.hidden_states[l] for l in fused], dim=2).to("cpu", torch.bfloat16))
    tensors = {name: torch.cat(chunks) for name, chunks in parts.items() if chunks}
    tensors["tokens"] = windows.contiguous()
    return tensors


def cached_features(folder: Path, model, tokenizer, spec: FeatureSpec, target_print: str,
                    progress: bool = True) -> tuple[Features, Features, Corpus]:
    """The train and held-out features of `model` (cached in `folder/<digest>/`), and the corpus they came from."""
    dtype = str(model.dtype).removeprefix("torch.")
    out = Path(folder) / spec.digest(target_print, dtype)
    fused = fused_layers(model.config.num_hidden_layers)
    last = model.config.num_hidden_layers
    corpus = load_corpus(spec.max_train_bytes, spec.max_heldout_bytes)
    splits = {"train": spec.train_windows, "heldout": spec.heldout_windows}
    if not all((out / f"{split}.safetensors").is_file() for split in splits):
        out.mkdir(parents=True, exist_ok=True)
        for split, chosen in text_windows(Path(folder), model, tokenizer, spec, corpus, target_print, progress).items():
            tensors = feature_pass(model, chosen, spec, fused, f"features {split}", progress)
            tmp = out / f".{split}.safetensors.tmp"
            save_file(tensors, str(tmp), metadata={"fused": json.dumps(fused), "last": str(last), "text": spec.text})
            os.replace(tmp, out / f"{split}.safetensors")
    return Features(out / "train.safetensors", last, fused), Features(out / "heldout.safetensors", last, fused), corpus


def text_windows(folder: Path, model, tokenizer, spec: FeatureSpec, corpus: Corpus, target_print: str,
                 progress: bool) -> dict[str, torch.Tensor]:
    """The [n, T] windows of each split the feature pass runs over, from `spec.text`."""
    eos = tokenizer.eos_token_id
    stdlib: dict[str, torch.Tensor] = {}
    if spec.text != "chat":
        streams = window_streams(corpus, tokenizer, spec.seq_len, eos)
        stdlib = {split: pick_windows(streams[split], count, spec.seed, split)
                  for split, count in (("train", spec.train_windows), ("heldout", spec.heldout_windows))}
    if spec.text == "stdlib":
        return stdlib
    answers = chat_answers(folder, model, tokenizer, spec.chat, corpus, spec.seed, target_print, progress)
    chat = {split: answer_windows(answers[split], spec.seq_len, eos) for split in answers}
    heldout = chat["heldout"][: spec.heldout_windows]
    if heldout.shape[0] == 0:
        raise ValueError(f"the held-out chat answers fill no window of {spec.seq_len} tokens: raise chat.heldout")
    train = chat["train"] if spec.text == "chat" else torch.cat([stdlib["train"], chat["train"]])
    return {"train": train, "heldout": heldout}  # chat windows: every answer once, in order
