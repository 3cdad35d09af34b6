"""A causal LM plus the KV cache it owns: the only place that calls a model's forward."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from spectune.engine.kvcache import KVCache


class CausalLM:
    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model.eval()
        self.cache = KVCache(model.config)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def max_positions(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 1 << 30))

    def reset(self) -> None:
        self.cache = KVCache(self.model.config)

    @torch.inference_mode()
    def forward(
        self,
        tokens: Sequence[int],
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Append `tokens` to the cache; return their logits [n, V] (or [1, V] with last_only)."""
        ids = torch.tensor([list(tokens)], device=self.device)  # [1, n]
        if positions is None:
            positions = torch.arange(len(self.cache), len(self.cache) + len(tokens)).unsqueeze(0)  # [1, n]
        out = self.model(
            input_ids=ids,
            position_ids=positions.to(self.device),
            attention_mask=None if mask is None else mask.to(self.device, self.dtype),
            cache=self.cache.hf,
            use_cache=True,
            logits_to_keep=1 if last_only else 0,
        )
        self.cache.appended(tokens)
        return out.logits[0].float()  # [n, V]

    def extend_to(self, sequence: Sequence[int]) -> torch.Tensor:
        """Make the cache hold exactly `sequence`, reusing its longest matching prefix; [V] logits after it."""
        if not sequence:
            raise ValueError("cannot extend to an empty sequence")
        keep = min(self.cache.common_prefix(sequence), len(sequence) - 1)  # always feed >= 1 token for logits
        self.cache.truncate(keep)
        return self.forward(sequence[keep:], last_only=True)[-1]  # [V]
