"""Phase 4: which drafted nodes the target accepts, and the bonus token it adds.

Greedy: follow the child equal to the target's argmax. Sampling: recursive rejection
sampling over siblings drawn without replacement (RSD / Sequoia's SpecTree); a chain is
the one-sibling case, i.e. Leviathan/Chen. Siblings drawn with replacement (SpecInfer,
`DraftTree.with_replacement`) keep q unchanged after a rejection (multi-round rejection).
Deterministic drafts (q = None) are one-hot proposals, which makes the rule sample-and-match.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spectune.engine.sampling import Sampling, host, probabilities, sample
from spectune.trees.draft import DraftTree, tree_layout


@dataclass(frozen=True)
class Verdict:
    path: tuple[int, ...]  # accepted node indices, root first
    bonus: int  # the token the target adds after the path

    @property
    def accepted(self) -> int:
        """Draft tokens accepted (root and bonus excluded)."""
        return len(self.path) - 1


def accept(tree: DraftTree, logits: torch.Tensor, sampling: Sampling, rng: torch.Generator) -> Verdict:
    """logits: [n+1, V] target logits at every tree node."""
    if sampling.greedy:
        return accept_greedy(tree, logits)
    return accept_sampled(tree, probabilities(logits, sampling), rng)


def accept_greedy(tree: DraftTree, logits: torch.Tensor) -> Verdict:
    best = logits.argmax(dim=-1).tolist()  # [n+1] target's choice after each node
    children = tree_layout(tree.parents).children
    path = [0]
    while True:
        node = path[-1]
        match = next((c for c in children[node] if tree.tokens[c] == best[node]), None)
        if match is None:
            return Verdict(tuple(path), best[node])
        path.append(match)


def accept_sampled(tree: DraftTree, target_probs: torch.Tensor, rng: torch.Generator) -> Verdict:
    """target_probs: [n+1, V] (any device). Returns a path whose tokens, plus the bonus, follow the target exactly.

    The rows of the nodes on the path come to the CPU one by one (`host`), where the generator's
    uniforms and the drafter's q live: p, q and every residual share a device and a dtype.
    """
    children = tree_layout(tree.parents).children
    path = [0]
    while True:
        node = path[-1]
        chosen, residual = _recursive_rejection(tree, node, children[node], host(target_probs[node]), rng)
        if chosen is None:
            return Verdict(tuple(path), sample(residual, rng))
        path.append(chosen)


def _recursive_rejection(
    tree: DraftTree, node: int, siblings: tuple[int, ...], p: torch.Tensor, rng: torch.Generator
) -> tuple[int | None, torch.Tensor]:
    """Try each sibling in draw order; on rejection move p to the residual and q off the rejected token.

    p: [V] on the CPU (from `host`), like q.
    """
    q = host(tree.q[node]) if tree.q is not None else None  # [V] on the CPU, or one-hot proposals
    for child in siblings:
        token = tree.tokens[child]
        q_token = float(q[token]) if q is not None else 1.0
        if float(torch.rand((), generator=rng)) * q_token < float(p[token]):  # u < p/q without dividing
            return child, p
        p, q_next = _residual(p, q, token)
        q = q if tree.with_replacement else q_next  # i.i.d. siblings: the next one was drawn from the same q
    return None, p


def _residual(p: torch.Tensor, q: torch.Tensor | None, token: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """norm(max(p - q, 0)), and q renormalised without the rejected token (the next sibling's law
    when drawing without replacement)."""
    if q is None:  # one-hot proposal: max(p - onehot, 0) is p without the token
        residual = p.clone()
        residual[token] = 0.0
        return residual / residual.sum(), None
    residual = (p - q).clamp_(min=0.0)
    total = residual.sum()
    residual = residual / total if total > 0 else p  # p == q up to rounding: nothing to correct
    q_next = q.clone()
    q_next[token] = 0.0
    q_total = q_next.sum()
    return residual, (q_next / q_total if q_total > 0 else q_next)
