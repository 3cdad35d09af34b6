"""One class owns a model's KV cache: its length, the tokens it holds, rollback and tree compaction.

Nothing else in spectune touches transformers' cache internals.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache, PretrainedConfig


class KVCache:
    """A transformers `DynamicCache` plus the token ids whose keys/values it holds, in slot order."""

    def __init__(self, config: PretrainedConfig) -> None:
        self._cache = DynamicCache(config=config)
        self._tokens: list[int] = []

    @property
    def hf(self) -> DynamicCache:
        """The object to pass as `cache=` to a transformers forward call."""
        return self._cache

    @property
    def tokens(self) -> tuple[int, ...]:
        return tuple(self._tokens)

    def __len__(self) -> int:
        return len(self._tokens)

    def appended(self, token_ids: Sequence[int]) -> None:
        """Record the tokens a forward call just appended (the cache itself grew inside the model)."""
        self._tokens.extend(token_ids)
        assert self._cache.get_seq_length() == len(self._tokens), "cache and token record out of step"

    def truncate(self, length: int) -> None:
        """Drop every slot from `length` on."""
        if not 0 <= length <= len(self):
            raise ValueError(f"cannot truncate a cache of {len(self)} slots to {length}")
        removed = len(self) - length
        if removed:
            self._cache.crop(-removed)  # transformers 5: a negative count removes that many slots
            del self._tokens[length:]

    @torch.inference_mode()  # the cached tensors are inference tensors: in-place writes need the mode
    def keep(self, start: int, slots: Sequence[int]) -> None:
        """Keep slots `start + s` for s in `slots` (ascending), packed to `start, start+1, ...`; drop the rest.

        This is tree compaction: after verifying a tree, only the accepted path stays.
        """
        slots = list(slots)
        if slots == list(range(len(slots))):
            self.truncate(start + len(slots))  # a prefix: plain rollback, no copy
            return
        if any(b <= a for a, b in zip(slots, slots[1:])) or start + slots[-1] >= len(self):
            raise ValueError(f"slots {slots} must ascend and lie inside the cache ({len(self)} slots)")
        index = torch.tensor(slots) + start  # [k]
        for layer in self._cache.layers:
            index = index.to(layer.keys.device)
            # keys/values: [B, H, S, D]; gather first so the write never reads an overwritten slot
            layer.keys[..., start : start + len(slots), :] = layer.keys[..., index, :]
            layer.values[..., start : start + len(slots), :] = layer.values[..., index, :]
        kept = [self._tokens[start + s] for s in slots]
        self._tokens[start : start + len(slots)] = kept
        self.truncate(start + len(slots))

    def common_prefix(self, sequence: Sequence[int]) -> int:
        """Length of the longest prefix shared by the cached tokens and `sequence`."""
        n = 0
        for cached, wanted in zip(self._tokens, sequence):
            if cached != wanted:
                break
            n += 1
        return n
