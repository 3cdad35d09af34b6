"""One class owns a model's cache: its length, the tokens it holds, rollback and tree compaction.

For a hybrid target (Mamba-2 and attention layers) the same class owns both kinds of layer state:
the attention layers' keys/values, cropped and compacted by slot, and the SSM layers' conv and
recurrent states, which cannot be cropped. Those are rolled back through transformers' own past
recording: every forward records, per SSM layer, the recurrent state before it (the snapshot of
the committed prefix) and after each of its tokens (the scan runs them one by one), and keeps
the conv input of all of them; rolling back r tokens restores the state after the (n-r)-th, so a
rejected draft costs no recompute of the prefix and an accepted prefix costs no re-run. The
record is dropped at every commit (`truncate`, `keep`): a rollback reaches back only to the last
one, which is all the loop needs (it commits after every verification). A prefill (`recording`
off: the runner's last-token-only forwards) records only its end state, through the faster
chunked scan, and cannot be rolled back into.

Nothing else in spectune touches transformers' cache internals.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache, PretrainedConfig
from transformers.cache_utils import LinearAttentionCacheLayerMixin

from spectune.engine.ssm_tree import CommittedState, NodeStates

RECORD_EVERY_TOKEN = 1 << 30  # per-token states the SSM scan records per forward: all of them (it takes the min)


class KVCache:
    """A transformers `DynamicCache` plus the token ids whose keys/values (and SSM states) it holds, in slot order."""

    def __init__(self, config: PretrainedConfig) -> None:
        self._cache = DynamicCache(config=config)
        self._tokens: list[int] = []
        self._ssm = {
            index: layer for index, layer in enumerate(self._cache.layers)
            if isinstance(layer, LinearAttentionCacheLayerMixin)
        }
        self._ssm_layers = tuple(self._ssm.values())
        for layer in self._ssm_layers:
            layer.activate_past_recording(recurrent_states_to_keep=RECORD_EVERY_TOKEN)
        self._since_commit = 0  # tokens appended since the last commit
        self._reach = 0  # of those, the trailing ones whose SSM states were recorded: how far a rollback reaches
        self._record_next = True  # whether the coming forward records the state after each of its tokens
        self._tree_nodes: dict[int, NodeStates] = {}  # a verified tree's per-node SSM states, until its commit
        self._tree_start = 0  # the slot of that tree's root
        self._stash: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}  # node -> layer -> its state

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

    def recording(self, every_token: bool) -> None:
        """Before a forward: whether its SSM layers record the state after each of its tokens (a verification,
        which a commit may roll back into: they scan its tokens one by one) or only after the last (a prefill:
        the chunked scan, ~4x faster over 128 tokens on the hybrid-tiny target here, but no rollback into it)."""
        self._record_next = every_token
        for layer in self._ssm_layers:
            layer.recurrent_states_to_keep = RECORD_EVERY_TOKEN if every_token else 0

    @property
    def ssm_layers(self) -> int:
        return len(self._ssm)

    def committed_ssm(self) -> dict[int, CommittedState]:
        """Each SSM layer's state at the committed prefix (what a tree's root follows); {} before any token."""
        committed = {}
        for index, layer in self._ssm.items():
            if not layer.has_previous_state[0]:
                continue
            kernel = layer.conv_kernel_size[0]
            window = layer.conv_states[0][0, :, -kernel:]  # [C, <=K] the record may hold more; short prompts less
            window = torch.nn.functional.pad(window, (kernel - window.shape[-1], 0))  # [C, K]
            committed[index] = CommittedState(window, layer.recurrent_states[0][0])  # state [H, P, N]
        return committed

    def appended(self, token_ids: Sequence[int], tree_nodes: dict[int, NodeStates] | None = None) -> None:
        """Record the tokens a forward call just appended (the cache itself grew inside the model).

        `tree_nodes`: the forward verified a tree, its SSM layers computed every node's state (STree) and
        left their own state untouched; the commit (`keep`) takes the accepted node's.
        """
        self._tokens.extend(token_ids)
        self._since_commit += len(token_ids)
        self._reach = self._reach + len(token_ids) if self._record_next else 0
        if tree_nodes is not None:
            self._tree_nodes = dict(tree_nodes)
            self._tree_start = len(self._tokens) - len(token_ids)
            for layer in self._ssm_layers:
                layer.cumulative_length_linear.add_(len(token_ids))
        assert self._cache.get_seq_length() == len(self._tokens), "cache and token record out of step"

    def truncate(self, length: int) -> None:
        """Drop every slot from `length` on (a hybrid: no further back than its last commit)."""
        if not 0 <= length <= len(self):
            raise ValueError(f"cannot truncate a cache of {len(self)} slots to {length}")
        if self._tree_nodes:
            self._keep_tree_node(length - 1, length)
        elif self.hybrid:
            self._roll_back_ssm(len(self) - length)
        self._crop_attention(length)

    def _crop_attention(self, length: int) -> None:
        removed = len(self) - length
        if removed:
            for layer in self._cache.layers:
                if not isinstance(layer, LinearAttentionCacheLayerMixin):
                    layer.crop(-removed)  # transformers 5: a negative count removes that many slots
            del self._tokens[length:]

    @torch.inference_mode()
    def stash_branch(self, nodes: Sequence[int], start: int) -> None:
        """After a chain forward of one tree branch (`nodes`, root first) from slot `start` (the naive
        branch-by-branch verification): set each node's keys/values and SSM state aside, roll back to `start`."""
        count = len(nodes)
        for index, layer in enumerate(self._cache.layers):
            if index in self._ssm:
                kernel = layer.conv_kernel_size[0]
                inputs = torch.nn.functional.pad(layer.conv_states[0][0], (kernel, 0))  # [C, K + recorded]
                after = layer.recurrent_states_history[0][1:] + [layer.recurrent_states[0]]  # state after each token
                total = inputs.shape[-1]
                for k, node in enumerate(nodes):
                    end = total - (count - 1 - k)
                    self._stash.setdefault(node, {})[index] = (inputs[:, end - kernel : end], after[k - count][0])
            else:
                for k, node in enumerate(nodes):
                    slot = start + k
                    kv = (layer.keys[..., slot : slot + 1, :], layer.values[..., slot : slot + 1, :])  # [B, H, 1, D]
                    self._stash.setdefault(node, {})[index] = kv
        self.truncate(start)

    @torch.inference_mode()
    def place_tree(self, tokens: Sequence[int]) -> None:
        """After every branch is stashed: append the tree's nodes as one tree forward would have (attention
        keys/values in node order; the SSM layers' per-node states, for the commit to pick from)."""
        nodes = [self._stash[node] for node in range(len(tokens))]
        tree_nodes = {}
        for index, layer in enumerate(self._cache.layers):
            if index in self._ssm:
                windows = torch.stack([node[index][0] for node in nodes])  # [n, C, K]
                tree_nodes[index] = NodeStates(windows, torch.stack([node[index][1] for node in nodes]))  # [n, H, P, N]
            else:
                layer.keys = torch.cat([layer.keys] + [node[index][0] for node in nodes], dim=-2)  # [B, H, S+n, D]
                layer.values = torch.cat([layer.values] + [node[index][1] for node in nodes], dim=-2)
        self._stash = {}
        self.appended(tokens, tree_nodes)

    @torch.inference_mode()  # the SSM states are inference tensors
    def _keep_tree_node(self, slot: int, length: int) -> None:
        """The SSM layers take the state after the tree node in `slot` (the slot before the tree: the
        committed state they still hold) and commit there, `length` tokens long; the tree's record goes."""
        node = slot - self._tree_start
        if node < -1:
            raise ValueError(f"cannot roll this hybrid's SSM state back before the verified tree (slot {self._tree_start})")
        for index, layer in self._ssm.items():
            if node >= 0:
                nodes = self._tree_nodes[index]
                _set_ssm_state(layer, nodes.windows[node][None], nodes.states[node][None])
            if layer.has_previous_state[0]:
                layer.conv_states[0] = layer.conv_states[0][..., -layer.conv_kernel_size[0]:]  # drop a prefill's record
                layer.recurrent_states_history[0] = []
            layer.cumulative_length_linear.fill_(length)
        self._tree_nodes = {}
        self._since_commit = self._reach = 0

    def _roll_back_ssm(self, removed: int) -> None:
        """Restore each SSM layer's state after all but the last `removed` tokens, and commit there."""
        if removed > self._reach:
            raise ValueError(
                f"cannot roll this hybrid's SSM state back {removed} tokens: it recorded the states of only the "
                f"last {self._reach} (verified since the last commit; a prefill records none)"
            )
        if self._since_commit:  # nothing appended since the last commit: nothing recorded, nothing to drop
            for layer in self._ssm_layers:
                layer.crop(-removed)  # restores the recorded state (`removed` = 0: the newest) and drops the record
        self._since_commit = self._reach = 0

    @torch.inference_mode()  # the cached tensors are inference tensors: in-place writes need the mode
    def keep(self, start: int, slots: Sequence[int]) -> None:
        """Keep slots `start + s` for s in `slots` (ascending), packed to `start, start+1, ...`; drop the rest.

        This is tree compaction: after verifying a tree, only the accepted path stays.
        """
        slots = list(slots)
        if slots == list(range(len(slots))):
            self.truncate(start + len(slots))  # a prefix: plain rollback, no copy
            return
        if self.hybrid and not self._tree_nodes:
            raise ValueError(
                f"cannot keep tree slots {slots} of a hybrid target's cache: its SSM layers hold one state per "
                "sequence, not per tree node (verify the tree with its SSM states: `CausalLM.verify`)"
            )
        if any(b <= a for a, b in zip(slots, slots[1:])) or start + slots[-1] >= len(self):
            raise ValueError(f"slots {slots} must ascend and lie inside the cache ({len(self)} slots)")
        index = torch.tensor(slots) + start  # [k]
        if self._tree_nodes:
            self._keep_tree_node(start + slots[-1], start + len(slots))  # the SSM layers: the last kept node's state
        for layer in self._cache.layers:
            if isinstance(layer, LinearAttentionCacheLayerMixin):
                continue
            index = index.to(layer.keys.device)
            # keys/values: [B, H, S, D]; gather first so the write never reads an overwritten slot
            layer.keys[..., start : start + len(slots), :] = layer.keys[..., index, :]
            layer.values[..., start : start + len(slots), :] = layer.values[..., index, :]
        kept = [self._tokens[start + s] for s in slots]
        self._tokens[start : start + len(slots)] = kept
        self._crop_attention(start + len(slots))

    def common_prefix(self, sequence: Sequence[int]) -> int:
        """Length of the longest prefix shared by the cached tokens and `sequence`."""
        n = 0
        for cached, wanted in zip(self._tokens, sequence):
            if cached != wanted:
                break
            n += 1
        return n


def _set_ssm_state(layer: LinearAttentionCacheLayerMixin, window: torch.Tensor, state: torch.Tensor) -> None:
    """Make an SSM layer's conv window [1, C, K] and recurrent state [1, H, P, N] these (a first one initialises)."""
    if not layer.is_recurrent_states_initialized[0]:
        layer.lazy_initialization(conv_states=window, recurrent_states=state, conv_kernel_size=window.shape[-1])
    layer.conv_states[0] = window.clone()
    layer.recurrent_states[0].copy_(state)
    layer.has_previous_state[0] = True
