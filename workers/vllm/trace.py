"""A mixed-load trace: concurrency stepping through phases (1, 4, 16, 4, 1), served by each contestant.

A schedule (`num_speculative_tokens_per_batch_size`) claims to beat every fixed configuration when load
changes. This is its proof, measured: every contestant (the schedule, each fixed configuration of its
family, no speculation) gets a fresh vLLM server, warmed once, then the same phases back to back; the
servers run one at a time (one alive: nothing idles beside the measured one) and the contestants take
turns in an order reversed every repeat, so a machine drifting over minutes hits each alike.

    phases      the concurrency of each phase; every prompt `rounds` times per phase, in full batches
    run_trace   every contestant's passes, repeat by repeat
    summarise   per phase and over the whole trace: throughput, TPOT, p95, and the ratio to no speculation
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from spectune.workers.vllm.load import Latencies, PassRecord, PromptTokens, Sampling, cycled, latencies, run_pass
from spectune.workers.vllm.server import Launch, VllmServer
from spectune.workers.vllm.worker import SERVED_NAME

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


def run_trace(contestants: Sequence[Contestant], prompts: Sequence[PromptTokens], phases: Sequence[int],
              sampling: Sampling, rounds: int = 2, repeats: int = 2, timeout_s: float = 300.0,
              on_phase: Callable[[str, int, int], None] = lambda label, repeat, phase: None) -> list[TraceRun]:
    """Each repeat, each contestant (reversed order every other repeat) on a fresh server: warm, then every phase."""
    runs = []
    for repeat in range(repeats):
        order = list(contestants) if repeat % 2 == 0 else list(reversed(contestants))
        for contestant in order:
            server = VllmServer.start(contestant.launch)
            try:
                run_pass(server.url, SERVED_NAME, prompts, 1, sampling, timeout_s)  # warm: every prompt length once
                passes = []
                for index, load in enumerate(phases):
                    passes.append(run_pass(server.url, SERVED_NAME, cycled(prompts, load, rounds), load,
                                           sampling, timeout_s))
                    on_phase(contestant.label, repeat, index)
            finally:
                server.stop()
            runs.append(TraceRun(contestant.label, repeat, tuple(passes)))
    return runs


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
