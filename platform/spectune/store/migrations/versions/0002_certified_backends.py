"""certificates, confidence intervals, categories, backends and load

Trials gain the backend that decoded them and the concurrency they were measured at; metrics
gain the speedup's confidence interval, the lossless certificate (status, share identical to
the reference, worst margin), per-category results and served-engine latencies.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 00:00:00

"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_METRIC_FLOATS = ("speedup_ci_low", "speedup_ci_high", "exact_match_rate", "worst_margin",
                  "ttft_s", "tpot_s", "p50_latency_s", "p95_latency_s")


def upgrade() -> None:
    with op.batch_alter_table("trials") as batch:
        batch.add_column(sa.Column("backend", sa.String(32), nullable=True))
        batch.add_column(sa.Column("concurrency", sa.Integer(), nullable=True))
    with op.batch_alter_table("trial_metrics") as batch:
        for name in _METRIC_FLOATS:
            batch.add_column(sa.Column(name, sa.Double(), nullable=True))
        batch.add_column(sa.Column("lossless_status", sa.String(32), nullable=True))
        batch.add_column(sa.Column("by_category", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("trial_metrics") as batch:
        for name in ("by_category", "lossless_status", *reversed(_METRIC_FLOATS)):
            batch.drop_column(name)
    with op.batch_alter_table("trials") as batch:
        batch.drop_column("concurrency")
        batch.drop_column("backend")
