"""The payouts worker's own tables: payout records, chain transactions, nonces and the lease.

Unlike shared.db.models, these are not projections of the streams: they are the state of money
leaving the system, written before each step that could pay (claim before signing, the signed
transaction before broadcasting). `payments replay` does not rebuild them; it rebuilds the
`payout` debits they caused from the PAYOUTS stream. Back them up with the database.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Column, LargeBinary, UniqueConstraint
from sqlmodel import Field, SQLModel

from shared.db.models import _id, _json, _utc
from shared.db.types import Wei


class Payout(SQLModel, table=True):
    """One payment of an orchestrator's balance, from claim to debit.

    status: claimed -> signed -> broadcast -> paid | short_paid, or retry (a ticket a mined
    transaction did not redeem: it goes out again unchanged), reverted, failed, expired.
    `payout_key` names it everywhere: the debit's entry key and the PAYOUTS message ids.
    """

    __tablename__ = "payouts"

    id: int | None = _id()
    payout_key: str = Field(max_length=200, unique=True)
    orchestrator_id: str = Field(max_length=128, index=True)
    recipient: str = Field(max_length=42)
    strategy: str = Field(max_length=32)
    amount_wei: int = Field(sa_column=Column(Wei(), nullable=False))
    paid_wei: int | None = Field(default=None, sa_column=Column(Wei(), nullable=True))
    status: str = Field(max_length=32, index=True)
    tx_id: int | None = Field(default=None, sa_type=BigInteger)
    # The signed ticket (livepeer_ticket): once broadcast it is public, so it is reused until
    # it is redeemed or expires, never replaced by a second ticket for the same money.
    ticket: dict[str, Any] | None = _json()
    ticket_hash: str | None = Field(default=None, max_length=66, index=True)
    reason: str | None = Field(default=None, max_length=500)
    attempts: int = 0
    created_at: datetime | None = _utc(nullable=False)
    updated_at: datetime | None = _utc(nullable=False)


class PayoutClaim(SQLModel, table=True):
    """At most one open payout per orchestrator: the primary key refuses a second claim."""

    __tablename__ = "payout_claims"

    orchestrator_id: str = Field(primary_key=True, max_length=128)
    payout_id: int = Field(sa_type=BigInteger)
    claimed_at: datetime | None = _utc(nullable=False)


class ChainTransaction(SQLModel, table=True):
    """A transaction of the payer account; one row per nonce, whatever its fee bumps.

    The raw signed bytes and hash are stored before the first broadcast, so a crash is followed
    by a rebroadcast of the same bytes, never a second transaction. A replacement keeps the
    nonce and appends its hash to `hashes`: only one of them can ever be mined.
    status: signed -> broadcast -> mined | reverted.
    """

    __tablename__ = "chain_transactions"
    __table_args__ = (UniqueConstraint("sender", "nonce", name="uq_chain_tx_sender_nonce"),)

    id: int | None = _id()
    kind: str = Field(max_length=32)  # eth_transfer | redeem | batch_redeem | fund_deposit
    sender: str = Field(max_length=42)
    nonce: int = Field(sa_type=BigInteger)
    status: str = Field(max_length=32, index=True)
    raw_tx: bytes = Field(sa_column=Column(LargeBinary(), nullable=False))
    # What was signed (to, data, value, gas, chainId): a fee bump re-signs it with the same nonce.
    tx_params: dict[str, Any] | None = _json()
    tx_hash: str = Field(max_length=66)
    hashes: list[str] | None = _json()
    gas: int = Field(sa_type=BigInteger)
    value_wei: int = Field(sa_column=Column(Wei(), nullable=False))
    max_fee_per_gas_wei: int = Field(sa_column=Column(Wei(), nullable=False))
    max_priority_fee_per_gas_wei: int = Field(sa_column=Column(Wei(), nullable=False))
    fee_bumps: int = 0
    block_number: int | None = Field(default=None, sa_type=BigInteger)
    receipt_status: int | None = None
    created_at: datetime | None = _utc(nullable=False)
    broadcast_at: datetime | None = _utc()
    updated_at: datetime | None = _utc(nullable=False)


class SignerNonce(SQLModel, table=True):
    """The payer's next nonce, allocated here atomically (never read from the node per send)."""

    __tablename__ = "signer_nonces"

    sender: str = Field(primary_key=True, max_length=42)
    next_nonce: int = Field(sa_type=BigInteger)


class PayoutLease(SQLModel, table=True):
    """Which payouts worker drives the payer account now: one at a time, so its transactions
    form one ordered queue; another copy takes over when the lease is not renewed."""

    __tablename__ = "payout_leases"

    name: str = Field(primary_key=True, max_length=128)
    holder: str = Field(max_length=128)
    expires_at: datetime | None = _utc(nullable=False)
