"""The Tune function trainable: lease a worker holding the pair, run the trial there, report.

Nothing here writes the database: the driver's `StoreCallback` stores what trials report.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import ray
from ray.exceptions import RayActorError
from ray import tune

from spectune.config import Settings
from spectune.prompts import Prompt
from spectune.sweeps.space import trial_config
from spectune.workers.trials.pair_worker import TrialOutcome, TrialRequest, WorkerPool

if TYPE_CHECKING:  # the spec imports the method registry (torch): trial processes never need it
    from spectune.sweeps.spec import SweepSpec

PAYLOAD = "spectune"  # the reported key holding metrics, hardware and baseline for the store


class TrialFailed(RuntimeError):
    """The trial's configuration could not be measured; the message says why (stored as the trial's error).

    `node` is the Ray node the trial's worker ran on, when known: the store records it beside the error.
    """

    def __init__(self, message: str, node: str | None = None) -> None:
        super().__init__(message)
        self.node = node

    def __reduce__(self) -> tuple[Any, ...]:  # Tune pickles it to the trial's error file: keep the node
        return (TrialFailed, (str(self), self.node))


@dataclass(frozen=True)
class SweepContext:
    """What every trial of a sweep shares (handed to trials once, through `tune.with_parameters`)."""

    pools: dict[str, WorkerPool]  # pair id -> the workers holding that pair
    pair_id: str
    prompts: tuple[Prompt, ...]
    settings: Settings  # made once by the driver from the spec; every trial is measured with it
    objectives: tuple[str, ...]
    # a resumed sweep: trials the store already holds as done (trial id -> the objectives they reported);
    # a killed driver stored them after Tune last saved its state, so Tune would run them again
    stored: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @classmethod
    def of(cls, spec: SweepSpec, pools: dict[str, WorkerPool], prompts: tuple[Prompt, ...],
           stored: Mapping[str, Mapping[str, Any]] | None = None) -> SweepContext:
        return cls(pools, spec.pair.pair_id, prompts, spec.settings(), tuple(o.metric for o in spec.objectives),
                   dict(stored or {}))


def run_trial(config: dict[str, Any], context: SweepContext) -> None:
    stored = context.stored.get(tune.get_context().get_trial_id())
    if stored is not None:  # finished before the restart: report what the store holds, run nothing
        tune.report({**stored, PAYLOAD: None})
        return
    request = TrialRequest(trial_config(config), context.settings, context.prompts)
    with context.pools[context.pair_id].lease(tune.get_context().get_trial_id()) as leased:
        started = time.perf_counter()  # from the lease: a trial may wait for a free worker first
        try:
            outcome: TrialOutcome = ray.get(leased.worker.run.remote(request))
        except RayActorError as err:  # the process died mid-trial (OOM-killed, a crash, SIGKILL, its node lost)
            raise TrialFailed(f"the worker running this trial died on node {leased.node} ({first_line(err)}); "
                              "Ray restarts it for the next trial", leased.node) from None
    if outcome.error is not None:
        raise TrialFailed(outcome.error, outcome.worker.get("node"))
    tune.report(trial_report(outcome, context.objectives, time.perf_counter() - started))


def first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def trial_report(outcome: TrialOutcome, objectives: tuple[str, ...], wall_s: float) -> dict[str, Any]:
    """Objectives at the top level (searchers read them there); everything for the store under PAYLOAD.

    Tune keeps reports as JSON (result.json), so the typed result travels as its `as_dict()` row.
    """
    result = outcome.result.with_extra(decode_s=outcome.decode_s, trial_wall_s=wall_s, worker=outcome.worker)
    row = result.as_dict()
    return {
        **{name: row.get(name) for name in objectives},
        PAYLOAD: {"result": row, "hardware": outcome.hardware, "node": outcome.worker.get("node"),
                  "baselines": [asdict(b) for b in outcome.baselines]},
    }
