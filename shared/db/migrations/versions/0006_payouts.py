"""payouts: payout records, claims, chain transactions, nonces and the worker lease

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-25 09:15:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

import shared.db.types

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _text(length: int) -> sqlmodel.sql.sqltypes.AutoString:
    return sqlmodel.sql.sqltypes.AutoString(length=length)


def upgrade() -> None:
    op.create_table(
        "payouts",
        sa.Column("id", BIG_ID, primary_key=True, autoincrement=True),
        sa.Column("payout_key", _text(200), nullable=False),
        sa.Column("orchestrator_id", _text(128), nullable=False),
        sa.Column("recipient", _text(42), nullable=False),
        sa.Column("strategy", _text(32), nullable=False),
        sa.Column("amount_wei", shared.db.types.Wei(), nullable=False),
        sa.Column("paid_wei", shared.db.types.Wei(), nullable=True),
        sa.Column("status", _text(32), nullable=False),
        sa.Column("tx_id", sa.BigInteger(), nullable=True),
        sa.Column("ticket", sa.JSON(), nullable=True),
        sa.Column("ticket_hash", _text(66), nullable=True),
        sa.Column("reason", _text(500), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("created_at", shared.db.types.UtcDateTime(), nullable=False),
        sa.Column("updated_at", shared.db.types.UtcDateTime(), nullable=False),
        sa.UniqueConstraint("payout_key"),
    )
    op.create_index("ix_payouts_orchestrator_id", "payouts", ["orchestrator_id"])
    op.create_index("ix_payouts_status", "payouts", ["status"])
    op.create_index("ix_payouts_ticket_hash", "payouts", ["ticket_hash"])
    op.create_table(
        "payout_claims",
        sa.Column("orchestrator_id", _text(128), primary_key=True),
        sa.Column("payout_id", sa.BigInteger(), nullable=False),
        sa.Column("claimed_at", shared.db.types.UtcDateTime(), nullable=False),
    )
    op.create_table(
        "chain_transactions",
        sa.Column("id", BIG_ID, primary_key=True, autoincrement=True),
        sa.Column("kind", _text(32), nullable=False),
        sa.Column("sender", _text(42), nullable=False),
        sa.Column("nonce", sa.BigInteger(), nullable=False),
        sa.Column("status", _text(32), nullable=False),
        sa.Column("raw_tx", sa.LargeBinary(), nullable=False),
        sa.Column("tx_params", sa.JSON(), nullable=True),
        sa.Column("tx_hash", _text(66), nullable=False),
        sa.Column("hashes", sa.JSON(), nullable=True),
        sa.Column("gas", sa.BigInteger(), nullable=False),
        sa.Column("value_wei", shared.db.types.Wei(), nullable=False),
        sa.Column("max_fee_per_gas_wei", shared.db.types.Wei(), nullable=False),
        sa.Column("max_priority_fee_per_gas_wei", shared.db.types.Wei(), nullable=False),
        sa.Column("fee_bumps", sa.Integer(), nullable=False),
        sa.Column("block_number", sa.BigInteger(), nullable=True),
        sa.Column("receipt_status", sa.Integer(), nullable=True),
        sa.Column("created_at", shared.db.types.UtcDateTime(), nullable=False),
        sa.Column("broadcast_at", shared.db.types.UtcDateTime(), nullable=True),
        sa.Column("updated_at", shared.db.types.UtcDateTime(), nullable=False),
        sa.UniqueConstraint("sender", "nonce", name="uq_chain_tx_sender_nonce"),
    )
    op.create_index("ix_chain_transactions_status", "chain_transactions", ["status"])
    op.create_table(
        "signer_nonces",
        sa.Column("sender", _text(42), primary_key=True),
        sa.Column("next_nonce", sa.BigInteger(), nullable=False),
    )
    op.create_table(
        "payout_leases",
        sa.Column("name", _text(128), primary_key=True),
        sa.Column("holder", _text(128), nullable=False),
        sa.Column("expires_at", shared.db.types.UtcDateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("payout_leases")
    op.drop_table("signer_nonces")
    op.drop_index("ix_chain_transactions_status", table_name="chain_transactions")
    op.drop_table("chain_transactions")
    op.drop_table("payout_claims")
    op.drop_index("ix_payouts_ticket_hash", table_name="payouts")
    op.drop_index("ix_payouts_status", table_name="payouts")
    op.drop_index("ix_payouts_orchestrator_id", table_name="payouts")
    op.drop_table("payouts")
