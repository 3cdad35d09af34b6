"""A mixed-load trace: concurrency stepping through phases (1, 4, 16, 4, 1), served by each contestant.

A schedule (`num_speculative_tokens_per_batch_size`) claims to beat every fixed configuration when load
changes. This is its proof, measured: every contestant (the schedule, each fixed configuration of its
family, no speculation) gets its own vLLM server, warmed once, and the same phases of requests. As the
load sweep measures (`vllm.measure`, frozen by default), the servers stay up and the contestants take
each phase in turn, the one passing thawed and the others frozen, so that a phase's ratios compare
passes seconds apart; `alone` instead runs each contestant's whole trace on a fresh server, one alive at
a time, in an order reversed every repeat.

    phases      the concurrency of each phase; every prompt `rounds` times per phase, in full batches
    run_trace   every contestant's passes, repeat by repeat
    summarise   per phase and over the whole trace: throughput, TPOT, p95, and the ratio to no speculation
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from spectune.backends.vllm import Measure
from spectune.workers.vllm.load import (
    Latencies, PassRecord, PromptTokens, Sampling, cycled, latencies, run_pass,
)
from spectune.workers.vllm.server import Launch, VllmServer
from spectune.workers.vllm.worker import SERVED_NAME, focus_awake

NO_SPECULATION = "no speculation"


@dataclass(frozen=True)
class Contestant:
    label: str
    launch: Launch


@dataclass(frozen=True)
class TraceRun:
    """One contestant's pass at every phase, in one repeat."""

    label: str
    repeat: int
    passes: tuple[PassRecord, ...]  # one per phase, in the trace's order

    @property
    def tokens_per_s(self) -> float:
        """The whole trace's output tokens over its wall time."""
        return sum(p.new_tokens for p in self.passes) / sum(p.wall_s for p in self.passes)


@dataclass(frozen=True)
class PhaseSummary:
    concurrency: int
    tokens_per_s: float  # median over repeats
    latency: Latencies  # over every request of the phase, every repeat
    vs_no_speculation: tuple[float, ...]  # per repeat: tokens/s over no speculation's in the same repeat


@dataclass(frozen=True)
class ContestantSummary:
    label: str
    phases: tuple[PhaseSummary, ...]
    tokens_per_s: float  # the whole trace, median over repeats
    vs_no_speculation: tuple[float, ...]  # the whole trace, per repeat


def parse_phases(text: str) -> tuple[int, ...]:
    """'1,4,16,4,1' -> (1, 4, 16, 4, 1); a one-line ValueError for anything else."""
    try:
        phases = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"phases {text!r}: expected concurrencies separated by commas, e.g. 1,4,16,4,1") from None
    if len(phases) < 2 or min(phases) < 1:
        raise ValueError(f"phases {text!r}: a trace needs two phases at least, each at concurrency >= 1")
    return phases


@dataclass(frozen=True)
class TracePlan:
    """What every contestant is sent, and how it is measured."""

    phases: tuple[int, ...]  # the concurrency of each phase, in order
    sampling: Sampling
    rounds: int = 2  # every prompt this many times per phase, in full batches
    repeats: int = 2  # whole traces per contestant
    measure: Measure = "frozen"  # as the load sweep's `vllm.measure`
    timeout_s: float = 300.0  # per request


OnPhase = Callable[[str, int, int], None]  # (contestant, repeat, phase index) after each pass


def run_trace(contestants: Sequence[Contestant], prompts: Sequence[PromptTokens], plan: TracePlan,
              on_phase: OnPhase = lambda label, repeat, phase: None) -> list[TraceRun]:
    """Every contestant's pass at every phase, repeat by repeat: frozen and twins take the phases in turn
    on servers that stay up, alone runs whole traces on fresh servers one after the other."""
    if plan.measure == "alone":
        return _one_at_a_time(contestants, prompts, plan, on_phase)
    return _in_turn(contestants, prompts, plan, on_phase)


def _in_turn(contestants: Sequence[Contestant], prompts: Sequence[PromptTokens], plan: TracePlan,
             on_phase: OnPhase) -> list[TraceRun]:
    """Every contestant's server started and warmed once; then phase by phase every contestant passes in
    turn (the order reversed every other phase), so the passes a phase's ratios compare are seconds apart,
    not minutes: the machine drifts by up to 11% over minutes here. Frozen: the one passing is thawed and
    every other frozen (an idle vLLM beside the measured one made passes bimodal on 2 cores)."""
    freeze = plan.measure == "frozen"
    servers: dict[str, VllmServer] = {}
    passes: dict[tuple[str, int], list[PassRecord]] = {(c.label, r): [] for r in range(plan.repeats) for c in contestants}
    try:
        for contestant in contestants:
            server = servers[contestant.label] = VllmServer.start(contestant.launch)
            _warm(server, prompts, plan)
            if freeze:
                server.freeze()
        turn = 0
        for repeat in range(plan.repeats):
            for index, load in enumerate(plan.phases):
                for contestant in contestants if turn % 2 == 0 else list(reversed(contestants)):
                    server = servers[contestant.label]
                    if freeze:
                        focus_awake(server, servers.values(), prompts[0], plan.sampling, plan.timeout_s)
                    passes[contestant.label, repeat].append(_phase(server, prompts, plan, load))
                    on_phase(contestant.label, repeat, index)
                turn += 1
    finally:
        for server in servers.values():
            server.stop()
    return [TraceRun(c.label, r, tuple(passes[c.label, r])) for r in range(plan.repeats) for c in contestants]


def _one_at_a_time(contestants: Sequence[Contestant], prompts: Sequence[PromptTokens], plan: TracePlan,
                   on_phase: OnPhase) -> list[TraceRun]:
    """Each repeat, each contestant (reversed order every other repeat) on a fresh server, the only one
    alive: warm, then every phase (for a machine where the contestants' servers do not fit at once)."""
    runs = []
    for repeat in range(plan.repeats):
        for contestant in contestants if repeat % 2 == 0 else list(reversed(contestants)):
            server = VllmServer.start(contestant.launch)
            try:
                _warm(server, prompts, plan)
                passes = []
                for index, load in enumerate(plan.phases):
                    passes.append(_phase(server, prompts, plan, load))
                    on_phase(contestant.label, repeat, index)
            finally:
                server.stop()
            runs.append(TraceRun(contestant.label, repeat, tuple(passes)))
    return runs


def _warm(server: VllmServer, prompts: Sequence[PromptTokens], plan: TracePlan) -> None:
    """Untimed: every prompt once, so no timed request is a prompt length's first."""
    run_pass(server.url, SERVED_NAME, prompts, 1, plan.sampling, plan.timeout_s)


def _phase(server: VllmServer, prompts: Sequence[PromptTokens], plan: TracePlan, load: int) -> PassRecord:
    return run_pass(server.url, SERVED_NAME, cycled(prompts, load, plan.rounds), load, plan.sampling, plan.timeout_s)


def summarise(runs: Sequence[TraceRun], phases: Sequence[int]) -> list[ContestantSummary]:
    """Per contestant (in first-run order): each phase's throughput, latencies and ratio to no speculation."""
    baseline = {run.repeat: run for run in runs if run.label == NO_SPECULATION}
    labels = list(dict.fromkeys(run.label for run in runs))
    summaries = []
    for label in labels:
        mine = sorted((run for run in runs if run.label == label), key=lambda run: run.repeat)
        per_phase = []
        for index, load in enumerate(phases):
            passes = [run.passes[index] for run in mine]
            ratios = tuple(run.passes[index].tokens_per_s / baseline[run.repeat].passes[index].tokens_per_s
                           for run in mine if run.repeat in baseline)
            per_phase.append(PhaseSummary(load, statistics.median(p.tokens_per_s for p in passes), latencies(passes),
                                          ratios))
        whole = tuple(run.tokens_per_s / baseline[run.repeat].tokens_per_s for run in mine if run.repeat in baseline)
        summaries.append(ContestantSummary(label, tuple(per_phase), statistics.median(r.tokens_per_s for r in mine),
                                           whole))
    return summaries


def outputs_of(runs: Sequence[TraceRun], label: str, prompt_ids: Sequence[str]) -> list[list[tuple[int, ...]]]:
    """Per prompt: every output the contestant gave it, over every phase and repeat (what a certificate checks)."""
    outputs: dict[str, list[tuple[int, ...]]] = {prompt: [] for prompt in prompt_ids}
    for run in runs:
        if run.label == label:
            for record in run.passes:
                for request in record.requests:
                    outputs[request.prompt_id].append(request.token_ids)
    return [outputs[prompt] for prompt in prompt_ids]


@dataclass(frozen=True)
class Verdict:
    """The trace's two aims, as measured."""

    slower_phases: tuple[int, ...]  # phase indices where the schedule was slower than no speculation in every repeat
    best_fixed: str | None  # the fixed contestant fastest over the whole trace
    over_best_fixed: float | None  # the schedule's trace throughput over that one's (medians)


def judge(summaries: Sequence[ContestantSummary], schedule: str, fixed: Sequence[str]) -> Verdict:
    by_label = {summary.label: summary for summary in summaries}
    mine = by_label[schedule]
    slower = tuple(i for i, phase in enumerate(mine.phases) if phase.vs_no_speculation and max(phase.vs_no_speculation) < 1)
    rivals = [by_label[label] for label in fixed if label in by_label]
    if not rivals:
        return Verdict(slower, None, None)
    best = max(rivals, key=lambda summary: summary.tokens_per_s)
    return Verdict(slower, best.label, mine.tokens_per_s / best.tokens_per_s)
