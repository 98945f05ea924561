"""registry, ledger, inbox, outbox and dead letters

Revision ID: 0001
Revises:
Create Date: 2026-11-25 05:52:57.508025
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

import shared.db.types

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "balances",
        sa.Column("orchestrator_id", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column("balance_wei", shared.db.types.Wei(), nullable=False),
        sa.Column("entry_count", sa.Integer(), nullable=False),
        sa.Column("last_entry_id", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("orchestrator_id"),
    )
    op.create_table(
        "dead_letters",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("consumer", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("stream", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column("subject", sqlmodel.sql.sqltypes.AutoString(length=256), nullable=False),
        sa.Column("stream_seq", sa.BigInteger(), nullable=False),
        sa.Column("event_key", sqlmodel.sql.sqltypes.AutoString(length=300), nullable=True),
        sa.Column("error", sqlmodel.sql.sqltypes.AutoString(length=2000), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("headers", sa.JSON(), nullable=True),
        sa.Column("deliveries", sa.Integer(), nullable=False),
        sa.Column("status", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("created_at", shared.db.types.UtcDateTime(), nullable=False),
        sa.Column("retried_at", shared.db.types.UtcDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("consumer", "stream", "stream_seq", name="uq_dead_letter_message"),
    )
    with op.batch_alter_table("dead_letters", schema=None) as batch_op:
        batch_op.create_index("ix_dead_letters_status", ["status"], unique=False)

    op.create_table(
        "ledger_entries",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("entry_key", sqlmodel.sql.sqltypes.AutoString(length=300), nullable=False),
        sa.Column("orchestrator_id", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column("amount_wei", shared.db.types.Wei(), nullable=False),
        sa.Column("balance_after_wei", shared.db.types.Wei(), nullable=False),
        sa.Column("reason", sqlmodel.sql.sqltypes.AutoString(length=256), nullable=False),
        sa.Column("source_stream", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column("source_seq", sa.BigInteger(), nullable=False),
        sa.Column("source_key", sqlmodel.sql.sqltypes.AutoString(length=300), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=True),
        sa.Column("occurred_at", shared.db.types.UtcDateTime(), nullable=False),
        sa.Column("corrects_entry_id", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("entry_key"),
    )
    with op.batch_alter_table("ledger_entries", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_ledger_entries_occurred_at"), ["occurred_at"], unique=False
        )
        batch_op.create_index("ix_ledger_orchestrator_id", ["orchestrator_id", "id"], unique=False)

    op.create_table(
        "orchestrators",
        sa.Column("orchestrator_id", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column("address", sqlmodel.sql.sqltypes.AutoString(length=42), nullable=False),
        sa.Column("registration_order", sa.BigInteger(), nullable=False),
        sa.Column("eligible_for_payments", sa.Boolean(), nullable=False),
        sa.Column("is_top_100", sa.Boolean(), nullable=False),
        sa.Column("denylisted", sa.Boolean(), nullable=False),
        sa.Column("registration_count", sa.Integer(), nullable=False),
        sa.Column("first_seen", shared.db.types.UtcDateTime(), nullable=True),
        sa.Column("last_seen", shared.db.types.UtcDateTime(), nullable=True),
        sa.Column("last_seen_ip", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
        sa.Column(
            "last_contact_source", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True
        ),
        sa.Column("contact_email", sqlmodel.sql.sqltypes.AutoString(length=255), nullable=True),
        sa.Column("capability", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True),
        sa.Column("host_public_ip", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
        sa.Column("host_name", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True),
        sa.Column("health_url", sqlmodel.sql.sqltypes.AutoString(length=512), nullable=True),
        sa.Column("health_timeout", sa.Float(), nullable=True),
        sa.Column("monitored_services", sa.JSON(), nullable=True),
        sa.Column("min_service_uptime", sa.Float(), nullable=True),
        sa.Column("last_healthy_at", shared.db.types.UtcDateTime(), nullable=True),
        sa.Column("last_missed_all_services", shared.db.types.UtcDateTime(), nullable=True),
        sa.Column("cooldown_expires_at", shared.db.types.UtcDateTime(), nullable=True),
        sa.Column("last_cooldown_started_at", shared.db.types.UtcDateTime(), nullable=True),
        sa.Column("last_cooldown_cleared_at", shared.db.types.UtcDateTime(), nullable=True),
        sa.Column(
            "last_session_upstream_addr", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True
        ),
        sa.Column("last_session_seen_at", shared.db.types.UtcDateTime(), nullable=True),
        sa.Column(
            "last_session_edge_id", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True
        ),
        sa.Column(
            "forwarder_health_source", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True
        ),
        sa.Column("forwarder_health_reported_at", shared.db.types.UtcDateTime(), nullable=True),
        sa.Column("forwarder_health_data", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("orchestrator_id"),
        sa.UniqueConstraint("address"),
    )
    with op.batch_alter_table("orchestrators", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_orchestrators_registration_order"), ["registration_order"], unique=False
        )

    op.create_table(
        "outbox",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("stream", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column("subject", sqlmodel.sql.sqltypes.AutoString(length=256), nullable=False),
        sa.Column("event_key", sqlmodel.sql.sqltypes.AutoString(length=300), nullable=False),
        sa.Column("schema_name", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", shared.db.types.UtcDateTime(), nullable=False),
        sa.Column("published_at", shared.db.types.UtcDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("event_key"),
    )
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.create_index("ix_outbox_pending", ["published_at", "id"], unique=False)

    op.create_table(
        "processed_events",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("consumer", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("event_key", sqlmodel.sql.sqltypes.AutoString(length=300), nullable=False),
        sa.Column("stream", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column("stream_seq", sa.BigInteger(), nullable=False),
        sa.Column("outcome", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("consumer", "event_key", name="uq_processed_consumer_key"),
    )


def downgrade() -> None:

    op.drop_table("processed_events")
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.drop_index("ix_outbox_pending")

    op.drop_table("outbox")
    with op.batch_alter_table("orchestrators", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_orchestrators_registration_order"))

    op.drop_table("orchestrators")
    with op.batch_alter_table("ledger_entries", schema=None) as batch_op:
        batch_op.drop_index("ix_ledger_orchestrator_id")
        batch_op.drop_index(batch_op.f("ix_ledger_entries_occurred_at"))

    op.drop_table("ledger_entries")
    with op.batch_alter_table("dead_letters", schema=None) as batch_op:
        batch_op.drop_index("ix_dead_letters_status")

    op.drop_table("dead_letters")
    op.drop_table("balances")
