"""The payout store's rules on both databases: one open payout per orchestrator, nonces handed
out once and in order, one lease holder at a time."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared.db.payout_models import Payout
from shared.db.repositories import payouts as store
from tests.harness import wait_for

PAYER = "0x" + "ab" * 20


def payout(key: str, orchestrator_id: str = "orch-a") -> Payout:
    now = datetime.now(UTC)
    return Payout(
        payout_key=key,
        orchestrator_id=orchestrator_id,
        recipient="0x" + "11" * 20,
        strategy="eth_transfer",
        amount_wei=10**15,
        status="claimed",
        created_at=now,
        updated_at=now,
    )


async def test_a_second_claim_for_the_same_orchestrator_is_refused(
    db_sessions: async_sessionmaker[AsyncSession],
) -> None:
    async with db_sessions() as session, session.begin():
        first = await store.claim(session, payout("payout:a:1"))
        second = await store.claim(session, payout("payout:a:2"))
        other = await store.claim(session, payout("payout:b:1", "orch-b"))
    assert first is not None and other is not None
    assert second is None
    async with db_sessions() as session:
        keys = (await session.execute(select(Payout.payout_key))).scalars().all()
        assert sorted(keys) == ["payout:a:1", "payout:b:1"]
        assert await store.claimed_orchestrators(session) == {"orch-a", "orch-b"}
    async with db_sessions() as session, session.begin():
        await store.release_claim(session, first)
        assert await store.claim(session, payout("payout:a:3")) is not None


async def test_nonces_are_handed_out_once_in_order_and_follow_a_busier_chain(
    db_sessions: async_sessionmaker[AsyncSession],
) -> None:
    async def allocate(chain_pending: int) -> int:
        async with db_sessions() as session, session.begin():
            return await store.allocate_nonce(session, PAYER, chain_pending)

    assert [await allocate(5) for _ in range(3)] == [5, 6, 7]
    # The node has seen more (the key was used elsewhere): ours jumps ahead, never back.
    assert await allocate(20) == 20
    assert await allocate(3) == 21
    # Concurrent allocations never share a nonce.
    found = await asyncio.gather(*(allocate(0) for _ in range(8)))
    assert sorted(found) == list(range(22, 30))


async def test_one_lease_holder_until_the_lease_lapses(
    db_sessions: async_sessionmaker[AsyncSession],
) -> None:
    async def take(holder: str, ttl_s: float) -> bool:
        async with db_sessions() as session, session.begin():
            return await store.take_lease(session, "payouts:test", holder, ttl_s)

    assert await take("a", 30.0)
    assert not await take("b", 30.0)
    assert await take("a", 0.0)  # the holder renews (here: to an immediate expiry)
    assert await wait_for(lambda: take("b", 30.0))  # lapsed: another copy takes over
    assert not await take("a", 30.0)
