"""The peer: Hugging Face transformers' own assisted generation, on the same pair and prompts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from spectune.bench import Contender
from spectune.config import DecodeConfig
from spectune.engine.loop import Generation
from spectune.engine.sampling import Sampling
from spectune.pair import Pair


class HfGenerate:
    """`model.generate(...)` behind the bench's Runner interface."""

    def __init__(self, pair: Pair, **extra: Any) -> None:
        self.pair = pair
        self.extra = extra

    def generate(self, prompt: Sequence[int], max_new_tokens: int, sampling: Sampling, seed: int) -> Generation:
        ids = torch.tensor([list(prompt)], device=self.pair.target.device)  # [1, L]
        torch.manual_seed(seed)
        sampling_args = {"do_sample": False} if sampling.greedy else {
            "do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0,
        }
        with torch.inference_mode():
            out = self.pair.target.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                eos_token_id=self.pair.eos_token_id,
                pad_token_id=self.pair.tokenizer.pad_token_id or self.pair.eos_token_id,
                **sampling_args,
                **self.extra,
            )
        return Generation(tuple(prompt), out[0, len(prompt) :].tolist())


def hf_peers(pair: Pair, temperature: float = 0.0, prompt_lookup_tokens: int = 10) -> list[Contender]:
    """HF's AR generate, its assisted generation with our drafter, and its prompt lookup."""
    peers = [Contender(DecodeConfig("hf-ar", temperature=temperature), HfGenerate(pair))]
    if pair.drafter is not None:
        peers.append(Contender(DecodeConfig("hf-assisted", temperature=temperature),
                               HfGenerate(pair, assistant_model=pair.drafter)))
    lookup = {"prompt_lookup_num_tokens": prompt_lookup_tokens}
    peers.append(Contender(DecodeConfig("hf-pld", lookup, temperature, name=f"hf-pld(n={prompt_lookup_tokens})"),
                           HfGenerate(pair, **lookup)))
    return peers
