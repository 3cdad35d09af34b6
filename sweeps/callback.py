"""Driver-side Tune callbacks: the only writer of the results store, and the progress lines.

Trials are keyed by Tune's trial id, and every store write is an upsert, so a resumed
sweep that re-runs or re-reports a trial replaces its row instead of adding one.

Tune pickles callbacks with the experiment (`tuner.pkl`) and restores *those* on
`Tuner.restore`; a database connection (and its password) must not travel that way, so
the store is attached at run time (`attach`) and dropped from the pickled state.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ray import cloudpickle
from ray.tune import Callback
from rich.console import Console

from spectune.config import DecodeConfig
from spectune.results import BaselineResult, DecodeResult
from spectune.sweeps.space import trial_config
from spectune.sweeps.trainable import PAYLOAD, TrialFailed


def stored_config(tune_config: Mapping[str, Any]) -> DecodeConfig:
    """The trial's configuration with the store columns its method declares (the driver has the registries)."""
    from spectune.backends import BACKENDS

    return BACKENDS.config(trial_config(tune_config))


def error_message(trial: Any) -> str:
    """The trial's error as one line: the worker's message for a TrialFailed, else the exception's.

    Read from the trial's local error files: when the callback runs they are not yet
    synced to the experiment's storage, where `Trial.get_pickled_error` looks.
    """
    cause = _pickled_error(trial)
    if isinstance(cause, TrialFailed):
        return str(cause)
    if cause is not None:
        return f"{type(cause).__name__}: {' '.join(str(cause).split())}"
    return _last_error_line(trial) or "the trial failed without an error message"


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


class StoreCallback(Callback):
    """Writes every trial's status, metrics, hardware and the workers' AR baselines."""

    def __init__(self, sweep: str) -> None:
        self.sweep = sweep
        self.store: Any = None  # spectune.store.Store, attached by the launcher
        self.seen: set[str] = set()

    def attach(self, store: Any) -> StoreCallback:
        self.store = store
        return self

    def __getstate__(self) -> dict[str, Any]:
        return {"sweep": self.sweep, "store": None, "seen": set()}

    def on_step_begin(self, iteration: int, trials: list[Any], **info: Any) -> None:
        for trial in trials:  # new trials show up as pending before they start
            if trial.trial_id not in self.seen and trial.status == "PENDING":
                self.seen.add(trial.trial_id)
                self.store.upsert_trial(self.sweep, trial.trial_id, stored_config(trial.config), "pending")

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.seen.add(trial.trial_id)
        self.store.upsert_trial(self.sweep, trial.trial_id, stored_config(trial.config), "running")

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: Mapping[str, Any], **info: Any) -> None:
        payload = result[PAYLOAD]
        outcome = DecodeResult.from_dict(payload["result"], config=stored_config(trial.config))
        self.store.record_result(self.sweep, trial.trial_id, outcome, payload["hardware"])
        for baseline in payload["baselines"]:
            self.store.save_baseline(BaselineResult(**baseline), payload["hardware"], extra={"sweep": self.sweep})

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.store.upsert_trial(self.sweep, trial.trial_id, stored_config(trial.config), "error",
                                error=error_message(trial))


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
