"""Sequoia's dynamic program: the static tree with the most expected tokens per step.

Under Sequoia's positional acceptance assumption, the k-th ranked child of an accepted node
is accepted with probability p[k] (marginal; at most one child is accepted, so sum p <= 1).
A tree's expected tokens per step (bonus included) is then the sum over its nodes of the
product of p along the node's path (the root counts 1). With

    T[m][l][b] = best value of a tree of m nodes, at most l levels (root = level 1), b root children
    T[1][l][0] = 1
    T[m][l][b] = max_y T[y][l][b-1] + p[b] * max_b' T[m-y][l-1][b']      (b = 1 gives 1 + p[1] * ...)

the b-th child's subtree gets m - y nodes and one level less. Given a profile of forward
times, the hardware-aware choice picks the size n and depth d minimising time per token,
(drafting time + t_target(n)) / T(n, d).

Pure functions over floats: no model, no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

Subtree = tuple["Subtree", ...]  # a node's children, in rank order


@dataclass(frozen=True)
class Profile:
    """Forward times on one worker: entry i is the time for i+1 tokens after a fixed past."""

    target_ms: tuple[float, ...]
    drafter_ms: tuple[float, ...]

    def target(self, tokens: int) -> float:
        return self.target_ms[tokens - 1]

    def drafter(self, tokens: int) -> float:
        return self.drafter_ms[tokens - 1] if self.drafter_ms else 0.0


@dataclass(frozen=True)
class SequoiaTree:
    paths: tuple[tuple[int, ...], ...]  # Medusa path list: child ranks from the root
    size: int  # draft nodes (root excluded)
    depth: int  # deepest draft position
    expected_tokens: float  # tokens per step, bonus included (tau); expected accepted drafts = this - 1
    step_ms: float | None = None  # modelled time of one step, when chosen against a profile

    @property
    def level_widths(self) -> tuple[int, ...]:
        """Nodes per depth, root level first."""
        widths = [1] + [0] * self.depth
        for path in self.paths:
            widths[len(path)] += 1
        return tuple(widths)


def check_acceptance(acceptance: Sequence[float]) -> tuple[float, ...]:
    values = tuple(float(a) for a in acceptance)
    if not values:
        raise ValueError("acceptance must list at least one probability, e.g. [0.6, 0.1, 0.05]")
    if any(not 0.0 <= a <= 1.0 for a in values):
        raise ValueError(f"acceptance entries must lie in [0, 1], got {list(values)}")
    if sum(values) > 1.0 + 1e-6:
        raise ValueError(f"acceptance entries are probabilities of disjoint events and must sum to <= 1, got {sum(values):.4f}")
    return values


class SequoiaTable:
    """T for every size up to budget + 1 nodes and every depth up to max_depth, with the choices behind it."""

    def __init__(self, acceptance: Sequence[float], budget: int, max_depth: int) -> None:
        self.acceptance = check_acceptance(acceptance)
        if budget < 1:
            raise ValueError(f"budget must be >= 1 draft node, got {budget}")
        if max_depth < 1:
            raise ValueError(f"max_depth must be >= 1, got {max_depth}")
        self.budget, self.max_depth = budget, max_depth
        nodes, levels = budget + 1, max_depth + 1
        width = min(len(self.acceptance), budget)
        # value[m, l, b]: -inf where no such tree exists; choice[m, l, b]: the y that achieved it
        self._value = np.full((nodes + 1, levels + 1, width + 1), -np.inf)
        self._choice = np.zeros((nodes + 1, levels + 1, width + 1), dtype=np.int64)
        self._best = np.full((nodes + 1, levels + 1), -np.inf)  # [m, l] max over b
        self._solve(nodes, levels, width)

    def _solve(self, nodes: int, levels: int, width: int) -> None:
        self._value[1, 1:, 0] = 1.0
        self._best[1, 1:] = 1.0
        for level in range(2, levels + 1):
            below = self._best[:, level - 1]  # [m] best subtree of m nodes one level shallower
            for b in range(1, width + 1):
                # p * (-inf) is nan when p == 0: an impossible subtree must stay impossible
                weighted = np.full_like(below, -np.inf)  # [m]
                possible = np.isfinite(below)
                weighted[possible] = self.acceptance[b - 1] * below[possible]
                for m in range(b + 1, nodes + 1):
                    ys = np.arange(1, m)  # nodes kept by the first b-1 children and the root
                    totals = self._value[ys, level, b - 1] + weighted[m - ys]  # [m-1]
                    pick = int(np.argmax(totals))
                    self._value[m, level, b] = totals[pick]
                    self._choice[m, level, b] = ys[pick]
            self._best[:, level] = self._value[:, level, :].max(axis=1)

    def expected_tokens(self, nodes: int, depth: int) -> float:
        """Best T for a tree of `nodes` nodes (root included) and draft depth <= depth."""
        return float(self._best[nodes, depth + 1])

    def tree(self, nodes: int, depth: int) -> SequoiaTree:
        value = self.expected_tokens(nodes, depth)
        if not np.isfinite(value):
            raise ValueError(f"no tree of {nodes} nodes has depth <= {depth} with {len(self.acceptance)} ranked children")
        paths = tuple(_paths(self._subtree(nodes, depth + 1), ()))
        return SequoiaTree(paths, nodes - 1, max((len(p) for p in paths), default=0), value)

    def _subtree(self, nodes: int, levels: int) -> Subtree:
        return self._children(nodes, levels, int(np.argmax(self._value[nodes, levels, :])))

    def _children(self, nodes: int, levels: int, b: int) -> Subtree:
        if b == 0:
            return ()
        y = int(self._choice[nodes, levels, b])
        return self._children(y, levels, b - 1) + (self._subtree(nodes - y, levels - 1),)


def _paths(children: Subtree, prefix: tuple[int, ...]) -> list[tuple[int, ...]]:
    out: list[tuple[int, ...]] = []
    for rank, grandchildren in enumerate(children):
        path = prefix + (rank,)
        out.append(path)
        out.extend(_paths(grandchildren, path))
    return out


def tree_value(paths: Sequence[Sequence[int]], acceptance: Sequence[float]) -> float:
    """Expected tokens per step of any path-list tree under the positional assumption (root counts 1)."""
    p = tuple(acceptance)
    total = 1.0
    for path in paths:
        total += float(np.prod([p[r] if r < len(p) else 0.0 for r in path]))
    return total


def step_cost_ms(tree: SequoiaTree, profile: Profile) -> float:
    """One step drafted level by level (a pass per non-leaf level, root pass first) and verified at once."""
    widths = tree.level_widths
    drafting = sum(profile.drafter(w) for w in widths[: tree.depth])
    return drafting + profile.target(tree.size + 1)


def optimal_tree(acceptance: Sequence[float], budget: int, max_depth: int) -> SequoiaTree:
    """The best tree using the whole budget (no profile: more tokens verified are assumed free)."""
    return _table(tuple(acceptance), budget, max_depth).tree(budget + 1, max_depth)


# A prior for pairs nobody has measured yet: a fair drafter's top-1 agreement and a thin tail.
# Measure the real vector with `spectune trees measure`; it moves the tree a lot.
PRIOR_ACCEPTANCE = (0.6, 0.12, 0.05, 0.03, 0.02, 0.01)


def hardware_aware_tree(acceptance: Sequence[float], budget: int, max_depth: int, profile: Profile) -> SequoiaTree:
    """Among the best trees of every size <= budget and depth <= max_depth, the fastest per token."""
    needed = budget + 1
    if len(profile.target_ms) < needed:
        raise ValueError(
            f"the profile covers 1..{len(profile.target_ms)} tree tokens but budget {budget} needs {needed} "
            f"(root included): profile again with --max-tokens {needed} or more"
        )
    if profile.drafter_ms and len(profile.drafter_ms) < needed:
        raise ValueError(f"the profile's drafter times cover 1..{len(profile.drafter_ms)} tokens but budget {budget} needs {needed}")
    table = _table(tuple(acceptance), budget, max_depth)
    best: SequoiaTree | None = None
    for nodes in range(2, needed + 1):
        for depth in range(1, min(max_depth, nodes - 1) + 1):
            if not np.isfinite(table.expected_tokens(nodes, depth)):
                continue
            candidate = table.tree(nodes, depth)
            cost = step_cost_ms(candidate, profile)
            if best is None or cost / candidate.expected_tokens < best.step_ms / best.expected_tokens:
                best = SequoiaTree(candidate.paths, candidate.size, candidate.depth, candidate.expected_tokens, cost)
    assert best is not None  # nodes = 2, depth = 1 (one child) always exists
    return best


@lru_cache(maxsize=32)
def _table(acceptance: tuple[float, ...], budget: int, max_depth: int) -> SequoiaTable:
    """Sweeps rebuild the same tree many times; the table depends only on these three."""
    return SequoiaTable(acceptance, budget, max_depth)
