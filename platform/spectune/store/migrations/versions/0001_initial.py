"""initial schema: sweeps, trials, metrics, per-prompt results, hardware, baselines, serving

Revision ID: 0001
Revises:
Create Date: 2025-01-01 00:00:00

"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "hardware",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("device", sa.String(32), nullable=False),
        sa.Column("cpu_model", sa.String(256), nullable=True),
        sa.Column("gpu_model", sa.String(256), nullable=True),
        sa.Column("n_cpus", sa.Integer(), nullable=True),
        sa.Column("torch_version", sa.String(64), nullable=True),
        sa.Column("transformers_version", sa.String(64), nullable=True),
        sa.Column("hostname", sa.String(256), nullable=True),
        sa.Column("extra", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_hardware")),
        sa.UniqueConstraint("fingerprint", name=op.f("uq_hardware_fingerprint")),
    )
    op.create_table(
        "sweeps",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("started_at", _TS, nullable=True),
        sa.Column("finished_at", _TS, nullable=True),
        sa.Column("who", sa.String(128), nullable=True),
        sa.Column("hostname", sa.String(256), nullable=True),
        sa.Column("ray_address", sa.String(256), nullable=True),
        sa.CheckConstraint(
            "status IN ('pending', 'running', 'done', 'error', 'interrupted')",
            name=op.f("ck_sweeps_status"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sweeps")),
        sa.UniqueConstraint("name", name=op.f("uq_sweeps_name")),
    )
    op.create_table(
        "trials",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sweep_id", sa.Integer(), nullable=False),
        sa.Column("trial_key", sa.String(200), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("method", sa.String(64), nullable=True),
        sa.Column("draft_len", sa.Integer(), nullable=True),
        sa.Column("tree_shape", sa.Text(), nullable=True),
        sa.Column("node_budget", sa.Integer(), nullable=True),
        sa.Column("exit_layer", sa.Integer(), nullable=True),
        sa.Column("temperature", sa.Double(), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("started_at", _TS, nullable=True),
        sa.Column("finished_at", _TS, nullable=True),
        sa.Column("hardware_id", sa.Integer(), nullable=True),
        sa.CheckConstraint(
            "status IN ('pending', 'running', 'done', 'error')", name=op.f("ck_trials_status")
        ),
        sa.ForeignKeyConstraint(["hardware_id"], ["hardware.id"],
                                name=op.f("fk_trials_hardware_id_hardware")),
        sa.ForeignKeyConstraint(["sweep_id"], ["sweeps.id"], ondelete="CASCADE",
                                name=op.f("fk_trials_sweep_id_sweeps")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_trials")),
        sa.UniqueConstraint("sweep_id", "trial_key", name=op.f("uq_trials_sweep_id_trial_key")),
    )
    op.create_index(op.f("ix_trials_sweep_id"), "trials", ["sweep_id"])
    op.create_index(op.f("ix_trials_hardware_id"), "trials", ["hardware_id"])
    op.create_table(
        "trial_metrics",
        sa.Column("trial_id", sa.Integer(), nullable=False),
        sa.Column("method", sa.String(64), nullable=True),
        sa.Column("config", sa.JSON(), nullable=True),
        sa.Column("n_prompts", sa.Integer(), nullable=True),
        sa.Column("new_tokens", sa.Integer(), nullable=True),
        sa.Column("target_calls", sa.Integer(), nullable=True),
        sa.Column("draft_calls", sa.Integer(), nullable=True),
        sa.Column("mean_accepted_tokens", sa.Double(), nullable=True),
        sa.Column("acceptance_rate", sa.Double(), nullable=True),
        sa.Column("acceptance_by_position", sa.JSON(), nullable=True),
        sa.Column("wall_s", sa.Double(), nullable=True),
        sa.Column("wall_s_std", sa.Double(), nullable=True),
        sa.Column("tokens_per_s", sa.Double(), nullable=True),
        sa.Column("ar_tokens_per_s", sa.Double(), nullable=True),
        sa.Column("speedup", sa.Double(), nullable=True),
        sa.Column("speedup_std", sa.Double(), nullable=True),
        sa.Column("lossless", sa.Boolean(), nullable=True),
        sa.Column("lossy_method", sa.Boolean(), nullable=False),
        sa.Column("mismatches", sa.Integer(), nullable=True),
        sa.Column("tree_tokens_per_step", sa.Double(), nullable=True),
        sa.Column("draft_calls_per_step", sa.Double(), nullable=True),
        sa.Column("draft_share", sa.Double(), nullable=True),
        sa.Column("ms_per_token", sa.Double(), nullable=True),
        sa.Column("peak_mem_mb", sa.Double(), nullable=True),
        sa.Column("acceptance_by_exit_layer", sa.JSON(), nullable=True),
        sa.Column("extra", sa.JSON(), nullable=False),
        sa.Column("recorded_at", _TS, nullable=False),
        sa.ForeignKeyConstraint(["trial_id"], ["trials.id"], ondelete="CASCADE",
                                name=op.f("fk_trial_metrics_trial_id_trials")),
        sa.PrimaryKeyConstraint("trial_id", name=op.f("pk_trial_metrics")),
    )
    op.create_table(
        "prompt_results",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("trial_id", sa.Integer(), nullable=False),
        sa.Column("prompt_id", sa.String(200), nullable=False),
        sa.Column("new_tokens", sa.Integer(), nullable=True),
        sa.Column("target_calls", sa.Integer(), nullable=True),
        sa.Column("mean_accepted_tokens", sa.Double(), nullable=True),
        sa.Column("wall_s", sa.Double(), nullable=True),
        sa.Column("matches_ar", sa.Boolean(), nullable=True),
        sa.Column("text", sa.Text(), nullable=True),
        sa.Column("extra", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["trial_id"], ["trials.id"], ondelete="CASCADE",
                                name=op.f("fk_prompt_results_trial_id_trials")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_prompt_results")),
        sa.UniqueConstraint("trial_id", "prompt_id",
                            name=op.f("uq_prompt_results_trial_id_prompt_id")),
    )
    op.create_table(
        "serving",
        sa.Column("slot", sa.String(64), nullable=False),
        sa.Column("trial_id", sa.Integer(), nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
        sa.ForeignKeyConstraint(["trial_id"], ["trials.id"], ondelete="CASCADE",
                                name=op.f("fk_serving_trial_id_trials")),
        sa.PrimaryKeyConstraint("slot", name=op.f("pk_serving")),
    )
    op.create_table(
        "ar_baselines",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("pair_id", sa.String(512), nullable=False),
        sa.Column("target_path", sa.Text(), nullable=True),
        sa.Column("drafter_path", sa.Text(), nullable=True),
        sa.Column("prompt_set_hash", sa.String(128), nullable=False),
        sa.Column("hardware_id", sa.Integer(), nullable=False),
        sa.Column("max_new_tokens", sa.Integer(), nullable=False),
        sa.Column("temperature", sa.Double(), nullable=False),
        sa.Column("ar_tokens_per_s", sa.Double(), nullable=False),
        sa.Column("measured_at", _TS, nullable=False),
        sa.Column("extra", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["hardware_id"], ["hardware.id"],
                                name=op.f("fk_ar_baselines_hardware_id_hardware")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ar_baselines")),
        sa.UniqueConstraint(
            "pair_id", "prompt_set_hash", "hardware_id", "max_new_tokens", "temperature",
            name=op.f("uq_ar_baselines_key"),
        ),
    )


def downgrade() -> None:
    op.drop_table("ar_baselines")
    op.drop_table("serving")
    op.drop_table("prompt_results")
    op.drop_table("trial_metrics")
    op.drop_index(op.f("ix_trials_hardware_id"), table_name="trials")
    op.drop_index(op.f("ix_trials_sweep_id"), table_name="trials")
    op.drop_table("trials")
    op.drop_table("sweeps")
    op.drop_table("hardware")
