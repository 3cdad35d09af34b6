"""Reads from the results store: what the dashboard, the CLI and the endpoint see."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from spectune.config import DecodeConfig, KnobColumns
from spectune.lossless import counts_clause
from spectune.store._sql import hardware_dict, hardware_summary, hardware_values, sweep_id
from spectune.store.errors import UnknownTrial
from spectune.store.schema import (
    KNOB_FIELDS, METRIC_BOOL_FIELDS, METRIC_FIELDS, METRIC_FLOAT_FIELDS,
    METRIC_INT_FIELDS, PROMPT_FIELDS, TRIAL_STATUSES, ArBaseline, Hardware, PromptResult, Serving,
    Sweep, Trial, TrialMetrics,
)

NUMERIC_METRICS = METRIC_INT_FIELDS + METRIC_FLOAT_FIELDS
_FRAME_METRICS = tuple(f for f in METRIC_FIELDS if f not in ("method", "config"))
FRAME_COLUMNS = (
    ("trial_id", "sweep", "trial_key", "status", "error") + KNOB_FIELDS
    + ("served", "started_at", "finished_at", "hardware", "device", "cpu_model", "gpu_model",
       "hostname", "node", "config")
    + _FRAME_METRICS + ("extra", "recorded_at")
)


@dataclass(frozen=True)
class SweepRow:
    id: int
    name: str
    spec: dict[str, Any]
    status: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    who: str | None
    hostname: str | None
    ray_address: str | None


@dataclass(frozen=True)
class SweepSummary:
    id: int
    name: str
    status: str
    n_trials: dict[str, int]  # every trial status, zeros included
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    hardware: str  # "; "-joined summaries of the machines its trials ran on

    @property
    def total(self) -> int:
        return sum(self.n_trials.values())


@dataclass(frozen=True)
class BaselineRow:
    id: int
    pair_id: str
    prompt_set_hash: str
    max_new_tokens: int
    temperature: float
    ar_tokens_per_s: float
    measured_at: datetime
    hardware: dict[str, Any]
    target_path: str | None = None
    drafter_path: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _sweep_row(sw: Sweep) -> SweepRow:
    return SweepRow(sw.id, sw.name, sw.spec, sw.status, sw.created_at, sw.started_at,
                    sw.finished_at, sw.who, sw.hostname, sw.ray_address)


def _metrics_dict(m: TrialMetrics) -> dict[str, Any]:
    """The metrics as `spectune bench --json` reported them (extra keys merged back)."""
    return {**{f: getattr(m, f) for f in METRIC_FIELDS}, **(m.extra or {})}


def _prompt_dict(p: PromptResult) -> dict[str, Any]:
    row = {f: getattr(p, f) for f in PROMPT_FIELDS}
    if row["text"] is None:
        del row["text"]
    return {**row, **(p.extra or {})}


def _frame_row(t: Trial, sweep: str, m: TrialMetrics | None, hw: Hardware | None,
               served: set[int]) -> dict[str, Any]:
    row: dict[str, Any] = {
        "trial_id": t.id, "sweep": sweep, "trial_key": t.trial_key, "status": t.status,
        "error": t.error, **{k: getattr(t, k) for k in KNOB_FIELDS},
        "served": t.id in served, "started_at": t.started_at, "finished_at": t.finished_at,
        "hardware": hardware_summary(hw), "config": t.config,
        **{f: getattr(hw, f, None) for f in ("device", "cpu_model", "gpu_model", "hostname")}, "node": t.node,
        **{f: getattr(m, f, None) for f in _FRAME_METRICS + ("extra", "recorded_at")},
    }
    if row["method"] is None and m is not None:
        row["method"] = m.method
    return row


def _typed_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=list(FRAME_COLUMNS))
    for col in ("draft_len", "node_budget", "exit_layer", "concurrency") + METRIC_INT_FIELDS:
        df[col] = pd.array(df[col].tolist(), dtype="Int64")
    for col in ("temperature",) + METRIC_FLOAT_FIELDS:
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
    for col in METRIC_BOOL_FIELDS:
        df[col] = pd.array(df[col].tolist(), dtype="boolean")
    df["served"] = df["served"].astype(bool)
    for col in ("started_at", "finished_at", "recorded_at"):
        df[col] = pd.to_datetime(df[col], utc=True)
    return df


class StoreReader:
    """Read methods of `Store` (see `spectune.store.db.Store`)."""

    sessions: sessionmaker[Session]

    def get_sweep(self, name: str) -> SweepRow | None:
        with self.sessions() as s:
            sw = s.scalar(sa.select(Sweep).where(Sweep.name == name))
            return None if sw is None else _sweep_row(sw)

    def list_sweeps(self) -> list[SweepSummary]:
        """Every sweep, newest first, with trial counts by status and its hardware."""
        with self.sessions() as s:
            sweeps = s.scalars(sa.select(Sweep).order_by(Sweep.id.desc())).all()
            counts: dict[int, dict[str, int]] = {sw.id: dict.fromkeys(TRIAL_STATUSES, 0)
                                                 for sw in sweeps}
            q = sa.select(Trial.sweep_id, Trial.status, sa.func.count()).group_by(
                Trial.sweep_id, Trial.status)
            for sid, status, n in s.execute(q):
                counts[sid][status] = n
            pairs = s.execute(sa.select(Trial.sweep_id, Trial.hardware_id).distinct().where(
                Trial.hardware_id.is_not(None))).all()
            hws = {h.id: hardware_summary(h) for h in s.scalars(sa.select(Hardware).where(
                Hardware.id.in_({hid for _, hid in pairs})))}
            labels: dict[int, set[str]] = {}
            for sid, hid in pairs:
                labels.setdefault(sid, set()).add(hws[hid])
            return [SweepSummary(sw.id, sw.name, sw.status, counts[sw.id], sw.created_at,
                                 sw.started_at, sw.finished_at,
                                 "; ".join(sorted(labels.get(sw.id, ()))))
                    for sw in sweeps]

    def trials_frame(self, sweep_name: str | list[str] | None = None) -> pd.DataFrame:
        """One row per trial (knobs, status, error, hardware, metrics); ordered by trial id.

        ``sweep_name``: one sweep, several, or None for all. Columns: `FRAME_COLUMNS`.
        """
        q = (sa.select(Trial, Sweep.name, TrialMetrics, Hardware)
             .join(Sweep, Trial.sweep_id == Sweep.id)
             .outerjoin(TrialMetrics, TrialMetrics.trial_id == Trial.id)
             .outerjoin(Hardware, Trial.hardware_id == Hardware.id)
             .order_by(Trial.id))
        if sweep_name is not None:
            names = [sweep_name] if isinstance(sweep_name, str) else list(sweep_name)
            q = q.where(Sweep.name.in_(names))
        with self.sessions() as s:
            served = set(s.scalars(sa.select(Serving.trial_id)))
            rows = [_frame_row(t, name, m, hw, served) for t, name, m, hw in s.execute(q)]
        return _typed_frame(rows)

    def trial_detail(self, trial_id: int) -> dict[str, Any]:
        """Config, knobs, metrics (as reported), per-prompt rows and hardware of one trial."""
        with self.sessions() as s:
            t = s.get(Trial, trial_id)
            if t is None:
                raise UnknownTrial(f"no trial with id {trial_id}")
            m = s.get(TrialMetrics, trial_id)
            prompts = s.scalars(sa.select(PromptResult).where(PromptResult.trial_id == trial_id)
                                .order_by(PromptResult.id)).all()
            served = s.scalar(sa.select(Serving.slot).where(Serving.trial_id == trial_id).limit(1))
            return {
                "trial_id": t.id, "sweep": s.get_one(Sweep, t.sweep_id).name,
                "trial_key": t.trial_key, "status": t.status, "error": t.error, "node": t.node,
                "config": t.config, "knobs": {k: getattr(t, k) for k in KNOB_FIELDS},
                "started_at": t.started_at, "finished_at": t.finished_at,
                "served": served is not None,
                "metrics": None if m is None else _metrics_dict(m),
                "per_prompt": [_prompt_dict(p) for p in prompts],
                "hardware": hardware_dict(s.get(Hardware, t.hardware_id) if t.hardware_id else None),
            }

    def trial_config(self, trial_id: int) -> DecodeConfig:
        """The configuration a trial ran, with its knob columns (ValueError when it names no method)."""
        with self.sessions() as s:
            t = s.get(Trial, trial_id)
            if t is None:
                raise UnknownTrial(f"no trial with id {trial_id}")
            columns = KnobColumns(t.draft_len, t.tree_shape, t.node_budget, t.exit_layer)
            stored = {"method": t.method, "backend": t.backend, "concurrency": t.concurrency}
            return DecodeConfig.from_dict({**stored, **(t.config or {})}, columns)

    def best_trial(self, sweep_name: str, objective: str, mode: str = "max",
                   lossless_only: bool = True, include_unchecked: bool = False,
                   concurrency: int | None = None) -> int | None:
        """The finished trial with the best ``objective`` (ties: lowest id), or None.

        ``concurrency``: only trials measured at that many requests in flight (serving backends).

        ``lossless_only`` keeps certified trials only: ``lossless`` true (greedy outputs equal
        AR's, or within the certificate's tolerance: a ``lossless_status`` in
        `spectune.lossless.CERTIFIED`), never a lossy-by-design method (the rule: `spectune.lossless`). An unchecked trial
        (``lossless`` null: sampling, lossless by the method's rule but not checked) counts only
        with ``include_unchecked``.
        """
        if objective not in NUMERIC_METRICS:
            raise ValueError(f"unknown objective {objective!r}; one of {', '.join(NUMERIC_METRICS)}")
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        col = getattr(TrialMetrics, objective)
        with self.sessions() as s:
            q = (sa.select(Trial.id).join(TrialMetrics, TrialMetrics.trial_id == Trial.id)
                 .where(Trial.sweep_id == sweep_id(s, sweep_name), Trial.status == "done",
                        col.is_not(None))
                 .order_by(col.desc() if mode == "max" else col.asc(), Trial.id).limit(1))
            if lossless_only:
                q = q.where(counts_clause(TrialMetrics.lossless, TrialMetrics.lossless_status,
                                          TrialMetrics.lossy_method, include_unchecked))
            if concurrency is not None:
                q = q.where(sa.func.coalesce(Trial.concurrency, 1) == int(concurrency))
            return s.scalar(q)

    def served_trial(self, slot: str = "default") -> int | None:
        """The trial the endpoint should serve (see `mark_served`), or None."""
        with self.sessions() as s:
            return s.scalar(sa.select(Serving.trial_id).where(Serving.slot == slot))

    def get_baseline(self, *, pair_id: str, prompt_set_hash: str, max_new_tokens: int,
                     temperature: float, hardware: Mapping[str, Any] | None = None
                     ) -> BaselineRow | None:
        """The stored AR baseline; with ``hardware`` None, the latest one on any hardware."""
        q = (sa.select(ArBaseline, Hardware).join(Hardware, ArBaseline.hardware_id == Hardware.id)
             .where(ArBaseline.pair_id == pair_id, ArBaseline.prompt_set_hash == prompt_set_hash,
                    ArBaseline.max_new_tokens == int(max_new_tokens),
                    ArBaseline.temperature == float(temperature))
             .order_by(ArBaseline.measured_at.desc(), ArBaseline.id.desc()).limit(1))
        if hardware is not None:
            q = q.where(Hardware.fingerprint == hardware_values(hardware)["fingerprint"])
        with self.sessions() as s:
            found = s.execute(q).first()
            if found is None:
                return None
            b, hw = found
            return BaselineRow(b.id, b.pair_id, b.prompt_set_hash, b.max_new_tokens, b.temperature,
                               b.ar_tokens_per_s, b.measured_at, hardware_dict(hw) or {},
                               b.target_path, b.drafter_path, b.extra or {})


__all__ = ["FRAME_COLUMNS", "NUMERIC_METRICS", "BaselineRow", "StoreReader", "SweepRow",
           "SweepSummary"]
