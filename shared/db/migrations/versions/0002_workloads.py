"""workloads

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 05:59:47.820199
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

import shared.db.types

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "workloads",
        sa.Column("workload_id", sqlmodel.sql.sqltypes.AutoString(length=255), nullable=False),
        sa.Column("orchestrator_id", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column("kind", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("status", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("plan_id", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True),
        sa.Column("run_id", sqlmodel.sql.sqltypes.AutoString(length=256), nullable=True),
        sa.Column("artifact_hash", sqlmodel.sql.sqltypes.AutoString(length=256), nullable=True),
        sa.Column("artifact_uri", sqlmodel.sql.sqltypes.AutoString(length=512), nullable=True),
        sa.Column("notes", sqlmodel.sql.sqltypes.AutoString(length=1024), nullable=True),
        sa.Column("tx_hash", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True),
        sa.Column("job_id", sqlmodel.sql.sqltypes.AutoString(length=255), nullable=True),
        sa.Column("payout_amount_wei", shared.db.types.Wei(), nullable=False),
        sa.Column("duration_ms", sa.BigInteger(), nullable=True),
        sa.Column(
            "credit_eth_per_minute", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True
        ),
        sa.Column("body_sha256", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("submitted_at", shared.db.types.UtcDateTime(), nullable=False),
        sa.Column("updated_at", shared.db.types.UtcDateTime(), nullable=False),
        sa.Column("credited", sa.Boolean(), nullable=False),
        sa.Column("credited_at", shared.db.types.UtcDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("workload_id"),
    )
    with op.batch_alter_table("workloads", schema=None) as batch_op:
        batch_op.create_index("ix_workloads_artifact_hash", ["artifact_hash"], unique=False)
        batch_op.create_index(
            "ix_workloads_orchestrator_submitted", ["orchestrator_id", "submitted_at"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_workloads_submitted_at"), ["submitted_at"], unique=False
        )

    _forbid_ledger_rewrites()


def _forbid_ledger_rewrites() -> None:
    """The ledger is append-only: the database itself refuses UPDATE and DELETE of entries."""
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "CREATE FUNCTION ledger_entries_append_only() RETURNS trigger AS $$ "
            "BEGIN RAISE EXCEPTION 'ledger_entries is append-only'; END $$ LANGUAGE plpgsql"
        )
        op.execute(
            "CREATE TRIGGER ledger_entries_append_only BEFORE UPDATE OR DELETE ON ledger_entries "
            "FOR EACH ROW EXECUTE FUNCTION ledger_entries_append_only()"
        )
        return
    for action in ("UPDATE", "DELETE"):
        op.execute(
            f"CREATE TRIGGER ledger_entries_no_{action.lower()} BEFORE {action} ON ledger_entries "
            "BEGIN SELECT RAISE(ABORT, 'ledger_entries is append-only'); END"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER ledger_entries_append_only ON ledger_entries")
        op.execute("DROP FUNCTION ledger_entries_append_only()")
    else:
        op.execute("DROP TRIGGER ledger_entries_no_update")
        op.execute("DROP TRIGGER ledger_entries_no_delete")

    with op.batch_alter_table("workloads", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_workloads_submitted_at"))
        batch_op.drop_index("ix_workloads_orchestrator_submitted")
        batch_op.drop_index("ix_workloads_artifact_hash")

    op.drop_table("workloads")
