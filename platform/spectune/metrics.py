"""Counting what the loop returned: the metric names vLLM and Spec-Bench use."""

from __future__ import annotations

from collections.abc import Sequence

from spectune.engine.loop import Generation, StepRecord
from spectune.results import StepCounts


def step_metrics(generations: Sequence[Generation]) -> StepCounts:
    """Counts over every step of every generation (one pass over a prompt set)."""
    steps = [s for g in generations for s in g.steps]
    new_tokens = sum(len(g.tokens) for g in generations)
    target_calls = len(steps)
    drafted = sum(s.drafted for s in steps)
    return StepCounts(
        new_tokens=new_tokens,
        target_calls=target_calls,
        draft_calls=sum(s.draft_calls for s in steps),
        mean_accepted_tokens=new_tokens / target_calls if target_calls else None,
        acceptance_rate=sum(s.accepted for s in steps) / drafted if drafted else None,
        acceptance_by_position=tuple(acceptance_by_position(steps)),
        tree_tokens_per_step=sum(s.drafted + 1 + s.extras for s in steps) / target_calls if target_calls else None,
        draft_calls_per_step=sum(s.draft_calls for s in steps) / target_calls if target_calls else None,
    )


def acceptance_by_position(steps: Sequence[StepRecord]) -> list[float]:
    """Entry i: of the steps that drafted a position i+1 deep, the fraction that accepted that deep."""
    depth = max((s.depth for s in steps), default=0)
    rates = []
    for position in range(1, depth + 1):
        offered = [s for s in steps if s.depth >= position]
        rates.append(sum(s.accepted >= position for s in offered) / len(offered))
    return rates
