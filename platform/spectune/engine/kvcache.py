"""One class owns a model's cache: its length, the tokens it holds, rollback and tree compaction.

For a hybrid target (Mamba-2 and attention layers) the same class owns both kinds of layer state:
the attention layers' keys/values, cropped and compacted by slot, and the SSM layers' conv and
recurrent states, which cannot be cropped. Those are rolled back through transformers' own past
recording: every forward records, per SSM layer, the recurrent state before it (the snapshot of
the committed prefix) and after each of its tokens (the scan runs them one by one), and keeps
the conv input of all of them; rolling back r tokens restores the state after the (n-r)-th, so a
rejected draft costs no recompute of the prefix and an accepted prefix costs no re-run. The
record is dropped at every commit (`truncate`, `keep`): a rollback reaches back only to the last
one, which is all the loop needs (it commits after every verification).

Nothing else in spectune touches transformers' cache internals.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache, PretrainedConfig
from transformers.cache_utils import LinearAttentionCacheLayerMixin

RECORD_EVERY_TOKEN = 1 << 30  # per-token states the SSM scan records per forward: all of them (it takes the min)


class KVCache:
    """A transformers `DynamicCache` plus the token ids whose keys/values (and SSM states) it holds, in slot order."""

    def __init__(self, config: PretrainedConfig) -> None:
        self._cache = DynamicCache(config=config)
        self._tokens: list[int] = []
        self._ssm_layers = tuple(
            layer for layer in self._cache.layers if isinstance(layer, LinearAttentionCacheLayerMixin)
        )
        for layer in self._ssm_layers:
            layer.activate_past_recording(recurrent_states_to_keep=RECORD_EVERY_TOKEN)
        self._since_commit = 0  # tokens appended since the last commit: how far the SSM states can roll back

    @property
    def hybrid(self) -> bool:
        """Whether some layers keep an SSM state (rolled back by recorded states, not cropped)."""
        return bool(self._ssm_layers)

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
        self._since_commit += len(token_ids)
        assert self._cache.get_seq_length() == len(self._tokens), "cache and token record out of step"

    def truncate(self, length: int) -> None:
        """Drop every slot from `length` on (a hybrid: no further back than its last commit)."""
        if not 0 <= length <= len(self):
            raise ValueError(f"cannot truncate a cache of {len(self)} slots to {length}")
        removed = len(self) - length
        if self.hybrid:
            self._roll_back_ssm(removed)
        if removed:
            for layer in self._cache.layers:
                if not isinstance(layer, LinearAttentionCacheLayerMixin):
                    layer.crop(-removed)  # transformers 5: a negative count removes that many slots
            del self._tokens[length:]

    def _roll_back_ssm(self, removed: int) -> None:
        """Restore each SSM layer's state after all but the last `removed` tokens, and commit there."""
        if removed > self._since_commit:
            raise ValueError(
                f"cannot roll this hybrid's SSM state back {removed} tokens: it records only the "
                f"{self._since_commit} appended since the last commit"
            )
        if self._since_commit:  # nothing appended since the last commit: nothing recorded, nothing to drop
            for layer in self._ssm_layers:
                layer.crop(-removed)  # restores the recorded state (`removed` = 0: the newest) and drops the record
        self._since_commit = 0

    @torch.inference_mode()  # the cached tensors are inference tensors: in-place writes need the mode
    def keep(self, start: int, slots: Sequence[int]) -> None:
        """Keep slots `start + s` for s in `slots` (ascending), packed to `start, start+1, ...`; drop the rest.

        This is tree compaction: after verifying a tree, only the accepted path stays.
        """
        slots = list(slots)
        if slots == list(range(len(slots))):
            self.truncate(start + len(slots))  # a prefix: plain rollback, no copy
            return
        if self.hybrid:
            raise ValueError(
                f"cannot keep tree slots {slots} of a hybrid target's cache: its SSM layers hold one state per "
                "sequence, not per tree node"
            )
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
