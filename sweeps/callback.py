"""Driver-side Tune callbacks: the only writer of the results store, and the progress lines.

Trials are keyed by Tune's trial id, and every store write is an upsert, so a resumed
sweep that re-runs or re-reports a trial replaces its row instead of adding one.

The store may go away mid-sweep (a database restarted, a network blip): a write that fails is
retried for a few seconds, then kept in order in a buffer that every later write and every
Tune step try to flush, so the sweep runs on and nothing is lost while the driver lives. At the
end the launcher flushes with a longer bound (`flush`) and fails naming the URL if the database
never came back; Tune's own state keeps every result, and `--resume` writes them (`reconcile`).

Tune pickles callbacks with the experiment (`tuner.pkl`) and restores *those* on
`Tuner.restore`; a database connection (and its password) must not travel that way, so
the store is attached at run time (`attach`) and dropped from the pickled state.
"""

from __future__ import annotations

import os
import re
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import sqlalchemy as sa
from ray import cloudpickle
from ray.exceptions import RayActorError
from ray.tune import Callback
from rich.console import Console

from spectune.config import DecodeConfig
from spectune.results import BaselineResult, DecodeResult
from spectune.sweeps.space import trial_config
from spectune.sweeps.trainable import PAYLOAD, TrialFailed, first_line


def stored_config(tune_config: Mapping[str, Any]) -> DecodeConfig:
    """The trial's configuration with the store columns its method declares (the driver has the registries)."""
    from spectune.backends import BACKENDS

    return BACKENDS.config(trial_config(tune_config))


Write = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]  # a store method bound at run time, its arguments


def error_message(trial: Any, died_on: str | None = None) -> str:
    """The trial's error as one line: the worker's message for a TrialFailed, else the exception's.

    Read from the trial's local error files: when the callback runs they are not yet
    synced to the experiment's storage, where `Trial.get_pickled_error` looks.
    """
    cause = _pickled_error(trial)
    if isinstance(cause, TrialFailed):
        return str(cause)
    if died_on is not None:  # the trial's own process died (its node lost) after asking for a worker
        return f"the trial's process died on node {died_on} ({type(cause).__name__}); any worker it held was taken back"
    if isinstance(cause, RayActorError):  # it died before asking for a worker: where it ran is not known
        return f"the trial's process died before it leased a worker (its node lost?): {first_line(cause)}"
    if cause is not None:
        return f"{type(cause).__name__}: {' '.join(str(cause).split())}"
    return _last_error_line(trial) or "the trial failed without an error message"


def error_node(trial: Any) -> str | None:
    """The node the failed trial's worker ran on, when the trial could say (a TrialFailed carries it)."""
    cause = _pickled_error(trial)
    return cause.node if isinstance(cause, TrialFailed) else None


def _pickled_error(trial: Any) -> BaseException | None:
    path = trial.pickled_error_file
    if not path or not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        error = cloudpickle.load(f)
    return getattr(error, "cause", None) or error  # RayTaskError wraps what the trainable raised


def _last_error_line(trial: Any) -> str | None:
    path = trial.error_file
    if not path or not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    return lines[-1] if lines else None


# A database that cannot be reached right now (refused, reset, timed out, SQLite locked): retried.
STORE_UNREACHABLE = (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.DisconnectionError)
WRITE_RETRY_S = 5.0  # how long one write keeps retrying before it waits in the buffer
FLUSH_EVERY_S = 2.0  # while writes wait, a Tune step tries the store again this often


def retry_store(call: Callable[[], Any], budget_s: float) -> Any:
    """`call()`, retried with backoff while the database is unreachable, for up to `budget_s`."""
    deadline, pause = time.monotonic() + budget_s, 0.25
    while True:
        try:
            return call()
        except STORE_UNREACHABLE:
            if time.monotonic() + pause > deadline:
                raise
            time.sleep(pause)
            pause = min(pause * 2, 5.0)


def unreachable_reason(err: BaseException) -> str:
    orig = getattr(err, "orig", None) or err
    return " ".join(str(orig).split()) or type(orig).__name__


class StoreCallback(Callback):
    """Writes every trial's status, metrics, hardware and the workers' AR baselines, in order,
    buffering what the store cannot take right now (see the module's docstring)."""

    def __init__(self, sweep: str) -> None:
        self.sweep = sweep
        self.store: Any = None  # spectune.store.Store, attached by the launcher
        self.console: Any = None
        self.reclaimer: LeaseReclaimer | None = None
        self.seen: set[str] = set()
        self.pending: deque[Write] = deque()  # writes not yet stored
        self.configs: dict[str, DecodeConfig] = {}  # trial id -> its configuration with store columns, made once
        self.outage: str | None = None  # why the store is unreachable, while it is
        self._last_try = 0.0
        self.stored: frozenset[str] = frozenset()  # a resumed sweep: trials the store holds as done, left as they are

    def attach(self, store: Any, console: Any = None, reclaimer: LeaseReclaimer | None = None,
               stored: frozenset[str] = frozenset()) -> StoreCallback:
        """`reclaimer` (listed before this callback) says where a trial whose process died ran; `stored`: a resumed
        sweep's trials the store already holds as done (left as they are)."""
        self.store, self.console, self.reclaimer, self.stored = store, console, reclaimer, stored
        return self

    def __getstate__(self) -> dict[str, Any]:
        # pending writes stay with this driver: a resumed sweep rewrites every result from Tune's state
        return {"sweep": self.sweep, "store": None, "console": None, "reclaimer": None, "seen": set(), "pending": deque(),
                "configs": {}, "outage": None, "_last_try": 0.0, "stored": frozenset()}

    # --- writing ------------------------------------------------------------------------------

    def _write(self, write: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.pending.append((write, args, kwargs))
        self.flush(0.0 if self.outage else WRITE_RETRY_S)

    def flush(self, budget_s: float = 0.0) -> bool:
        """Store every pending write in order, retrying for up to `budget_s`; True when none is left."""
        self._last_try = time.monotonic()
        while self.pending:
            write, args, kwargs = self.pending[0]
            try:
                retry_store(lambda: write(*args, **kwargs), budget_s)
            except STORE_UNREACHABLE as err:
                self._down(unreachable_reason(err))
                return False
            self.pending.popleft()
        if self.outage is not None:
            self.outage = None
            self._say(f"[green]store {self.store.url} is back[/]: every buffered result is stored")
        return True

    def _down(self, reason: str) -> None:
        if self.outage is None:
            self._say(f"[yellow]store {self.store.url} unreachable[/] ({reason}); results wait in memory "
                      "and are written when it is back")
        self.outage = reason

    def _say(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text, highlight=False, soft_wrap=True)

    def reconcile(self, results: Any) -> int:
        """Write every finished trial Tune holds a result for and the store does not (a resumed sweep:
        results whose write was lost when an earlier driver gave up on the store); returns how many."""
        written = 0
        for result in results:
            metrics = result.metrics or {}
            key = str(metrics.get("trial_id") or "")
            if result.error is None and metrics.get(PAYLOAD) and key and key not in self.stored:
                self._record(key, result.config, metrics[PAYLOAD])
                written += 1
        return written

    def _record(self, trial_id: str, tune_config: Mapping[str, Any], payload: Mapping[str, Any]) -> None:
        outcome = DecodeResult.from_dict(payload["result"], config=self._config(trial_id, tune_config))
        self._write(self.store.record_result, self.sweep, trial_id, outcome, payload["hardware"],
                    node=payload.get("node"))
        for baseline in payload["baselines"]:
            self._write(self.store.save_baseline, BaselineResult(**baseline), payload["hardware"],
                        extra={"sweep": self.sweep})

    def _config(self, trial_id: str, tune_config: Mapping[str, Any]) -> DecodeConfig:
        """The trial's configuration with its store columns, made on the trial's first event and kept."""
        if trial_id not in self.configs:
            self.configs[trial_id] = stored_config(tune_config)
        return self.configs[trial_id]

    def _status(self, trial: Any, status: str, **extra: Any) -> None:
        config = self._config(trial.trial_id, trial.config)
        self._write(self.store.upsert_trial, self.sweep, trial.trial_id, config, status, **extra)

    # --- Tune's events --------------------------------------------------------------------------

    def on_step_begin(self, iteration: int, trials: list[Any], **info: Any) -> None:
        if self.pending and time.monotonic() - self._last_try >= FLUSH_EVERY_S:
            self.flush()
        for trial in trials:  # new trials show up as pending before they start
            if trial.trial_id not in self.seen | self.stored and trial.status == "PENDING":
                self.seen.add(trial.trial_id)
                self._status(trial, "pending")

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.seen.add(trial.trial_id)
        if trial.trial_id not in self.stored:
            self._status(trial, "running")

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: Mapping[str, Any], **info: Any) -> None:
        if result[PAYLOAD] is not None:  # None: stored before a restart (`SweepContext.stored`)
            self._record(trial.trial_id, trial.config, result[PAYLOAD])

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        died_on = self.reclaimer.died_on.get(trial.trial_id) if self.reclaimer is not None else None
        self._status(trial, "error", error=error_message(trial, died_on), node=error_node(trial) or died_on)


class ProgressCallback(Callback):
    """One line per finished trial: how many are done and the best so far on the first objective."""

    def __init__(self, total: int, objective: str, mode: str) -> None:
        self.total = total
        self.objective = objective
        self.mode = mode
        self.console: Console | None = None
        self.finished: set[str] = set()
        self.best: tuple[float, str] | None = None
        self.counted_restored = False

    def attach(self, console: Console) -> ProgressCallback:
        self.console = console
        return self

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "console": None, "finished": set(), "best": None, "counted_restored": False}

    def on_step_begin(self, iteration: int, trials: list[Any], **info: Any) -> None:
        if self.counted_restored:
            return
        self.counted_restored = True  # a resumed sweep: count what finished before the restart
        for trial in trials:
            if trial.status in ("TERMINATED", "ERROR"):
                self.finished.add(trial.trial_id)
                self._consider(trial.last_result or {}, trial_config(trial.config).label())

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: Mapping[str, Any], **info: Any) -> None:
        label = trial_config(trial.config).label()
        self.finished.add(trial.trial_id)
        value = self._consider(result, label)
        self._line(f"{label}: {self.objective} {value:.3g}" if value is not None else f"{label}: done")

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.finished.add(trial.trial_id)
        self._line(f"{trial_config(trial.config).label()}: [red]error[/] {error_message(trial)}")

    def _consider(self, result: Mapping[str, Any], label: str) -> float | None:
        value = result.get(self.objective)
        if not isinstance(value, (int, float)):
            return None
        better = self.best is None or (value > self.best[0] if self.mode == "max" else value < self.best[0])
        if better:
            self.best = (float(value), label)
        return float(value)

    def _line(self, text: str) -> None:
        if self.console is None:
            return
        best = f" | best {self.objective} {self.best[0]:.3g}: {self.best[1]}" if self.best else ""
        self.console.print(f"[{len(self.finished)}/{self.total}] {text}{best}", highlight=False, soft_wrap=True)


class LeaseReclaimer(Callback):
    """A trial whose own process died (its node lost) never gives its leased worker back: the driver
    takes it back (`WorkerPool.reclaim`), or that worker, alive on another node, would idle for good.

    Like the store, the pools are attached at run time and left out of Tune's pickled state.
    """

    def __init__(self) -> None:
        self.pools: dict[str, Any] = {}
        self.died_on: dict[str, str] = {}  # trial id -> the node its process died on (read by StoreCallback)

    def attach(self, pools: Mapping[str, Any]) -> LeaseReclaimer:
        self.pools = dict(pools)
        return self

    def __getstate__(self) -> dict[str, Any]:
        return {"pools": {}, "died_on": {}}

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        for pool in self.pools.values():
            node = pool.reclaim(trial.trial_id)
            if node is not None:
                self.died_on[trial.trial_id] = node
        if trial.trial_id not in self.died_on:  # it died before it asked for a worker: Ray knows where it ran
            node = trial_actor_node(_pickled_error(trial))
            if node is not None:
                self.died_on[trial.trial_id] = node


def trial_actor_node(cause: BaseException | None) -> str | None:
    """Where a trial's own process ran ("name/id"), from Ray's state API by the dead actor's id in its error:
    for a trial that died before it could say (before it leased a worker). None when Ray cannot tell."""
    if not isinstance(cause, RayActorError):
        return None
    found = getattr(cause, "actor_id", None) or re.search(r"actor ([0-9a-f]{16,})", str(cause))
    actor_id = found.group(1) if isinstance(found, re.Match) else found
    if not actor_id:
        return None
    try:
        from ray.util.state import get_actor, get_node

        from spectune.cluster import node_name

        actor = get_actor(actor_id, timeout=10)
        if actor is None or not actor.node_id:
            return None
        node = get_node(actor.node_id, timeout=10)
        name = node_name(node.resources_total or {}, node.node_ip) if node is not None else actor.node_id[:8]
        return f"{name}/{actor.node_id[:8]}"
    except Exception:  # noqa: BLE001 - best effort: the trial's error is stored either way, only less precise
        return None

