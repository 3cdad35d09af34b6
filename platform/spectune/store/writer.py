"""Writes to the results store. Every write is one transaction and safe to repeat.

Only the sweep driver writes (trials just `tune.report(dict)`); on resume the driver
re-sends what it already sent, so trials are keyed by ``(sweep, trial_key)`` and
results replace, never duplicate.
"""

from __future__ import annotations

import getpass
import os
import socket
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from spectune.config import DecodeConfig
from spectune.results import BaselineResult, DecodeResult
from spectune.store._sql import (
    as_bool, as_float, as_int, hardware_id, hardware_values, jsonable, sweep_id, upsert,
)
from spectune.store.errors import SweepExists, UnknownSweep, UnknownTrial
from spectune.store.schema import (
    KNOB_FIELDS, METRIC_BOOL_FIELDS, METRIC_FIELDS, METRIC_FLOAT_FIELDS, METRIC_INT_FIELDS, METRIC_JSON_FIELDS,
    METRIC_TEXT_FIELDS,
    SWEEP_STATUSES, TRIAL_STATUSES, ArBaseline, PromptResult, Serving, Sweep, Trial,
    TrialMetrics, UTCDateTime, utcnow,
)

def _check_status(status: str, allowed: tuple[str, ...], what: str) -> str:
    if status not in allowed:
        raise ValueError(f"{what} status must be one of {', '.join(allowed)}; got {status!r}")
    return status


def knob_columns(config: DecodeConfig | None) -> dict[str, Any]:
    """The knob columns of a trial: method and temperature, and the knobs its method declared as columns."""
    if config is None:
        return {name: None for name in KNOB_FIELDS}
    own = {"method": config.method, "temperature": as_float("temperature", config.temperature),
           "backend": config.backend, "concurrency": config.concurrency}
    return {name: own[name] if name in own else getattr(config.columns, name) for name in KNOB_FIELDS}


def result_row(result: DecodeResult) -> dict[str, Any]:
    """The typed result as the store's flat row; extra keys that are None are left out."""
    return {key: value for key, value in result.as_dict().items()
            if value is not None or key in METRIC_FIELDS or key == "per_prompt"}


def split_metrics(metrics: Mapping[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Metric columns (unknown keys gathered in ``extra``) and the per-prompt rows."""
    rest = dict(metrics)
    method = rest.pop("method", None)
    cols: dict[str, Any] = {"method": None if method is None else str(method)}
    for f in METRIC_INT_FIELDS:
        cols[f] = as_int(f, rest.pop(f, None))
    for f in METRIC_FLOAT_FIELDS:
        cols[f] = as_float(f, rest.pop(f, None))
    for f in METRIC_BOOL_FIELDS:
        cols[f] = as_bool(f, rest.pop(f, None))
    for f in METRIC_TEXT_FIELDS:
        value = rest.pop(f, None)
        cols[f] = None if value is None else str(value)
    cols["lossy_method"] = bool(cols["lossy_method"])
    for f in METRIC_JSON_FIELDS:
        cols[f] = jsonable(rest.pop(f, None))
    per_prompt = [_prompt_row(i, p) for i, p in enumerate(rest.pop("per_prompt", None) or [])]
    ids = [p["prompt_id"] for p in per_prompt]
    if len(set(ids)) != len(ids):
        raise ValueError("per_prompt: prompt_id values must be unique within a trial")
    cols["extra"] = jsonable(rest)
    return cols, per_prompt


def _prompt_row(index: int, entry: Mapping[str, Any]) -> dict[str, Any]:
    rest = dict(entry)
    pid = rest.pop("prompt_id", index)
    text = rest.pop("text", None)
    row = {
        "prompt_id": str(pid),
        "new_tokens": as_int("per_prompt.new_tokens", rest.pop("new_tokens", None)),
        "target_calls": as_int("per_prompt.target_calls", rest.pop("target_calls", None)),
        "mean_accepted_tokens": as_float("per_prompt.mean_accepted_tokens",
                                         rest.pop("mean_accepted_tokens", None)),
        "wall_s": as_float("per_prompt.wall_s", rest.pop("wall_s", None)),
        "matches_ar": as_bool("per_prompt.matches_ar", rest.pop("matches_ar", None)),
        "text": None if text is None else str(text),
    }
    row["extra"] = jsonable(rest)
    return row


def _where(where: str | Mapping[str, Any] | None) -> dict[str, str | None]:
    if isinstance(where, Mapping):
        return {"hostname": where.get("hostname"), "ray_address": where.get("ray_address")}
    return {"hostname": where or socket.gethostname(),
            "ray_address": os.environ.get("RAY_ADDRESS")}


def _user() -> str | None:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry in some containers
        return None


class StoreWriter:
    """Write methods of `Store` (see `spectune.store.db.Store`)."""

    sessions: sessionmaker[Session]  # reads
    writes: sessionmaker[Session]  # writes: take SQLite's write lock when they begin

    def create_sweep(self, name: str, spec: Mapping[str, Any], *, who: str | None = None,
                     where: str | Mapping[str, Any] | None = None, resume: bool = False) -> int:
        """A new sweep (status pending); its id. With ``resume=True`` an existing one is reused.

        ``where`` is a hostname or ``{"hostname":..., "ray_address":...}``; by default this
        machine's hostname and $RAY_ADDRESS. ``who`` defaults to the current user.
        """
        if resume and (existing := self._sweep_id_or_none(name)) is not None:
            return existing
        row = Sweep(name=name, spec=jsonable(dict(spec)), status="pending",
                    who=who or _user(), **_where(where))
        try:
            with self.writes.begin() as s:
                s.add(row)
                s.flush()
                return row.id
        except IntegrityError:
            if resume and (existing := self._sweep_id_or_none(name)) is not None:
                return existing
            raise SweepExists(f"a sweep named {name!r} already exists; choose another name "
                              "or resume it") from None

    def _sweep_id_or_none(self, name: str) -> int | None:
        with self.sessions() as s:
            return s.scalar(sa.select(Sweep.id).where(Sweep.name == name))

    def set_sweep_status(self, name: str, status: str) -> None:
        """Running stamps started_at (first time); done/error/interrupted stamp finished_at."""
        _check_status(status, SWEEP_STATUSES, "sweep")
        values: dict[str, Any] = {"status": status}
        now = utcnow()
        if status == "running":
            first = sa.func.coalesce(Sweep.started_at, sa.literal(now, UTCDateTime()))
            values.update(started_at=first, finished_at=None)
        elif status != "pending":
            values["finished_at"] = now
        with self.writes.begin() as s:
            done = s.execute(sa.update(Sweep).where(Sweep.name == name).values(**values))
            if done.rowcount == 0:
                raise UnknownSweep(f"no sweep named {name!r}")

    def upsert_trial(self, sweep_name: str, trial_key: str, config: DecodeConfig | None,
                     status: str = "pending", *, error: str | None = None, node: str | None = None) -> int:
        """Insert or update the trial ``(sweep, trial_key)``; its id. Safe to call again.

        ``config`` None: a trial known only by its key (nothing else recorded yet). ``node``: the Ray
        node that ran it, when known (a known node is never overwritten by an unknown one)."""
        _check_status(status, TRIAL_STATUSES, "trial")
        cfg = jsonable(config.as_dict()) if config is not None else {}
        values = {"config": cfg, **knob_columns(config), "status": status, "error": error}
        if node is not None:
            values["node"] = node
        values.update(self._stamps(status))
        with self.writes.begin() as s:
            sid = sweep_id(s, sweep_name)
            return upsert(s, Trial.__table__, {"sweep_id": sid, "trial_key": trial_key, **values},
                          ["sweep_id", "trial_key"], values)

    @staticmethod
    def _stamps(status: str) -> dict[str, datetime | None]:
        now = utcnow()
        if status == "running":
            return {"started_at": now, "finished_at": None}
        if status in ("done", "error"):
            return {"finished_at": now}
        return {}

    def _trial_row(self, s: Session, sweep_name: str, trial_key: str,
                   new_config: DecodeConfig | None, update: dict[str, Any]) -> int:
        """Upsert a trial keeping an existing config (a new trial gets ``new_config``);
        knob columns still NULL are filled from ``new_config``."""
        sid = sweep_id(s, sweep_name)
        cfg = jsonable(new_config.as_dict()) if new_config is not None else {}
        knobs = knob_columns(new_config)
        values = {"sweep_id": sid, "trial_key": trial_key, "config": cfg, **knobs, **update}
        return upsert(s, Trial.__table__, values, ["sweep_id", "trial_key"], update,
                      fill=tuple(knobs))

    def record_result(self, sweep_name: str, trial_key: str, result: DecodeResult,
                      hardware: Mapping[str, Any] | None, *, node: str | None = None) -> int:
        """Store a trial's result (replacing earlier ones) and mark it done; its id. ``node``: the Ray node that ran it."""
        cols, per_prompt = split_metrics(result_row(result))
        with self.writes.begin() as s:
            hw = hardware_id(s, hardware) if hardware else None
            update = {"status": "done", "error": None, "hardware_id": hw, "node": node, **self._stamps("done")}
            tid = self._trial_row(s, sweep_name, trial_key, result.config, update)
            row = {**cols, "recorded_at": utcnow()}
            upsert(s, TrialMetrics.__table__, {"trial_id": tid, **row}, ["trial_id"], row,
                   returning="trial_id")
            s.execute(sa.delete(PromptResult).where(PromptResult.trial_id == tid))
            if per_prompt:
                s.execute(sa.insert(PromptResult), [{"trial_id": tid, **p} for p in per_prompt])
            return tid

    def record_error(self, sweep_name: str, trial_key: str, message: str) -> int:
        """Mark a trial failed with ``message`` (created if unknown); its id."""
        with self.writes.begin() as s:
            update = {"status": "error", "error": str(message), **self._stamps("error")}
            return self._trial_row(s, sweep_name, trial_key, None, update)

    def save_baseline(self, baseline: BaselineResult, hardware: Mapping[str, Any], *,
                      measured_at: datetime | None = None, extra: Mapping[str, Any] | None = None) -> int:
        """Store a worker's AR speed (one row per pair/prompts/hardware/length/temperature)."""
        speed = as_float("ar_tokens_per_s", baseline.ar_tokens_per_s)
        if speed is None:
            raise ValueError("ar_tokens_per_s must be a finite number")
        update = {"ar_tokens_per_s": speed, "target_path": baseline.target_path,
                  "drafter_path": baseline.drafter_path, "measured_at": measured_at or utcnow(),
                  "extra": jsonable({"measured_s": baseline.measured_s, **(extra or {})})}
        with self.writes.begin() as s:
            key = {"pair_id": baseline.pair_id, "prompt_set_hash": baseline.prompt_set_hash,
                   "hardware_id": hardware_id(s, hardware), "max_new_tokens": int(baseline.max_new_tokens),
                   "temperature": float(baseline.temperature)}
            return upsert(s, ArBaseline.__table__, {**key, **update}, list(key), update)

    def mark_served(self, trial_id: int, slot: str = "default") -> None:
        """Make ``trial_id`` (a finished trial) the one the endpoint serves."""
        with self.writes.begin() as s:
            status = s.scalar(sa.select(Trial.status).where(Trial.id == trial_id))
            if status is None:
                raise UnknownTrial(f"no trial with id {trial_id}")
            if status != "done":
                raise ValueError(f"trial {trial_id} is {status}; only finished trials can be served")
            row = {"trial_id": trial_id, "updated_at": utcnow()}
            upsert(s, Serving.__table__, {"slot": slot, **row}, ["slot"], row, returning="slot")


__all__ = ["StoreWriter", "hardware_values", "knob_columns", "result_row", "split_metrics"]
