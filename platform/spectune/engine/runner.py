"""A causal LM plus the KV cache it owns: the only place that calls a model's forward."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import contextlib
from typing import Any

import torch
from transformers import PreTrainedModel

from spectune.engine.budget import context_length
from spectune.engine.kvcache import KVCache
from spectune.engine.layer_transfer import transferring
from spectune.engine.ssm_tree import TreeScan, enable_tree_scan, scanning, verifying_branch_by_branch
from spectune.trees.draft import LayerTransfer, tree_layout


RECOMPILE_LIMIT = 64  # compiled forms per forward: a bench's contenders bring a dozen (chains, masks, hidden layers)
# What each `compile` mode of a pair sets in inductor. 'max-autotune' benchmarks candidate kernels for every
# matrix product; freezing makes the weights constants, which inductor's C++ GEMM templates need in order to
# prepack them (on a Xeon with AMX, SmolLM2's bf16 AR step ran 2.5x eager with it, against 1.3x 'default').
INDUCTOR_OPTIONS: Mapping[str, Mapping[str, Any]] = {
    "default": {},
    "max-autotune": {"max_autotune": True, "freezing": True},
}
EXTRA_SLOT = -1  # the token id the cache records for an extra position (no token: an input embedding)


@dataclass(frozen=True)
class ExtraOutputs:
    """The verification forward's outputs at the extra positions (`Drafter.verify_extras`), apart from the
    tree's [n+1, V] logits that acceptance reads."""

    logits: torch.Tensor  # [m, V] float
    hidden: Mapping[int, torch.Tensor]  # {layer l: [m, d]}, the layers asked for


@dataclass(frozen=True)
class Verification:
    """What the target's verification forward hands back."""

    logits: torch.Tensor  # [n, V] float, at every verified token
    hidden: Mapping[int, torch.Tensor]  # layer l -> [n, d] output of decoder block l (1-based), as asked;
    # l = L (the last block) is the final norm's output, what the LM head reads (transformers' last hidden state)
    extras: ExtraOutputs | None = None  # at the extra positions after the n tokens, when `verify` was given some


def compile_forward(model: PreTrainedModel, mode: str = "default") -> None:
    """Replace `model`'s forward by its `torch.compile` (dynamic shapes; `mode` one of `INDUCTOR_OPTIONS`), so
    every caller runs the compiled one:
    this runner and HF's `generate` alike (a peer's AR compiles with ours: the comparison stays fair). It
    patches the instance, not the class: a view built from the class (`exit_view`) stays eager.

    A rollback leaves the cache's keys/values as views with the longer cache's strides (transformers' `crop`),
    and a compiled graph guards on strides: each such layout would compile again (30-70 s for SmolLM2 here).
    So before each call the cache's cropped layers are copied out contiguous (only after a rollback)."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    import torch._inductor.config as inductor_config  # imported here: an eager pair never loads inductor

    options = dict(INDUCTOR_OPTIONS[mode])
    compiled = torch.compile(model.forward, dynamic=True)

    def forward(*args: Any, **kwargs: Any) -> Any:
        _contiguous(kwargs.get("cache", kwargs.get("past_key_values")))
        # Any call may compile a new form. The options are patched around each call, not given to
        # `torch.compile(options=)`, which ignores `freezing` (dynamo reads it from the global config).
        with inductor_config.patch(options) if options else contextlib.nullcontext():
            return compiled(*args, **kwargs)

    model.forward = forward


def _contiguous(cache: Any) -> None:
    for layer in getattr(cache, "layers", ()):
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if isinstance(keys, torch.Tensor) and not (keys.is_contiguous() and values.is_contiguous()):
            layer.keys, layer.values = keys.contiguous(), values.contiguous()


class CausalLM:
    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model.eval()
        self.cache = KVCache(model.config)
        self._trees_enabled = False  # a hybrid's Mamba-2 mixers verify trees once `enable_tree_scan` ran

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def max_positions(self) -> int:
        return context_length(self.model.config)

    @property
    def n_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    def reset(self) -> None:
        self.cache = KVCache(self.model.config)

    def forward(
        self,
        tokens: Sequence[int],
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Append `tokens` to the cache; return their logits [n, V] (or [1, V] with last_only)."""
        return self._run(tokens, positions, mask, 1 if last_only else 0, ()).logits

    def verify(
        self,
        tokens: Sequence[int],
        positions: torch.Tensor,
        mask: torch.Tensor | None,
        hidden_layers: Sequence[int] = (),
        extras: torch.Tensor | None = None,
        transfer: LayerTransfer | None = None,
    ) -> Verification:
        """Append `tokens` (a draft tree: positions [1, n], mask [1, 1, n, past+n] or None for a chain);
        return their logits and the outputs of decoder blocks `hidden_layers` (each in 1..L).

        A hybrid target verifies a tree (a mask) through its SSM layers by STree (`ssm_tree`): every
        node's state from its parent's, kept for the commit; a chain through their own scan.

        `extras` [m, d]: input embeddings of m more positions after the n tokens (positions and mask then
        cover n+m); their outputs come back apart, in `Verification.extras`, and their cache slots hold
        EXTRA_SLOT until the caller's `cache.keep` / `truncate` drops them. `transfer`: the extras' states are
        replaced after a middle block by a map of their anchor nodes' states there (`layer_transfer`).

        Layers 1..L-1 hand back a block's output before any norm (the residual stream: what vLLM's
        EAGLE-3 auxiliary layers read); layer L hands back the final norm's output, the feature the
        LM head reads (what vLLM hands EAGLE and Medusa heads, and what EAGLE's drafter predicts).

        The layer outputs come from transformers' own output capture, which collects through a
        ContextVar: nothing is hooked for this call alone, and concurrent forwards of the same
        model in other threads neither see nor disturb what this one collects.
        """
        verified = self._run(tokens, positions, mask, 0, self._layers(hidden_layers), extras, (transfer, 0))
        if extras is None:
            return verified
        n = len(tokens)
        return Verification(verified.logits[:n], {layer: h[:n] for layer, h in verified.hidden.items()},
                            ExtraOutputs(verified.logits[n:], {layer: h[n:] for layer, h in verified.hidden.items()}))

    def prefill(self, tokens: Sequence[int], hidden_layers: Sequence[int] = (), extras: torch.Tensor | None = None,
                transfer: LayerTransfer | None = None) -> Verification:
        """Append `tokens` after the cache (a chain); logits after the last one only ([1, V]) and, at every
        token, the outputs of `hidden_layers` as `verify` hands them back (drafters that read the target's
        features need the prompt's too).

        `extras` [m, d]: a chain of extra positions after the last token (its logits and hidden states come back
        in `Verification.extras`; `transfer` as in `verify`, node 0 being the last token); they are dropped from
        the cache before this returns."""
        if extras is None:
            return self._run(tokens, None, None, 1, self._layers(hidden_layers), None, (transfer, 0))
        m = extras.shape[0]
        out = self._run(tokens, None, None, m + 1, self._layers(hidden_layers), extras, (transfer, len(tokens) - 1))
        self.cache.truncate(len(self.cache) - m)
        n = len(tokens)
        return Verification(out.logits[:1], {layer: h[:n] for layer, h in out.hidden.items()},
                            ExtraOutputs(out.logits[1:], {layer: h[n:] for layer, h in out.hidden.items()}))

    def _layers(self, hidden_layers: Sequence[int]) -> tuple[int, ...]:
        layers = tuple(sorted(set(hidden_layers)))
        bad = [layer for layer in layers if not 1 <= layer <= self.n_layers]
        if bad:
            raise ValueError(f"hidden layers must be in 1..{self.n_layers} (the model has {self.n_layers}), got {bad}")
        return layers

    @torch.inference_mode()
    def _run(
        self,
        tokens: Sequence[int],
        positions: torch.Tensor | None,
        mask: torch.Tensor | None,
        keep: int,  # logits of the last `keep` positions; 0: every position
        layers: tuple[int, ...],
        extras: torch.Tensor | None = None,
        transfer: tuple[LayerTransfer | None, int] = (None, 0),  # and the sequence row of its tree's node 0
    ) -> Verification:
        if positions is None:  # a chain (the extras too)
            n = len(tokens) + (0 if extras is None else extras.shape[0])
            positions = torch.arange(len(self.cache), len(self.cache) + n).unsqueeze(0)  # [1, n]
        tree = self._tree_scan(positions, mask)
        if tree is not None and verifying_branch_by_branch():
            if extras is not None:
                raise ValueError("branch-by-branch verification takes no extra positions")
            return self._verify_branches(tokens, tree.parents, positions, layers)
        ids = torch.tensor([list(tokens)], device=self.device)  # [1, n]
        self.cache.recording(every_token=keep != 1)  # a verification may be rolled back into; a prefill not
        capture = {"output_hidden_states": list(layers)} if layers else {}  # hidden_states[l]: output of block l
        inputs = {"input_ids": ids} if extras is None else {"inputs_embeds": self._embed(ids, extras)}
        with self._transferring(*transfer, extras), scanning(tree) if tree is not None else contextlib.nullcontext():
            out = self.model(
                **inputs,
                position_ids=positions.to(self.device).clone(),  # an inference tensor, as a chain's: one graph
                attention_mask=None if mask is None else mask.to(self.device, self.dtype),
                cache=self.cache.hf,
                use_cache=True,
                logits_to_keep=keep,
                **capture,
            )
        slots = list(tokens) + [EXTRA_SLOT] * (0 if extras is None else extras.shape[0])
        self.cache.appended(slots, tree.nodes if tree is not None else None)
        hidden = {layer: out.hidden_states[layer][0] for layer in layers}  # layer -> [n, d]
        return Verification(out.logits[0].float(), hidden)  # logits [n, V]

    def _transferring(self, transfer: LayerTransfer | None, offset: int, extras: torch.Tensor | None
                      ) -> contextlib.AbstractContextManager[None]:
        if transfer is None:
            return contextlib.nullcontext()
        if extras is None:
            raise ValueError("a layer transfer replaces extra positions: give the extras it replaces")
        return transferring(self.model, transfer, offset)

    def _embed(self, ids: torch.Tensor, extras: torch.Tensor) -> torch.Tensor:
        """[1, n] token ids and [m, d] extra embeddings -> [1, n+m, d] inputs."""
        embedded = self.model.get_input_embeddings()(ids)  # [1, n, d]
        return torch.cat([embedded, extras.to(embedded.device, embedded.dtype)[None]], dim=1)  # [1, n+m, d]

    def _verify_branches(
        self, tokens: Sequence[int], parents: tuple[int, ...], positions: torch.Tensor, layers: tuple[int, ...]
    ) -> Verification:
        """The naive baseline of STree: one chain forward per root-to-leaf branch from the committed state;
        the cache then holds the tree as one STree forward leaves it. Logits [n, V] at every node."""
        if layers:
            raise ValueError("branch-by-branch verification hands back no hidden layers")
        past, logits = len(self.cache), [None] * len(tokens)
        for branch in tree_layout(parents).paths:
            out = self._run([tokens[i] for i in branch], positions[:, list(branch)], None, 0, ())
            for row, node in enumerate(branch):
                logits[node] = out.logits[row]  # [V]; shared nodes recomputed, the same values
            self.cache.stash_branch(branch, past)
        self.cache.place_tree(tokens)
        return Verification(torch.stack(logits), {})  # [n, V]

    def _tree_scan(self, positions: torch.Tensor, mask: torch.Tensor | None) -> TreeScan | None:
        """For a tree through a hybrid's SSM layers: the tree (parents from the positions and mask) and the
        committed states it grows from; None for a chain or an all-attention model."""
        if mask is None or not self.cache.hybrid:
            return None
        if not self._trees_enabled:
            enable_tree_scan(self.model, self.cache.ssm_layers)
            self._trees_enabled = True
        return TreeScan(tree_parents(positions, mask), self.cache.committed_ssm())

    def extend_to(self, sequence: Sequence[int]) -> torch.Tensor:
        """Make the cache hold exactly `sequence`, reusing its longest matching prefix; [V] logits after it."""
        if not sequence:
            raise ValueError("cannot extend to an empty sequence")
        keep = min(self.cache.common_prefix(sequence), len(sequence) - 1)  # always feed >= 1 token for logits
        self.cache.truncate(keep)
        return self.forward(sequence[keep:], last_only=True)[-1]  # [V]


def tree_parents(positions: torch.Tensor, mask: torch.Tensor) -> tuple[int, ...]:
    """The tree a verification mask encodes: each node's parent is its deepest visible earlier node.

    positions: [1, n] past + depth; mask: [1, 1, n, past+n] additive (0 = visible). The root's parent is -1.
    """
    n = positions.shape[-1]
    visible = mask[0, 0, :, -n:] == 0  # [n, n] node i sees j: j is i or an ancestor
    depth = positions[0] - positions[0, 0]  # [n]
    parents = []
    for node in range(n):
        above = [j for j in range(node) if visible[node, j]]
        parents.append(max(above, key=lambda j: int(depth[j])) if above else -1)
    return tuple(parents)
