"""PPD's sparse tree: the most likely rank paths under per-position, per-rank acceptance, sized by measured cost.

Medusa-style drafts (PPD's prompt tokens, heads) propose each depth's candidates independently of the path,
so a node's chance of being accepted is the product, over its depths d, of p[d][rank]: the share of held-out
positions where the target's argmax sat at that rank of depth d's candidates (the heads card's
`agreement.by_rank`). The tree of n nodes that maximises expected accepted tokens takes the n best such
products (prefix-closed once each depth's row is non-increasing). PPD's hardware-aware choice then picks the
n whose step, n+1 nodes plus the prompt tokens hung under them, costs least per expected token on the
measured t(tokens) (`spectune trees profile`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from spectune.trees.sequoia import Profile


@dataclass(frozen=True)
class SparseTree:
    paths: tuple[tuple[int, ...], ...]  # Medusa path list: child ranks from the root
    expected_tokens: float  # tokens per step, bonus included (tau under independence)
    verified: int  # tokens one step verifies: nodes, root and extras included
    step_ms: float | None = None  # modelled time of one step, when chosen against a profile


def check_rank_acceptance(acceptance: Sequence[Sequence[float]]) -> tuple[tuple[float, ...], ...]:
    """Rows per depth of per-rank probabilities in [0, 1) summing to <= 1; each made non-increasing
    (a running minimum), so the best paths are prefix-closed and siblings come in rank order."""
    if not acceptance or any(not row for row in acceptance):
        raise ValueError("rank acceptance needs a non-empty row of per-rank probabilities per depth")
    rows = []
    for d, row in enumerate(acceptance, start=1):
        if any(not 0 <= p < 1 for p in row) or sum(row) > 1 + 1e-6:
            raise ValueError(f"depth {d}'s rank acceptance must be probabilities in [0, 1) summing to <= 1, got {list(row)}")
        running = [float(row[0])]
        for p in row[1:]:
            running.append(min(running[-1], float(p)))
        rows.append(tuple(running))
    return tuple(rows)


def best_paths(acceptance: Sequence[Sequence[float]], size: int) -> list[tuple[tuple[int, ...], float]]:
    """The `size` rank paths (depth <= rows) with the highest products of p[depth][rank], best first, with those
    products; paths whose product is 0 are never taken."""
    rows = check_rank_acceptance(acceptance)
    frontier = [(p, (r,)) for r, p in enumerate(rows[0]) if p > 0]
    chosen: list[tuple[tuple[int, ...], float]] = []
    while frontier and len(chosen) < size:
        frontier.sort(key=lambda item: (-item[0], len(item[1]), item[1]))
        score, path = frontier.pop(0)
        chosen.append((path, score))
        if len(path) < len(rows):
            frontier += [(score * p, path + (r,)) for r, p in enumerate(rows[len(path)]) if p > 0]
    return chosen


def sparse_tree(acceptance: Sequence[Sequence[float]], size: int, extras_per_node: int) -> SparseTree:
    """The best tree of at most `size` draft nodes, each node carrying `extras_per_node` extra positions."""
    chosen = best_paths(acceptance, size)
    nodes = len(chosen) + 1
    return SparseTree(tuple(p for p, _ in chosen), 1.0 + sum(s for _, s in chosen), nodes * (1 + extras_per_node))


def hardware_aware_sparse_tree(acceptance: Sequence[Sequence[float]], budget: int, extras_per_node: int,
                               profile: Profile) -> SparseTree:
    """Among the best trees of 1..budget nodes, the one whose modelled step time per expected token is least."""
    largest = (budget + 1) * (1 + extras_per_node)
    if len(profile.target_ms) < largest:
        raise ValueError(f"the profile covers 1..{len(profile.target_ms)} tokens but a tree of budget {budget} with "
                         f"{extras_per_node} prompt tokens per node verifies {largest}: profile again with "
                         f"--max-tokens {largest} or more")
    best: SparseTree | None = None
    for size in range(1, budget + 1):
        tree = sparse_tree(acceptance, size, extras_per_node)
        cost = profile.target(tree.verified)
        if best is None or cost / tree.expected_tokens < best.step_ms / best.expected_tokens:
            best = SparseTree(tree.paths, tree.expected_tokens, tree.verified, cost)
    assert best is not None
    return best
