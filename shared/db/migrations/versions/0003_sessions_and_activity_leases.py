"""sessions and activity leases

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25 06:21:51.286400
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

import shared.db.types

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "activity_leases",
        sa.Column("lease_id", sqlmodel.sql.sqltypes.AutoString(length=160), nullable=False),
        sa.Column("partition", sa.Integer(), nullable=False),
        sa.Column("orchestrator_id", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column("upstream_addr", sqlmodel.sql.sqltypes.AutoString(length=255), nullable=True),
        sa.Column("kind", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=True),
        sa.Column("lease_seconds", sa.Integer(), nullable=False),
        sa.Column("issued_at", shared.db.types.UtcDateTime(), nullable=False),
        sa.Column("last_seen_at", shared.db.types.UtcDateTime(), nullable=False),
        sa.Column("last_seen_ip", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
        sa.Column("expires_at", shared.db.types.UtcDateTime(), nullable=False),
        sa.Column("revoked_at", shared.db.types.UtcDateTime(), nullable=True),
        sa.Column("expired_at", shared.db.types.UtcDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("lease_id"),
    )
    with op.batch_alter_table("activity_leases", schema=None) as batch_op:
        batch_op.create_index(
            "ix_activity_leases_orchestrator", ["orchestrator_id", "expires_at"], unique=False
        )
        batch_op.create_index(
            "ix_activity_leases_partition", ["partition", "expires_at"], unique=False
        )

    op.create_table(
        "sessions",
        sa.Column("session_id", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column("partition", sa.Integer(), nullable=False),
        sa.Column("orchestrator_id", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True),
        sa.Column("upstream_addr", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("upstream_port", sa.Integer(), nullable=False),
        sa.Column("edge_id", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
        sa.Column("run", sa.Integer(), nullable=False),
        sa.Column("started_at", shared.db.types.UtcDateTime(), nullable=False),
        sa.Column("last_seen_at", shared.db.types.UtcDateTime(), nullable=False),
        sa.Column("ended_at", shared.db.types.UtcDateTime(), nullable=True),
        sa.Column("end_trigger", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=True),
        sa.Column("last_event", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("updated_at", shared.db.types.UtcDateTime(), nullable=False),
        sa.Column("last_billed_at", shared.db.types.UtcDateTime(), nullable=False),
        sa.Column("billed_ms", sa.BigInteger(), nullable=False),
        sa.Column("billed_wei", shared.db.types.Wei(), nullable=False),
        sa.Column("last_credited_wei", shared.db.types.Wei(), nullable=False),
        sa.Column("metered_ms", sa.BigInteger(), nullable=False),
        sa.Column("segment_index", sa.Integer(), nullable=False),
        sa.Column("heartbeat_count", sa.Integer(), nullable=False),
        sa.Column("segments", sa.JSON(), nullable=True),
        sa.Column("last_credit_proof", sqlmodel.sql.sqltypes.AutoString(length=80), nullable=True),
        sa.Column(
            "credit_eth_per_minute", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False
        ),
        sa.Column("segment_seconds", sa.Integer(), nullable=False),
        sa.Column("idle_timeout_seconds", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("session_id"),
    )
    with op.batch_alter_table("sessions", schema=None) as batch_op:
        batch_op.create_index(
            "ix_sessions_orchestrator_started", ["orchestrator_id", "started_at"], unique=False
        )
        batch_op.create_index("ix_sessions_partition_live", ["partition", "ended_at"], unique=False)
        batch_op.create_index(
            "ix_sessions_upstream_addr", ["upstream_addr", "last_seen_at"], unique=False
        )


def downgrade() -> None:

    with op.batch_alter_table("sessions", schema=None) as batch_op:
        batch_op.drop_index("ix_sessions_upstream_addr")
        batch_op.drop_index("ix_sessions_partition_live")
        batch_op.drop_index("ix_sessions_orchestrator_started")

    op.drop_table("sessions")
    with op.batch_alter_table("activity_leases", schema=None) as batch_op:
        batch_op.drop_index("ix_activity_leases_partition")
        batch_op.drop_index("ix_activity_leases_orchestrator")

    op.drop_table("activity_leases")
