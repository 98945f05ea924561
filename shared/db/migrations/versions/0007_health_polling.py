"""health polling: miss counting on orchestrators, and the pollers' per-round claims

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-25 09:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

import shared.db.types

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("orchestrators") as batch:
        batch.add_column(
            sa.Column("health_checked_at", shared.db.types.UtcDateTime(), nullable=True)
        )
        batch.add_column(
            sa.Column("consecutive_misses", sa.Integer(), nullable=False, server_default="0")
        )
    op.create_table(
        "health_poll_claims",
        sa.Column("orchestrator_id", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column("round_number", sa.BigInteger(), nullable=False),
        sa.Column("holder", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column("claimed_at", shared.db.types.UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("orchestrator_id", "round_number"),
    )


def downgrade() -> None:
    op.drop_table("health_poll_claims")
    with op.batch_alter_table("orchestrators") as batch:
        batch.drop_column("consecutive_misses")
        batch.drop_column("health_checked_at")
