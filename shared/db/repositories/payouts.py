"""Payout records, claims, the payer's nonces and transactions, and the payouts lease.

Every function runs inside the caller's transaction; the caller commits. The rules that keep a
payout from being paid twice live in the schema, not only here: one claim per orchestrator
(primary key), one transaction per (sender, nonce), one debit per payout (ledger entry key).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from contracts import subjects
from contracts.events import ChainTransactionV1, PayoutStateV1
from contracts.streams import PAYOUTS
from shared.db.engine import dialect_name, insert_for
from shared.db.payout_models import ChainTransaction, Payout, PayoutClaim, PayoutLease, SignerNonce
from shared.db.repositories import outbox

# Payouts that still hold their orchestrator's claim.
OPEN_STATUSES = ("claimed", "signed", "broadcast", "retry", "paid", "short_paid")
# Payouts whose transaction is out of our hands until its receipt.
IN_FLIGHT_STATUSES = ("signed", "broadcast")
# The states this transaction moved payouts to, counted once it commits.
SESSION_PAYOUT_STATES = "payout_states"
_CLAIMS = PayoutClaim.__table__  # type: ignore[attr-defined]
_LEASES = PayoutLease.__table__  # type: ignore[attr-defined]
_NONCES = SignerNonce.__table__  # type: ignore[attr-defined]


def _now() -> datetime:
    return datetime.now(UTC)


# -- the lease -------------------------------------------------------------------------------


async def take_lease(session: AsyncSession, name: str, holder: str, ttl_s: float) -> bool:
    """Take or renew the lease `name` for `holder`; False while another holder's is unexpired."""
    now = _now()
    expires = now + timedelta(seconds=ttl_s)
    renewed = await session.execute(
        update(_LEASES)
        .where(
            _LEASES.c.name == name,
            or_(_LEASES.c.holder == holder, _LEASES.c.expires_at < now),
        )
        .values(holder=holder, expires_at=expires)
    )
    if renewed.rowcount == 1:  # type: ignore[attr-defined]
        return True
    created = await session.execute(
        insert_for(session)(_LEASES)
        .values(name=name, holder=holder, expires_at=expires)
        .on_conflict_do_nothing(index_elements=["name"])
    )
    return bool(created.rowcount == 1)  # type: ignore[attr-defined]


async def release_lease(session: AsyncSession, name: str, holder: str) -> None:
    await session.execute(delete(_LEASES).where(_LEASES.c.name == name, _LEASES.c.holder == holder))


# -- nonces ----------------------------------------------------------------------------------


async def allocate_nonce(session: AsyncSession, sender: str, chain_pending_nonce: int) -> int:
    """The next nonce of `sender`: ours, unless the chain has seen more (the key used elsewhere)."""
    await session.execute(
        insert_for(session)(_NONCES)
        .values(sender=sender, next_nonce=chain_pending_nonce)
        .on_conflict_do_nothing(index_elements=["sender"])
    )
    query = select(_NONCES.c.next_nonce).where(_NONCES.c.sender == sender)
    if dialect_name(session) == "postgresql":
        query = query.with_for_update()
    stored = int((await session.execute(query)).scalar_one())
    nonce = max(stored, chain_pending_nonce)
    await session.execute(
        update(_NONCES).where(_NONCES.c.sender == sender).values(next_nonce=nonce + 1)
    )
    return nonce


# -- payouts and claims ----------------------------------------------------------------------


async def claimed_orchestrators(session: AsyncSession) -> set[str]:
    rows = await session.execute(select(_CLAIMS.c.orchestrator_id))
    return set(rows.scalars())


async def recently_failed(session: AsyncSession, within_s: float) -> set[str]:
    """Orchestrators whose payout reverted or failed less than `within_s` ago: a revert costs
    gas, so the same cause is not paid for every cycle."""
    since = _now() - timedelta(seconds=within_s)
    rows = await session.execute(
        select(col(Payout.orchestrator_id)).where(
            col(Payout.status).in_(("reverted", "failed")), col(Payout.updated_at) >= since
        )
    )
    return set(rows.scalars())


async def claim(session: AsyncSession, payout: Payout) -> Payout | None:
    """Insert the payout and its orchestrator's claim, or nothing if the claim is taken."""
    try:
        async with session.begin_nested():
            session.add(payout)
            await session.flush()
            await session.execute(
                insert(_CLAIMS).values(
                    orchestrator_id=payout.orchestrator_id,
                    payout_id=payout.id,
                    claimed_at=_now(),
                )
            )
    except IntegrityError:  # the claim's primary key: another payout is open
        return None
    return payout


async def release_claim(session: AsyncSession, payout: Payout) -> None:
    await session.execute(
        delete(_CLAIMS).where(
            _CLAIMS.c.orchestrator_id == payout.orchestrator_id,
            _CLAIMS.c.payout_id == payout.id,
        )
    )


async def release_claim_of_key(session: AsyncSession, payout_key: str) -> None:
    found = await session.execute(select(Payout).where(col(Payout.payout_key) == payout_key))
    payout = found.scalar_one_or_none()
    if payout is not None:
        await release_claim(session, payout)


async def with_status(session: AsyncSession, statuses: Iterable[str]) -> list[Payout]:
    rows = await session.execute(
        select(Payout).where(col(Payout.status).in_(list(statuses))).order_by(col(Payout.id))
    )
    return list(rows.scalars())


async def of_transaction(session: AsyncSession, tx_id: int) -> list[Payout]:
    rows = await session.execute(
        select(Payout).where(col(Payout.tx_id) == tx_id).order_by(col(Payout.id))
    )
    return list(rows.scalars())


async def recent(session: AsyncSession, limit: int) -> list[Payout]:
    rows = await session.execute(select(Payout).order_by(col(Payout.id).desc()).limit(limit))
    return list(rows.scalars())


def set_status(payout: Payout, status: str, reason: str | None = None) -> None:
    payout.status = status
    payout.reason = reason
    payout.updated_at = _now()


async def announce(
    session: AsyncSession,
    payout: Payout,
    tx: ChainTransaction | None = None,
) -> None:
    """Queue the payout's new state for the PAYOUTS stream, in the caller's transaction."""
    event = PayoutStateV1(
        payout_key=payout.payout_key,
        orchestrator_id=payout.orchestrator_id,
        recipient=payout.recipient,
        strategy=payout.strategy,
        status=payout.status,
        amount_wei=payout.amount_wei,
        paid_wei=payout.paid_wei,
        tx_hash=tx.tx_hash if tx is not None else None,
        nonce=tx.nonce if tx is not None else None,
        ticket_hash=payout.ticket_hash,
        reason=payout.reason,
        occurred_at=_now(),
    )
    key = f"{payout.payout_key}:{payout.status}:{payout.attempts}"
    await outbox.add_many(
        session, [(PAYOUTS.name, subjects.payout_state(payout.orchestrator_id), event, key)]
    )
    session.info.setdefault(SESSION_PAYOUT_STATES, []).append(payout.status)


# -- transactions ----------------------------------------------------------------------------


async def transactions_with_status(
    session: AsyncSession, statuses: Sequence[str]
) -> list[ChainTransaction]:
    rows = await session.execute(
        select(ChainTransaction)
        .where(col(ChainTransaction.status).in_(list(statuses)))
        .order_by(col(ChainTransaction.nonce))
    )
    return list(rows.scalars())


async def transaction(session: AsyncSession, tx_id: int) -> ChainTransaction | None:
    return await session.get(ChainTransaction, tx_id)


async def announce_transaction(
    session: AsyncSession, tx: ChainTransaction, payout_keys: Sequence[str]
) -> None:
    event = ChainTransactionV1(
        kind=tx.kind,
        sender=tx.sender,
        nonce=tx.nonce,
        status=tx.status,
        tx_hash=tx.tx_hash,
        hashes=list(tx.hashes or [tx.tx_hash]),
        payout_keys=list(payout_keys),
        block_number=tx.block_number,
        occurred_at=_now(),
    )
    key = f"tx:{tx.sender}:{tx.nonce}:{tx.status}:{len(tx.hashes or [])}"
    await outbox.add_many(
        session, [(PAYOUTS.name, subjects.payout_transaction(tx.sender), event, key)]
    )
