"""STree: verifying a draft tree through the Mamba-2 (SSM) layers of a hybrid target in one forward.

An SSM layer is a recurrence h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T, y_t = C_t h_t + D x_t after
a causal depthwise conv of width K. Over a tree, a node's predecessor is its parent, not the slot before
it, so transformers' chain scan cannot verify one. STree (Wu et al. 2025) uses the structure of the
accumulated transitions: with cum_i the sum of dt A over the path root..i, every node's state is

    h_i = sum_{j ancestor-or-self of i} exp(cum_i - cum_j) dt_j x_j B_j^T + exp(cum_i) h_0

(h_0 the committed prefix's state), i.e. the chunked scan's segment-sum matrix with the tree's ancestor
mask in place of the causal one: every node's state follows from its parent's through the accumulated
decays, all at once, without re-running the prefix; the conv reads each node's K-1 ancestors (and the
committed inputs above the root). The attention layers verify with the tree mask as before.

The mixer's own forward runs chains and prefills untouched. For a tree forward, `CausalLM` sets the tree
in a ContextVar (like transformers' output capture: other threads' forwards of the same model neither see
nor disturb it), and the mixer forward installed by `enable_tree_scan` (once per model, no weights moved)
computes its layer by the formula above and hands every node's conv window and state to the cache, whose
commit keeps the accepted node's.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from spectune.trees.draft import ancestor_matrix

# what the tree scan reads off a mixer: transformers' Mamba-2 mixers (Bamba's, and the FalconH1, NemotronH and
# GraniteMoeHybrid copies of it) carry all of these
MAMBA2_PARTS = (
    "in_proj", "conv1d", "act", "A_log", "D", "dt_bias", "norm", "out_proj", "layer_idx", "time_step_limit",
    "num_heads", "head_dim", "n_groups", "ssm_state_size", "intermediate_size", "conv_dim",
)


@dataclass(frozen=True)
class NodeStates:
    """One SSM layer's state after every tree node."""

    windows: torch.Tensor  # [n, C, K] the conv inputs the node's successor reads (the node's last K on its path)
    states: torch.Tensor  # [n, H, P, N] the recurrent state after the node


@dataclass(frozen=True)
class CommittedState:
    """One SSM layer's state at the committed prefix (the tree's root comes after it)."""

    window: torch.Tensor  # [C, K] the last K conv inputs (zeros before the sequence's start)
    state: torch.Tensor  # [H, P, N]


@dataclass
class TreeScan:
    """The tree one forward verifies, and what its SSM layers computed (layer index -> node states)."""

    parents: tuple[int, ...]
    committed: dict[int, CommittedState]  # SSM layer index -> its state; absent before the first token
    nodes: dict[int, NodeStates] = field(default_factory=dict)


_TREE: ContextVar[TreeScan | None] = ContextVar("spectune_tree_scan", default=None)
_BRANCHES: ContextVar[bool] = ContextVar("spectune_branch_by_branch", default=False)


@contextlib.contextmanager
def branch_by_branch() -> Iterator[None]:
    """Within: a hybrid target verifies a tree the naive way STree is measured against, one chain forward
    per root-to-leaf branch from the committed state (shared prefixes recomputed); a drafter enters it in
    `verifying(tree)`."""
    token = _BRANCHES.set(True)
    try:
        yield
    finally:
        _BRANCHES.reset(token)


def verifying_branch_by_branch() -> bool:
    return _BRANCHES.get()


@contextlib.contextmanager
def scanning(scan: TreeScan) -> Iterator[TreeScan]:
    """Within: the SSM layers of models passed to `enable_tree_scan` verify `scan.parents` as a tree."""
    token = _TREE.set(scan)
    try:
        yield scan
    finally:
        _TREE.reset(token)


def mamba2_mixers(model: nn.Module) -> list[nn.Module]:
    """The model's Mamba-2 mixers (modules with every part the tree scan reads), in layer order."""
    return [m for m in model.modules() if all(hasattr(m, part) for part in MAMBA2_PARTS)]


def enable_tree_scan(model: nn.Module, ssm_layers: int) -> None:
    """Let the model's Mamba-2 mixers verify trees (idempotent); ValueError when some of its `ssm_layers`
    recurrent layers is no Mamba-2 mixer (its per-node state is nothing the engine can compute)."""
    mixers = mamba2_mixers(model)
    if len(mixers) != ssm_layers:
        raise ValueError(
            f"cannot verify a draft tree on {type(model).__name__}: {ssm_layers - len(mixers)} of its "
            f"{ssm_layers} recurrent layers are no Mamba-2 mixer, whose per-node state the engine can compute"
        )
    for mixer in mixers:
        if not getattr(mixer, "_spectune_tree_scan", False):
            mixer.forward = types.MethodType(_tree_or_chain(type(mixer).forward), mixer)
            mixer._spectune_tree_scan = True


def _tree_or_chain(chain_forward):
    def forward(self, hidden_states: torch.Tensor, cache=None, attention_mask=None, **kwargs) -> torch.Tensor:
        scan = _TREE.get()
        if scan is None:
            return chain_forward(self, hidden_states, cache=cache, attention_mask=attention_mask, **kwargs)
        return _tree_mixer(self, hidden_states, scan)

    return forward


def _tree_mixer(mixer: nn.Module, hidden_states: torch.Tensor, scan: TreeScan) -> torch.Tensor:
    """The mixer's output at every tree node, [1, n, d]; the nodes' states go to `scan.nodes`."""
    n, heads = hidden_states.shape[1], mixer.num_heads
    group_size = mixer.n_groups * mixer.ssm_state_size
    projected = mixer.in_proj(hidden_states[0])  # [n, I + C + H]
    gate, xbc, dt = projected.split([mixer.intermediate_size, mixer.conv_dim, heads], dim=-1)
    committed = scan.committed.get(mixer.layer_idx) or _empty_state(mixer, xbc)
    conv_out, windows = tree_conv(xbc, committed.window, mixer.conv1d.weight[:, 0], mixer.conv1d.bias, scan.parents)
    x, b, c = mixer.act(conv_out).split([mixer.intermediate_size, group_size, group_size], dim=-1)
    dt = F.softplus(dt + mixer.dt_bias).clamp(*mixer.time_step_limit)  # [n, H]
    a = -torch.exp(mixer.A_log.float())  # [H]
    per_group = heads // mixer.n_groups
    b = b.view(n, mixer.n_groups, -1).repeat_interleave(per_group, dim=1)  # [n, H, N]
    c = c.view(n, mixer.n_groups, -1).repeat_interleave(per_group, dim=1)  # [n, H, N]
    x = x.reshape(n, heads, mixer.head_dim)  # [n, H, P]
    y, states = tree_ssd(x, dt, a, b, c, mixer.D, committed.state, scan.parents)
    scan.nodes[mixer.layer_idx] = NodeStates(windows, states)
    y = mixer.norm(y.reshape(1, n, -1), gate[None])  # [1, n, I]
    return mixer.out_proj(y.to(hidden_states.dtype))  # [1, n, d]


def _empty_state(mixer: nn.Module, like: torch.Tensor) -> CommittedState:
    """The state before any token: zero conv inputs, zero recurrent state."""
    window = like.new_zeros(mixer.conv_dim, mixer.conv1d.kernel_size[0])  # [C, K]
    state = like.new_zeros(mixer.num_heads, mixer.head_dim, mixer.ssm_state_size)  # [H, P, N]
    return CommittedState(window, state)


def tree_conv(
    inputs: torch.Tensor, window: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    parents: tuple[int, ...],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The causal depthwise conv along each node's path: outputs [n, C] (before the activation), and each
    node's last K inputs on its path [n, C, K] (the conv window its children, or the next step, read).

    inputs: [n, C] the nodes' conv inputs; window: [C, K] the committed prefix's last K inputs; weight: [C, K].
    """
    kernel = weight.shape[-1]
    table = torch.cat([window, inputs.T], dim=1)  # [C, K + n]: committed columns, then one per node
    rows: list[list[int]] = []
    for node, parent in enumerate(parents):
        above = rows[parent] if parent >= 0 else list(range(kernel))  # the root continues the committed window
        rows.append(above[1:] + [kernel + node])
    index = torch.tensor(rows, device=inputs.device)  # [n, K] columns of `table`, oldest first
    windows = table[:, index].permute(1, 0, 2)  # [n, C, K]
    out = (windows * weight).sum(-1)  # [n, C]
    return (out if bias is None else out + bias), windows


def tree_ssd(
    x: torch.Tensor, dt: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor,
    h0: torch.Tensor, parents: tuple[int, ...],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs [n, H, P] and states [n, H, P, N] of the selective SSM over a tree, all nodes at once.

    x: [n, H, P]; dt: [n, H] (after softplus); a: [H] (negative); b, c: [n, H, N]; d: [H]; h0: [H, P, N].
    """
    ancestors = ancestor_matrix(parents).to(x.device)  # [n, n] row i: i and its ancestors
    log_decay = dt.float() * a  # [n, H] each node's own transition
    cum = ancestors.float() @ log_decay  # [n, H] summed over the path root..i
    gap = cum[:, None, :] - cum[None, :, :]  # [n(i), n(j), H] decay from after j to i
    decay = torch.where(ancestors[..., None], gap, -torch.inf).exp()  # [n, n, H]; 0 off the path
    inflow = (x.float() * dt.float()[..., None])[..., None] * b.float()[:, :, None, :]  # [n, H, P, N] dt x B^T
    states = torch.einsum("ijh,jhpn->ihpn", decay, inflow) + cum.exp()[..., None, None] * h0.float()  # [n, H, P, N]
    y = torch.einsum("ihn,ihpn->ihp", c.float(), states) + d.float()[:, None] * x.float()  # [n, H, P]
    return y.to(x.dtype), states.to(h0.dtype)
