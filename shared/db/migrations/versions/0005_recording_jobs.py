"""recording jobs

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26 09:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

import shared.db.types

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "recording_jobs",
        sa.Column("job_id", sqlmodel.sql.sqltypes.AutoString(length=160), nullable=False),
        sa.Column("orchestrator_id", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column("state", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("step", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column("created_at", shared.db.types.UtcDateTime(), nullable=False),
        sa.Column("updated_at", shared.db.types.UtcDateTime(), nullable=False),
        sa.Column("started_at", shared.db.types.UtcDateTime(), nullable=True),
        sa.Column("ended_at", shared.db.types.UtcDateTime(), nullable=True),
        sa.Column("cancel_requested_at", shared.db.types.UtcDateTime(), nullable=True),
        sa.Column("plan_id", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True),
        sa.Column("run_id", sqlmodel.sql.sqltypes.AutoString(length=256), nullable=True),
        sa.Column("notes", sqlmodel.sql.sqltypes.AutoString(length=1024), nullable=True),
        sa.Column("recording_label", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True),
        sa.Column(
            "recording_streamer_id", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True
        ),
        sa.Column("wake_seconds", sa.Integer(), nullable=True),
        sa.Column("max_wait_seconds", sa.Integer(), nullable=False),
        sa.Column("delete_after_upload", sa.Boolean(), nullable=False),
        sa.Column("script", sa.JSON(), nullable=True),
        sa.Column(
            "credit_eth_per_minute", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False
        ),
        sa.Column("host", sqlmodel.sql.sqltypes.AutoString(length=255), nullable=True),
        sa.Column("recording_file", sqlmodel.sql.sqltypes.AutoString(length=255), nullable=True),
        sa.Column("runner_session_id", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True),
        sa.Column("script_started_at", shared.db.types.UtcDateTime(), nullable=True),
        sa.Column("workload_id", sqlmodel.sql.sqltypes.AutoString(length=255), nullable=True),
        sa.Column("duration_ms", sa.BigInteger(), nullable=True),
        sa.Column("artifact_uri", sqlmodel.sql.sqltypes.AutoString(length=1024), nullable=True),
        sa.Column("artifact_hash", sqlmodel.sql.sqltypes.AutoString(length=256), nullable=True),
        sa.Column("error", sqlmodel.sql.sqltypes.AutoString(length=1024), nullable=True),
        sa.Column("steps", sa.JSON(), nullable=True),
        sa.Column("last_step_key", sqlmodel.sql.sqltypes.AutoString(length=300), nullable=False),
        sa.PrimaryKeyConstraint("job_id"),
    )
    with op.batch_alter_table("recording_jobs", schema=None) as batch_op:
        batch_op.create_index(
            "ix_recording_jobs_orchestrator_state", ["orchestrator_id", "state"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_recording_jobs_created_at"), ["created_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("recording_jobs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_recording_jobs_created_at"))
        batch_op.drop_index("ix_recording_jobs_orchestrator_state")

    op.drop_table("recording_jobs")
