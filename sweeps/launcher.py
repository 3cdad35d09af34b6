"""Run a sweep: store first, then Ray, workers holding the pair, and Tune over the spec's space.

Order matters for failing fast: the caller reaches the database first (`connect`), then
the spec, prompts and local model paths are checked, and only then does Ray start, so
a bad URL or spec costs seconds, not a cluster.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from spectune.pair_ref import PairError, PairRef
from spectune.paths import cache_dir
from spectune.prompts import Prompt, load_prompts
from spectune.sweeps.spec import SweepSpec

if TYPE_CHECKING:
    from spectune.store import Store
    from spectune.workers.trials.pair_worker import WorkerPool

TRIAL_STATES_UNFINISHED = ("pending", "running")


class SweepFailed(RuntimeError):
    """The sweep cannot start or go on; the message says why in one line."""


@dataclass(frozen=True)
class SweepOptions:
    address: str | None = None  # Ray address: None = $RAY_ADDRESS or a new local cluster; "auto"; "ray://..."
    resume: bool = False
    storage: str | None = None  # Tune's results folder (default: ~/.cache/spectune/ray_results)
    store_retry_s: float = 120.0  # at the end, how long to wait for an unreachable store before failing


@dataclass(frozen=True)
class SweepOutcome:
    name: str
    status: str  # done | interrupted
    trials: int
    failed: int
    wall_s: float
    experiment_path: str
    workers: list[dict[str, Any]] = field(default_factory=list)  # each worker's counters (pair_loads, ...)


def default_storage() -> Path:
    return cache_dir("ray_results")


def storage_path(options: SweepOptions) -> str:
    if options.storage and "://" in options.storage:  # s3://, gs://: shared storage for multi-node clusters
        return options.storage
    return str(Path(options.storage).expanduser().resolve() if options.storage else default_storage())


def store_key(store_url: str) -> str:
    """A folder name for one results store: Tune's state is kept per store and sweep name, so the same
    spec run into another `--db` starts a sweep of its own. From the URL without its password."""
    from spectune.store import mask_url

    masked = mask_url(store_url)
    backend = masked.split(":", 1)[0].split("+", 1)[0]
    return f"{backend}-{hashlib.sha256(masked.encode()).hexdigest()[:12]}"


def experiment_path(spec: SweepSpec, options: SweepOptions, store_url: str) -> str:
    return f"{storage_path(options).rstrip('/')}/{store_key(store_url)}/{spec.name}"


def run_sweep(spec: SweepSpec, store: Store, options: SweepOptions = SweepOptions(),
              console: Console | None = None) -> SweepOutcome:
    """Run (or resume) a sweep to the end, writing to `store` (connect it first: `spectune.store.connect`,
    which fails fast on an unreachable database). Raises SweepFailed before any trial starts."""
    console = console or Console()
    prompts = _prompts(spec)
    if options.address is None and not os.environ.get("RAY_ADDRESS"):
        check_local_pair(spec.pair)  # on a cluster the paths may exist only on the workers
    _check_new_or_resumable(store, spec, options)
    return _run(store, spec, prompts, options, console)


def _mark(store: Store, name: str, status: str, cause: BaseException) -> None:
    """Set the sweep's status on the way out of a failure; if the store fails too, say so on the
    first error instead of replacing it (the first error is the one to read)."""
    try:
        store.set_sweep_status(name, status)
    except Exception as err:  # noqa: BLE001 - never hide `cause`
        cause.add_note(f"(the sweep's status could not be set to {status!r} in {store.url} either: "
                       f"{type(err).__name__}: {' '.join(str(err).split())[:200]})")


def _prompts(spec: SweepSpec) -> tuple[Prompt, ...]:
    try:
        return tuple(load_prompts(spec.prompts.set, spec.prompts.limit))
    except ValueError as err:  # PromptFileError
        raise SweepFailed(f"prompts.set: {err}") from None


def check_local_pair(pair: PairRef) -> None:
    """Local model folders must exist here (hub ids, "org/name", are left to `from_pretrained`)."""
    try:
        pair.check_local()
    except PairError as err:
        raise SweepFailed(str(err)) from None


def _check_new_or_resumable(store: Store, spec: SweepSpec, options: SweepOptions) -> None:
    from ray.tune import Tuner

    path = experiment_path(spec, options, store.url)
    stored = store.get_sweep(spec.name)
    if options.resume:
        if not Tuner.can_restore(path):
            raise SweepFailed(f"nothing to resume: no Tune state for sweep {spec.name!r} at {path}")
        if stored is not None and stored.spec != spec.model_dump(mode="json"):
            changed = sorted(k for k in set(stored.spec) | set(spec.model_dump(mode="json"))
                             if stored.spec.get(k) != spec.model_dump(mode="json").get(k))
            raise SweepFailed(f"sweep {spec.name!r} was started with another spec (differs in: {', '.join(changed)}); "
                              "resume with the same spec or start a sweep under a new name")
        return
    if stored is not None:
        raise SweepFailed(f"a sweep named {spec.name!r} is already in the store; resume it with --resume "
                          "or give the spec another name")
    if Tuner.can_restore(path):
        raise SweepFailed(f"Tune state for a sweep named {spec.name!r} already exists at {path}; "
                          "resume it with --resume, or use another name or --storage")


class _QuietTrialFailures(logging.Filter):
    """Tune logs every failed trial with a traceback; a TrialFailed is already a one-line result."""

    def filter(self, record: logging.LogRecord) -> bool:
        from spectune.sweeps.trainable import TrialFailed

        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(getattr(error, "cause", error), TrialFailed)


@contextmanager
def _quiet_tune() -> Iterator[None]:
    """Our progress lines replace Tune's tables; the store replaces its CSV and TensorBoard logs.

    Tune reads these switches from the environment: set for the sweep, then put back
    (a user's own setting wins).
    """
    switches = {"RAY_AIR_NEW_OUTPUT": "0",  # the legacy reporter honours verbose=0
                "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1"}
    added = {k: v for k, v in switches.items() if k not in os.environ}
    quiet = _QuietTrialFailures()
    controller_log = logging.getLogger("ray.tune.execution.tune_controller")
    os.environ.update(added)
    controller_log.addFilter(quiet)
    try:
        yield
    finally:
        controller_log.removeFilter(quiet)
        for key in added:
            os.environ.pop(key, None)


def _start_ray(address: str | None) -> bool:
    """Connect to (or start) Ray; True when this call started it (so we shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    if address is None and not os.environ.get("RAY_ADDRESS"):
        ray.init(include_dashboard=False, log_to_driver=False)  # a local cluster for this sweep
        return True
    where = address or os.environ["RAY_ADDRESS"]
    _check_reachable(where)
    try:
        ray.init(address=address, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise SweepFailed(f"cannot reach Ray at {where}: {' '.join(str(err).split())}") from None
    return True


def _check_reachable(address: str) -> None:
    """A host:port that refuses connections fails now, not after Ray's minutes of retries."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # "auto" and the like: Ray resolves those itself, quickly
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as err:
        raise SweepFailed(f"cannot reach Ray at {address}: {err.strerror or err}") from None


@dataclass(frozen=True)
class NodeCapacity:
    """What one live Ray node offers (its totals: a slot must fit on one node, never across two)."""

    name: str
    cpus: float
    gpus: float


def live_nodes() -> list[NodeCapacity]:
    import ray

    from spectune.cluster import node_name

    return [NodeCapacity(node_name(n["Resources"], n["NodeManagerAddress"]),
                         n["Resources"].get("CPU", 0.0), n["Resources"].get("GPU", 0.0))
            for n in ray.nodes() if n.get("Alive")]


def slots_on(nodes: list[NodeCapacity], cpus: float, gpus: float) -> int:
    """Trial slots the nodes hold: each node's own count, summed (a worker is one process on one node)."""
    def on(node: NodeCapacity) -> int:
        fit = math.floor(node.cpus / cpus + 1e-9)
        return min(fit, math.floor(node.gpus / gpus + 1e-9)) if gpus > 0 else fit

    return sum(on(node) for node in nodes)


def workers_that_fit(spec: SweepSpec, nodes: list[NodeCapacity] | None = None) -> int:
    """Trial slots the cluster can hold now; none is an error naming the largest node (a request no
    node can meet would leave trials pending forever, even where the cluster's total would cover it)."""
    nodes = live_nodes() if nodes is None else nodes
    need = spec.resources
    fit = slots_on(nodes, need.cpus, need.gpus)
    if fit < 1:
        largest = max(nodes, key=lambda n: (n.gpus, n.cpus), default=NodeCapacity("none", 0.0, 0.0))
        raise SweepFailed(f"resources: a trial needs {need.cpus:g} CPUs and {need.gpus:g} GPUs on one node; "
                          f"the largest of the cluster's {len(nodes)} node(s), {largest.name}, has "
                          f"{largest.cpus:g} CPUs and {largest.gpus:g} GPUs")
    return min(spec.concurrency, fit)


def _room_for(spec: SweepSpec) -> int:
    """Workers the live nodes hold room for now, up to the spec's concurrency (0 while none fits)."""
    need = spec.resources
    return min(spec.concurrency, slots_on(live_nodes(), need.cpus, need.gpus))


def _run(store: Store, spec: SweepSpec, prompts: tuple[Prompt, ...], options: SweepOptions, console: Console) -> SweepOutcome:
    import ray

    from spectune.workers.trials.pair_worker import PoolKeeper, check_software, pool_stats, wait_ready

    started_ray = _start_ray(options.address)
    pool, created = None, False
    started = time.perf_counter()
    try:
        slots = workers_that_fit(spec)
        pair = spec.pair
        console.print(f"sweep {spec.name}: {spec.trials} trials, {spec.search} search, {slots} worker(s) "
                      f"loading {pair.target}", highlight=False, soft_wrap=True)
        pool = _start_workers(spec, slots)
        ready = wait_ready(pool)
        for answer in ready:
            if answer.error:
                raise SweepFailed(f"worker {answer.worker_id} cannot load the pair: {answer.error}")
        if problem := check_software(ready):  # a node running other code would fail trials in obscure ways
            raise SweepFailed(problem)
        # the sweep enters the store only once it can run: a failed start leaves nothing to clean up
        store.create_sweep(spec.name, spec.model_dump(mode="json"), resume=options.resume)
        created = True
        store.set_sweep_status(spec.name, "running")
        with _quiet_tune(), PoolKeeper(pool, wanted=lambda: _room_for(spec)):
            # Tune runs up to the spec's concurrency: trials beyond the workers wait for a lease, so a
            # node joining mid-sweep (the keeper starts workers on it) is used at once
            tuner, writer = _tuner(store, spec, options, prompts, {pair.pair_id: pool}, spec.concurrency, console)
            results = tuner.fit()
        if options.resume:  # results an earlier driver could not store (it gave up on the database)
            writer.reconcile(results)
        _flush(writer, store, options)
        workers = pool_stats(pool)
    except KeyboardInterrupt as err:
        if created:
            _mark(store, spec.name, "interrupted", err)
        raise
    except BaseException as err:
        if created:
            _mark(store, spec.name, "error", err)
        raise
    finally:
        if pool is not None:
            _stop_pool(pool)
        if started_ray:
            ray.shutdown()
    return _finish(store, spec, options, time.perf_counter() - started, workers)


def _tuner(store: Store, spec: SweepSpec, options: SweepOptions, prompts: tuple[Prompt, ...],
           pools: dict[str, WorkerPool], slots: int, console: Console) -> Any:
    from ray import tune
    from ray.tune.logger import JsonLoggerCallback  # result.json: what Tune's ResultGrid reads back

    from spectune.sweeps.callback import LeaseReclaimer, ProgressCallback, StoreCallback
    from spectune.sweeps.space import num_samples, param_space, searcher
    from spectune.sweeps.trainable import SweepContext, run_trial
    from spectune.workers.trials.pair_worker import TRIAL_CPU_SHARE

    stored = _stored_results(store, spec) if options.resume else {}
    context = SweepContext.of(spec, pools, prompts, stored)
    # the trial only waits on its leased worker, which holds the slot's CPUs and GPUs
    trainable = tune.with_resources(tune.with_parameters(run_trial, context=context), {"cpu": TRIAL_CPU_SHARE})
    reclaimer = LeaseReclaimer().attach(pools)
    store_callback = StoreCallback(spec.name).attach(store, console, reclaimer)
    first = spec.objectives[0]
    progress = ProgressCallback(spec.trials, first.metric, first.mode).attach(console)
    path = experiment_path(spec, options, store.url)
    if options.resume:
        tuner = tune.Tuner.restore(path, trainable, resume_errored=True)
        return tuner, _reattach_callbacks(tuner, store, console, pools, frozenset(stored))
    return tune.Tuner(
        trainable,
        param_space=param_space(spec),
        tune_config=tune.TuneConfig(search_alg=searcher(spec, slots), num_samples=num_samples(spec), reuse_actors=True),
        run_config=tune.RunConfig(name=spec.name, storage_path=path.rsplit("/", 1)[0], verbose=0,
                                  callbacks=[reclaimer, store_callback, progress, JsonLoggerCallback()]),
    ), store_callback


def _stored_results(store: Store, spec: SweepSpec) -> dict[str, dict[str, Any]]:
    """Trials the store holds as done, by Tune trial id, with the objectives they reported.

    Tune saves its state every few seconds, so a driver killed just after storing a trial leaves
    Tune believing it unfinished; a resume reports these instead of running them again."""
    trials = store.trials_frame(spec.name)
    done = trials[trials.status == "done"]
    names = [o.metric for o in spec.objectives]
    reported = {str(key): store.trial_detail(int(tid))["metrics"] or {} for key, tid in zip(done.trial_key, done.trial_id)}
    return {key: {name: metrics.get(name) for name in names} for key, metrics in reported.items()}


def _reattach_callbacks(tuner: Any, store: Store, console: Console, pools: dict[str, WorkerPool],
                        stored: frozenset[str]) -> Any:
    """Tune restores the callbacks it pickled, without their store and console; give them back.

    There is no public accessor for a restored Tuner's RunConfig (ray-project/ray#41364).
    """
    from spectune.sweeps.callback import LeaseReclaimer, ProgressCallback, StoreCallback

    local_tuner = getattr(tuner, "_local_tuner", None)
    if local_tuner is None:
        raise SweepFailed("this Ray version keeps a restored Tuner's callbacks out of reach; cannot resume into the store")
    writer, callbacks = None, local_tuner.get_run_config().callbacks or []
    reclaimer = next((c.attach(pools) for c in callbacks if isinstance(c, LeaseReclaimer)), None)
    for callback in callbacks:
        if isinstance(callback, StoreCallback):
            writer = callback.attach(store, console, reclaimer, stored)
        elif isinstance(callback, ProgressCallback):
            callback.attach(console)
    if writer is None:
        raise SweepFailed("the restored sweep has no store callback; cannot resume into the store")
    return writer


def _flush(writer: Any, store: Store, options: SweepOptions) -> None:
    """Every buffered write stored, waiting up to `store_retry_s` for an unreachable database."""
    if writer.flush(options.store_retry_s):
        return
    raise SweepFailed(f"cannot write {len(writer.pending)} result(s) to {store.url} ({writer.outage}) after "
                      f"retrying {options.store_retry_s:.0f} s; Tune keeps every result: run the same command "
                      "with --resume once the database is back")


def _start_workers(spec: SweepSpec, slots: int) -> WorkerPool:
    """One worker per slot, of the spec's backend (spectune's engine: pair workers; vllm: vLLM workers)."""
    from spectune.backends import BACKENDS

    backend, need = BACKENDS.get(spec.backend), spec.resources
    return backend.start_workers(spec.pair, slots, need.cpus, need.gpus, backend.settings_of(spec))


def _stop_pool(pool: WorkerPool) -> None:
    """Workers hold CPUs/GPUs: release them even when the driver's Ray outlives the sweep."""
    import ray

    # vLLM workers stop the servers they started first (a killed actor leaves them a SIGTERM only)
    stopping = [w.shutdown.remote() for w in pool.workers if _has_method(w, "shutdown")]
    if stopping:
        ray.wait(stopping, num_returns=len(stopping), timeout=60)
    for worker in pool.workers:
        ray.kill(worker)
    pool.stop()


def _has_method(actor: Any, name: str) -> bool:
    try:
        getattr(actor, name)
    except AttributeError:
        return False
    return True


def _finish(store: Store, spec: SweepSpec, options: SweepOptions, wall_s: float, workers: list[dict[str, Any]]) -> SweepOutcome:
    from spectune.sweeps.callback import STORE_UNREACHABLE, retry_store, unreachable_reason

    try:
        trials = retry_store(lambda: store.trials_frame(spec.name), options.store_retry_s)
        unfinished = int(trials["status"].isin(TRIAL_STATES_UNFINISHED).sum())
        status = "interrupted" if unfinished else "done"  # Tune stops on Ctrl-C and saves its state
        retry_store(lambda: store.set_sweep_status(spec.name, status), options.store_retry_s)
    except STORE_UNREACHABLE as err:
        raise SweepFailed(f"cannot reach {store.url} to finish the sweep ({unreachable_reason(err)}); every result "
                          "is stored: run the same command with --resume once the database is back") from None
    failed = int((trials["status"] == "error").sum())
    return SweepOutcome(spec.name, status, len(trials), failed, wall_s, experiment_path(spec, options, store.url),
                        workers)
