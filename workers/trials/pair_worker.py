"""The Ray actor that holds one loaded target/drafter pair and runs trial after trial on it.

Loading a pair per trial would dominate a sweep (minutes for a 7B target), so the sweep
driver starts a few of these per pair and trials lease them (`WorkerPool`). Every trial
measures AR and its configuration interleaved prompt by prompt within each repeat
(`spectune.bench.measure`), so its speedup is a ratio of times taken seconds apart: the
machine's speed drifting over minutes cancels out. The trial's AR speed rides back with
it and the driver keeps the latest per (pair, prompts, hardware, settings).

Resources: a trial slot is the worker (cpus - TRIAL_CPU_SHARE CPUs, all of the slot's
GPUs) plus the Tune trial that leases it (TRIAL_CPU_SHARE CPUs); the trial only waits.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import ray
from pydantic import ValidationError
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.queue import Queue

from spectune.config import DecodeConfig, Settings
from spectune.pair_ref import PairRef
from spectune.prompts import Prompt
from spectune.results import BaselineResult, DecodeResult
from spectune.validation import one_line

# Trials import this module too, and a trial process only waits: torch, transformers and the
# engine are imported inside the worker's methods, so a trial process starts in a second or two.

TRIAL_CPU_SHARE = 0.001  # what a Tune trial reserves: it only waits on its worker


@dataclass(frozen=True)
class TrialRequest:
    config: DecodeConfig  # at the trial's temperature (its only home)
    settings: Settings  # the sweep's, one for every trial
    prompts: tuple[Prompt, ...]


@dataclass(frozen=True)
class TrialOutcome:
    """What a worker returns: metrics (or the error that stopped the trial) and where it ran."""

    hardware: dict[str, Any]
    worker: dict[str, Any]
    result: DecodeResult | None = None
    error: str | None = None
    baselines: tuple[BaselineResult, ...] = ()  # the trial's paired AR speed: the driver stores it
    decode_s: float = 0.0  # seconds inside decoding (AR's and the configuration's passes, plus a first settling pass)


@dataclass(frozen=True)
class WorkerReady:
    worker_id: str
    hardware: dict[str, Any]
    load_s: float
    error: str | None = None
    node: str | None = None  # the Ray node it runs on (`this_node`)
    software: dict[str, str] = field(default_factory=dict)  # spectune / Ray / Python there (`cluster.software`)


@dataclass
class WorkerCounters:
    pair_loads: int = 0
    baselines_measured: int = 0  # paired AR measurements: one per successful trial
    trials_run: int = 0
    trials_failed: int = 0


def prompt_set_hash(prompts: Sequence[Prompt]) -> str:
    text = json.dumps([[p.id, p.prompt] for p in prompts], ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def error_text(err: BaseException) -> str:
    """One line. Our ValueErrors already say what is wrong; anything else is named by its type."""
    if isinstance(err, ValidationError):
        return one_line(err, locations=False)
    message = " ".join(str(err).split())
    return message if isinstance(err, ValueError) and message else f"{type(err).__name__}: {message}"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass  # not Linux: fall back to what the platform module knows
    return platform.processor() or platform.machine()


def this_node() -> str:
    """The Ray node this process runs on, as "name/id": the name `spectune cluster up` gave it (else its
    IP), and the first 8 hex digits of its node id (nodes on one machine share an IP)."""
    from spectune.cluster import node_name

    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node["NodeID"] == node_id:
            return f"{node_name(node['Resources'], node['NodeManagerAddress'])}/{node_id[:8]}"
    return node_id[:8]


def software() -> dict[str, str]:
    from spectune.cluster import software as of_this_process

    return of_this_process()


def check_software(ready: Sequence[WorkerReady]) -> str | None:
    """The first worker whose node runs other code than the driver (`cluster.mismatch`), else None."""
    from spectune.cluster import mismatch

    here = software()
    for answer in ready:
        problem = mismatch(here, answer.software, f"node {answer.node or answer.worker_id}")
        if problem is not None:
            return problem
    return None


def describe_hardware(device: str, threads: int) -> dict[str, Any]:
    import torch
    import transformers

    on_gpu = device.startswith("cuda") and torch.cuda.is_available()
    return {
        "device": torch.device(device).type,
        "cpu_model": cpu_model(),
        "gpu_model": torch.cuda.get_device_name(torch.device(device)) if on_gpu else None,
        "n_cpus": threads,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "hostname": socket.gethostname(),
        "host_cpus": os.cpu_count(),
    }


class PairWorker:
    """Loads the pair in __init__ (once), then runs trials; every trial error is returned, never raised."""

    def __init__(self, source: PairRef, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)  # the trial's CPUs, whatever OMP_NUM_THREADS said
        self.source = source
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"
        self.node = this_node()
        self.software = software()
        self.counters = WorkerCounters()
        self.hardware = describe_hardware(source.device, threads)
        self.settled: set[tuple[str, Settings, float, str]] = set()  # prompt sets this process has decoded once, untimed
        self.pair, self.load_error, self.load_s = None, None, 0.0
        self.in_dtype: dict[str, Any] = {}  # the pair in other dtypes (a sweep's dtype axis), loaded when asked
        started = time.perf_counter()
        try:
            from spectune.pair import load_pair

            self.pair = load_pair(source)
            self.counters.pair_loads += 1
        except (ValueError, OSError, RuntimeError) as err:  # PairError is a ValueError; OOM a RuntimeError
            self.load_error = error_text(err)
        self.load_s = time.perf_counter() - started

    def ready(self) -> WorkerReady:
        return WorkerReady(self.worker_id, self.hardware, self.load_s, self.load_error, self.node, self.software)

    def stats(self) -> dict[str, Any]:
        return {"worker_id": self.worker_id, "node": self.node, "pair_id": self.source.pair_id,
                **asdict(self.counters)}

    def run(self, request: TrialRequest) -> TrialOutcome:
        from spectune.bench import contender, measure

        self.counters.trials_run += 1
        if self.pair is None:
            return self._failed(f"the worker could not load the pair: {self.load_error}", 0.0)
        started = time.perf_counter()
        try:
            settings = request.settings
            pair = self._pair_in(request.config.dtype)
            self._settle(pair, request.prompts, settings, request.config.temperature)
            result = measure(pair, contender(pair, request.config), request.prompts, settings)
        except Exception as err:  # noqa: BLE001 - any failure is this trial's result; the sweep goes on
            self._free_gpu_memory()
            return self._failed(error_text(err), time.perf_counter() - started)
        self.counters.baselines_measured += 1
        decode_s = time.perf_counter() - started
        baseline = self._baseline(request, result, decode_s, pair.ref.dtype)
        return TrialOutcome(self.hardware, self._worker_info(), result, None, (baseline,), decode_s)

    def _pair_in(self, dtype: str | None) -> Any:
        """The pair in a trial's dtype (a sweep's `dtypes` axis): the source's, or loaded once beside it."""
        if dtype is None or dtype == self.source.dtype:
            return self.pair
        if dtype not in self.in_dtype:
            from spectune.pair import load_pair

            self.in_dtype[dtype] = load_pair(self.source.model_copy(update={"dtype": dtype}))
            self.counters.pair_loads += 1
        return self.in_dtype[dtype]

    def _settle(self, pair: Any, prompts: tuple[Prompt, ...], settings: Settings, temperature: float) -> None:
        """The first time this process meets a prompt set: one untimed AR pass (see `bench.settle`)."""
        from spectune.bench import settle

        key = (prompt_set_hash(prompts), settings, temperature, pair.ref.dtype)
        if key not in self.settled:
            settle(pair, prompts, settings, temperature)
            self.settled.add(key)

    def _baseline(self, request: TrialRequest, result: DecodeResult, measured_s: float, dtype: str) -> BaselineResult:
        return BaselineResult(
            pair_id=self.source.model_copy(update={"dtype": dtype}).pair_id,
            prompt_set_hash=prompt_set_hash(request.prompts),
            max_new_tokens=request.settings.max_new_tokens,
            temperature=request.config.temperature,
            ar_tokens_per_s=result.ar_tokens_per_s,
            target_path=self.source.target,
            drafter_path=self.source.drafter,
            measured_s=measured_s,
        )

    def _failed(self, message: str, decode_s: float) -> TrialOutcome:
        self.counters.trials_failed += 1
        return TrialOutcome(self.hardware, self._worker_info(), None, message, (), decode_s)

    def _worker_info(self) -> dict[str, Any]:
        return {"worker_id": self.worker_id, "node": self.node, "pair_loads": self.counters.pair_loads,
                "trials_run": self.counters.trials_run, "load_s": self.load_s}

    def _free_gpu_memory(self) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # after an out-of-memory trial the next one starts clean


RemotePairWorker = ray.remote(PairWorker)

# A worker process that dies (OOM-killed, a segfault in a kernel, SIGKILL) is restarted by Ray with
# the same arguments, so it reloads the pair; the trial it was running fails (tasks are not retried:
# a trial is measured once). After this many restarts a worker is dead for good and the pool
# replaces it (`PoolKeeper`).
WORKER_RESTARTS = 3


class LeaseBook:
    """The pool's free workers and who holds the others (a Ray actor on the driver's node).

    A lease is recorded under its holder (the Tune trial's id), so the driver can take back the
    worker of a trial whose own process died, a node lost with it, before it could give it back
    (`reclaim`): otherwise that worker would never run another trial.
    """

    def __init__(self, workers: Sequence[Any]) -> None:
        import asyncio

        self.free: list[Any] = list(workers)
        self.held: dict[str, Any] = {}
        self.holder_node: dict[str, str | None] = {}  # where each holder (a trial's process) runs
        self.gone: set[str] = set()  # holders the driver saw die: they take nothing more
        self.changed = asyncio.Condition()

    async def take(self, holder: str, node: str | None = None) -> Any:
        """A free worker for `holder` (waiting for one). Where the holder runs is noted from the moment it
        asks, so a holder that dies while waiting is still placed (`reclaim`)."""
        self.holder_node[holder] = node
        async with self.changed:
            await self.changed.wait_for(lambda: bool(self.free) or holder in self.gone)
            if holder in self.gone:  # it died while waiting: its request must not take a worker for good
                return None
            worker = self.free.pop(0)
            self.held[holder] = worker
            return worker

    async def put(self, worker: Any, holder: str | None = None) -> None:
        """`worker` free again (from `holder`, whose lease ends; None: a new or checked worker)."""
        async with self.changed:
            if holder is not None:
                self.held.pop(holder, None)
            self.free.append(worker)
            self.changed.notify_all()

    async def drop(self, holder: str) -> None:
        """`holder`'s lease ends without its worker coming back (it is dead: the keeper replaces it)."""
        self.held.pop(holder, None)

    async def reclaim(self, holder: str) -> str | None:
        """`holder` died: the worker it still holds is free again. The node it ran on ("unknown" if it did
        not say); None when it never asked for a worker."""
        async with self.changed:
            self.gone.add(holder)
            worker = self.held.pop(holder, None)
            if worker is not None:
                self.free.append(worker)
            self.changed.notify_all()  # and wakes its own request, if it was still waiting
            if worker is None and holder not in self.holder_node:
                return None
            return self.holder_node.get(holder) or "unknown"


RemoteLeaseBook = ray.remote(LeaseBook)


@dataclass
class WorkerPool:
    """The workers holding one pair; a trial leases one for its duration (`LeaseBook`).

    A lease never hands out a dead worker: it skips one that Ray is restarting (trying the others
    meanwhile: on a cluster that lost a node, a restart may wait for room that never comes), and
    retires one that is dead for good (onto `retired`, where the driver's `PoolKeeper` replaces it
    with `spawn()`).
    """

    pair_id: str
    workers: tuple[Any, ...]  # actor handles (the driver's view: replacements are added here)
    free: Any = field(compare=False)  # the LeaseBook actor
    retired: Queue | None = field(default=None, compare=False)
    spawn: Callable[[], Any] | None = field(default=None, compare=False, repr=False)  # a new worker, driver side

    @contextmanager
    def lease(self, holder: str) -> Iterator[Leased]:
        leased = self._live_worker(holder)
        try:
            yield leased
        finally:  # even after it died mid-trial: Ray restarts it; the next lease checks
            ray.get(self.free.put.remote(leased.worker, holder))

    def _live_worker(self, holder: str) -> Leased:
        here = this_node()
        while True:
            worker = ray.get(self.free.take.remote(holder, here))
            if worker is None:  # the driver saw this trial die (`reclaim`): nothing more is handed to it
                raise RuntimeError(f"trial {holder} was reclaimed by the driver while it waited for a worker")
            answer = answers(worker, LEASE_PROBE_S)
            if isinstance(answer, WorkerReady):
                return Leased(worker, answer.node)
            if answer == "dead" and self.retired is not None:  # out of circulation, the keeper replaces it
                ray.get(self.free.drop.remote(holder))
                self.retired.put(worker)
            else:  # restarting (or dead with no keeper): back of the queue, the next one is tried
                ray.get(self.free.put.remote(worker, holder))
                time.sleep(LEASE_PROBE_S)

    def reclaim(self, holder: str) -> str | None:
        """Driver side: the worker a dead trial still holds goes back to the free ones; the node the
        trial's process ran on, or None when it held no worker."""
        return ray.get(self.free.reclaim.remote(holder))

    def stop(self) -> None:
        ray.kill(self.free)
        if self.retired is not None:
            self.retired.shutdown(force=True)


@dataclass(frozen=True)
class Leased:
    worker: Any  # the actor handle
    node: str | None  # where it ran when leased (`this_node`), for a trial's record


LEASE_PROBE_S = 2.0  # a worker that does not answer within this is restarting: try another


def answers(worker: Any, timeout_s: float | None = None) -> WorkerReady | str:
    """The worker's `ready()` when it answers within `timeout_s` (None: waiting while Ray restarts it);
    "restarting" when it does not answer in time, "dead" when it is dead for good."""
    call = worker.ready.remote()
    try:
        return ray.get(call, timeout=timeout_s)
    except GetTimeoutError:
        ray.cancel(call)
        return "restarting"
    except RayActorError:
        return "dead"


class PoolKeeper:
    """Driver side, while a sweep runs: every worker a lease retired is replaced by a fresh one, which
    loads the pair, so no trial waits on a worker that cannot come back.

        with PoolKeeper(pool):
            tuner.fit()
    """

    def __init__(self, pool: WorkerPool, poll_s: float = 0.5, wanted: Callable[[], int] | None = None,
                 nodes_every_s: float = 5.0) -> None:
        self.pool = pool
        self.poll_s = poll_s
        self.wanted = wanted  # workers the cluster holds room for now (a node joined: more)
        self.nodes_every_s = nodes_every_s
        self.replaced = 0
        self.added = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="spectune-pool-keeper", daemon=True)

    def __enter__(self) -> PoolKeeper:
        if self.pool.retired is not None and self.pool.spawn is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _run(self) -> None:
        from ray.util.queue import Empty

        looked = time.monotonic()
        while not self._stop.is_set():
            if self.wanted is not None and time.monotonic() - looked >= self.nodes_every_s:
                self._grow()
                looked = time.monotonic()
            try:
                dead = self.pool.retired.get(block=True, timeout=self.poll_s)
            except Empty:
                continue
            fresh = self.pool.spawn()
            self.pool.workers = tuple(w for w in self.pool.workers if w != dead) + (fresh,)
            ray.kill(dead)
            self.replaced += 1
            ray.get(self.pool.free.put.remote(fresh))

    def _grow(self) -> None:
        """A node joined (the cluster holds room for more workers than the pool has): start them, and hand
        each out once it has loaded the pair. One that cannot load it is stopped, and growing ends there."""
        for _ in range(self.wanted() - len(self.pool.workers)):
            fresh = self.pool.spawn()
            self.pool.workers = (*self.pool.workers, fresh)
            try:
                ready = ray.get(fresh.ready.remote(), timeout=GROW_READY_S)
            except (GetTimeoutError, RayActorError):
                ready = None
            if ready is None or ready.error is not None:
                self.pool.workers = tuple(w for w in self.pool.workers if w != fresh)
                ray.kill(fresh)
                self.wanted = None
                return
            self.added += 1
            ray.get(self.pool.free.put.remote(fresh))


GROW_READY_S = 600.0  # a worker on a joined node loads the pair within this


def start_pool(source: PairRef, size: int, cpus: float, gpus: float) -> WorkerPool:
    """`size` workers for one pair (they start loading at once); wait with `wait_ready`."""
    options = {**worker_options(cpus, gpus), "max_restarts": WORKER_RESTARTS, "max_task_retries": 0}
    threads = max(1, round(cpus))

    def spawn() -> Any:
        return RemotePairWorker.options(**options).remote(source, threads)

    return pool_of(source.pair_id, spawn, size)


def worker_options(cpus: float, gpus: float) -> dict[str, Any]:
    """A worker holds its slot's CPUs and GPUs; workers spread over nodes (one pair load per node first)."""
    return {"num_cpus": max(cpus - TRIAL_CPU_SHARE, TRIAL_CPU_SHARE), "num_gpus": gpus, "scheduling_strategy": "SPREAD"}


def pool_of(pair_id: str, spawn: Callable[[], Any], size: int) -> WorkerPool:
    """`size` workers from `spawn` and the queues that lease them. The queues live on the driver's node
    (the head on a cluster): losing a worker node must not lose the pool's bookkeeping."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = {"num_cpus": 0, "scheduling_strategy": NodeAffinitySchedulingStrategy(
        ray.get_runtime_context().get_node_id(), soft=False)}
    workers = tuple(spawn() for _ in range(size))
    book = RemoteLeaseBook.options(**here).remote(workers)
    return WorkerPool(pair_id, workers, book, Queue(actor_options=here), spawn)


def wait_ready(pool: WorkerPool) -> list[WorkerReady]:
    return ray.get([w.ready.remote() for w in pool.workers])


def pool_stats(pool: WorkerPool, timeout_s: float = 30.0) -> list[dict[str, Any]]:
    """The counters of each worker that answers (a worker Ray restarted counts from its restart); one
    lost with its node, or waiting for room to restart in, is left out rather than waited for."""
    calls = [w.stats.remote() for w in pool.workers]
    answered, _ = ray.wait(calls, num_returns=len(calls), timeout=timeout_s)
    stats = []
    for call in calls:
        if call not in answered:
            ray.cancel(call)
            continue
        try:
            stats.append(ray.get(call))
        except RayActorError:
            continue  # it died as it answered
    return stats
