"""The results store's tables: typed SQLAlchemy 2.0 ORM models.

Every change here needs a new Alembic revision in ``migrations/versions`` (the test
suite fails if the ORM and the migrations disagree).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

SWEEP_STATUSES = ("pending", "running", "done", "error", "interrupted")
TRIAL_STATUSES = ("pending", "running", "done", "error")

# Metric fields of `spectune bench --json` stored as plain columns (lists/dicts as JSON).
METRIC_FLOAT_FIELDS = (
    "mean_accepted_tokens", "acceptance_rate", "wall_s", "wall_s_std", "tokens_per_s",
    "ar_tokens_per_s", "speedup", "speedup_std", "tree_tokens_per_step",
    "draft_calls_per_step", "draft_share", "ms_per_token", "peak_mem_mb",
    "speedup_ci_low", "speedup_ci_high", "exact_match_rate", "worst_margin",
    "ttft_s", "tpot_s", "p50_latency_s", "p95_latency_s",
)
METRIC_INT_FIELDS = ("n_prompts", "new_tokens", "target_calls", "draft_calls", "mismatches")
METRIC_BOOL_FIELDS = ("lossless", "lossy_method")
METRIC_TEXT_FIELDS = ("lossless_status",)
METRIC_JSON_FIELDS = ("config", "acceptance_by_position", "acceptance_by_exit_layer", "by_category")
# All of them, in the order `spectune bench --json` prints them (`per_prompt` has its own table).
METRIC_FIELDS = (
    "method", "config", "n_prompts", "new_tokens", "target_calls", "draft_calls",
    "mean_accepted_tokens", "acceptance_rate", "acceptance_by_position", "wall_s", "wall_s_std",
    "tokens_per_s", "ar_tokens_per_s", "speedup", "speedup_std", "speedup_ci_low", "speedup_ci_high",
    "lossless", "lossless_status", "exact_match_rate", "worst_margin", "lossy_method",
    "mismatches", "tree_tokens_per_step", "draft_calls_per_step", "draft_share", "ms_per_token",
    "peak_mem_mb", "acceptance_by_exit_layer", "by_category", "ttft_s", "tpot_s", "p50_latency_s",
    "p95_latency_s",
)
PROMPT_FIELDS = ("prompt_id", "new_tokens", "target_calls", "mean_accepted_tokens", "wall_s",
                 "matches_ar", "text")
HARDWARE_FIELDS = ("device", "cpu_model", "gpu_model", "n_cpus", "torch_version",
                   "transformers_version", "hostname")
KNOB_FIELDS = ("method", "draft_len", "tree_shape", "node_budget", "exit_layer", "temperature", "backend",
               "concurrency")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(sa.types.TypeDecorator[datetime]):
    """Timezone-aware UTC timestamps on every backend (SQLite stores them naive)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        value = value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _status_check(column: str, values: tuple[str, ...]) -> sa.CheckConstraint:
    allowed = ", ".join(f"'{v}'" for v in values)
    return sa.CheckConstraint(f"{column} IN ({allowed})", name=column)


class Base(DeclarativeBase):
    metadata = sa.MetaData(naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    })
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: sa.JSON, list[Any]: sa.JSON,
                           float: sa.Double()}


class Hardware(Base):
    """One machine description; identical descriptions share one row (by fingerprint)."""

    __tablename__ = "hardware"
    id: Mapped[int] = mapped_column(primary_key=True)
    fingerprint: Mapped[str] = mapped_column(sa.String(64), unique=True)
    device: Mapped[str] = mapped_column(sa.String(32))
    cpu_model: Mapped[str | None] = mapped_column(sa.String(256))
    gpu_model: Mapped[str | None] = mapped_column(sa.String(256))
    n_cpus: Mapped[int | None]
    torch_version: Mapped[str | None] = mapped_column(sa.String(64))
    transformers_version: Mapped[str | None] = mapped_column(sa.String(64))
    hostname: Mapped[str | None] = mapped_column(sa.String(256))
    extra: Mapped[dict[str, Any]] = mapped_column(default=dict)


class Sweep(Base):
    __tablename__ = "sweeps"
    __table_args__ = (_status_check("status", SWEEP_STATUSES),)
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(200), unique=True)
    spec: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(sa.String(16), default="pending")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    who: Mapped[str | None] = mapped_column(sa.String(128))
    hostname: Mapped[str | None] = mapped_column(sa.String(256))
    ray_address: Mapped[str | None] = mapped_column(sa.String(256))


class Trial(Base):
    __tablename__ = "trials"
    __table_args__ = (
        sa.UniqueConstraint("sweep_id", "trial_key"),
        _status_check("status", TRIAL_STATUSES),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    sweep_id: Mapped[int] = mapped_column(sa.ForeignKey("sweeps.id", ondelete="CASCADE"), index=True)
    trial_key: Mapped[str] = mapped_column(sa.String(200))
    config: Mapped[dict[str, Any]]
    method: Mapped[str | None] = mapped_column(sa.String(64))
    draft_len: Mapped[int | None]
    tree_shape: Mapped[str | None] = mapped_column(sa.Text)
    node_budget: Mapped[int | None]
    exit_layer: Mapped[int | None]
    temperature: Mapped[float | None]
    backend: Mapped[str | None] = mapped_column(sa.String(32))  # None: spectune's engine (rows before 0002)
    concurrency: Mapped[int | None]
    status: Mapped[str] = mapped_column(sa.String(16), default="pending")
    error: Mapped[str | None] = mapped_column(sa.Text)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    hardware_id: Mapped[int | None] = mapped_column(sa.ForeignKey("hardware.id"), index=True)
    node: Mapped[str | None] = mapped_column(sa.String(128))  # the Ray node that ran it, "name/node-id" (0003)


class TrialMetrics(Base):
    """Everything `spectune bench --json` reports for one configuration (one row per trial)."""

    __tablename__ = "trial_metrics"
    trial_id: Mapped[int] = mapped_column(sa.ForeignKey("trials.id", ondelete="CASCADE"),
                                          primary_key=True)
    method: Mapped[str | None] = mapped_column(sa.String(64))
    config: Mapped[dict[str, Any] | None]
    n_prompts: Mapped[int | None]
    new_tokens: Mapped[int | None]
    target_calls: Mapped[int | None]
    draft_calls: Mapped[int | None]
    mean_accepted_tokens: Mapped[float | None]
    acceptance_rate: Mapped[float | None]
    acceptance_by_position: Mapped[list[Any] | None]
    wall_s: Mapped[float | None]
    wall_s_std: Mapped[float | None]
    tokens_per_s: Mapped[float | None]
    ar_tokens_per_s: Mapped[float | None]
    speedup: Mapped[float | None]
    speedup_std: Mapped[float | None]
    speedup_ci_low: Mapped[float | None]
    speedup_ci_high: Mapped[float | None]
    lossless: Mapped[bool | None]
    lossless_status: Mapped[str | None] = mapped_column(sa.String(32))
    exact_match_rate: Mapped[float | None]
    worst_margin: Mapped[float | None]
    lossy_method: Mapped[bool] = mapped_column(default=False)
    mismatches: Mapped[int | None]
    tree_tokens_per_step: Mapped[float | None]
    draft_calls_per_step: Mapped[float | None]
    draft_share: Mapped[float | None]
    ms_per_token: Mapped[float | None]
    peak_mem_mb: Mapped[float | None]
    acceptance_by_exit_layer: Mapped[dict[str, Any] | None]
    by_category: Mapped[dict[str, Any] | None]
    ttft_s: Mapped[float | None]
    tpot_s: Mapped[float | None]
    p50_latency_s: Mapped[float | None]
    p95_latency_s: Mapped[float | None]
    extra: Mapped[dict[str, Any]] = mapped_column(default=dict)
    recorded_at: Mapped[datetime] = mapped_column(default=utcnow)


class PromptResult(Base):
    __tablename__ = "prompt_results"
    __table_args__ = (sa.UniqueConstraint("trial_id", "prompt_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    trial_id: Mapped[int] = mapped_column(sa.ForeignKey("trials.id", ondelete="CASCADE"))
    prompt_id: Mapped[str] = mapped_column(sa.String(200))
    new_tokens: Mapped[int | None]
    target_calls: Mapped[int | None]
    mean_accepted_tokens: Mapped[float | None]
    wall_s: Mapped[float | None]
    matches_ar: Mapped[bool | None]
    text: Mapped[str | None] = mapped_column(sa.Text)
    extra: Mapped[dict[str, Any]] = mapped_column(default=dict)


class Serving(Base):
    """Which trial an endpoint serves: one row per slot ("default" unless named)."""

    __tablename__ = "serving"
    slot: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    trial_id: Mapped[int] = mapped_column(sa.ForeignKey("trials.id", ondelete="CASCADE"))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class ArBaseline(Base):
    """Plain autoregressive decoding speed of a worker: the denominator of `speedup`."""

    __tablename__ = "ar_baselines"
    __table_args__ = (
        sa.UniqueConstraint("pair_id", "prompt_set_hash", "hardware_id", "max_new_tokens",
                            "temperature", name="uq_ar_baselines_key"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    pair_id: Mapped[str] = mapped_column(sa.String(512))
    target_path: Mapped[str | None] = mapped_column(sa.Text)
    drafter_path: Mapped[str | None] = mapped_column(sa.Text)
    prompt_set_hash: Mapped[str] = mapped_column(sa.String(128))
    hardware_id: Mapped[int] = mapped_column(sa.ForeignKey("hardware.id"))
    max_new_tokens: Mapped[int]
    temperature: Mapped[float]
    ar_tokens_per_s: Mapped[float]
    measured_at: Mapped[datetime] = mapped_column(default=utcnow)
    extra: Mapped[dict[str, Any]] = mapped_column(default=dict)
