"""The outbox relay against a real nats-server: atomic batches, republishing, background drain."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from nats.aio.client import Client as NatsClient
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from contracts import subjects
from contracts.events import LedgerEntryV1
from contracts.streams import LEDGER
from shared.atomic_batch import AtomicBatchRejected, OutgoingMessage, publish_atomic
from shared.db.models import OutboxMessage
from shared.db.repositories import outbox
from shared.outbox_relay import OutboxRelay

ENTRIES = 7


def entry(number: int) -> LedgerEntryV1:
    return LedgerEntryV1(
        entry_id=number,
        entry_key=f"workload:relay-{number}",
        orchestrator_id="orch-relay",
        amount_wei=number,
        balance_after_wei=number,
        reason="workload_time",
        source_stream="WORKLOADS",
        source_seq=number,
        source_key=f"workload_time:relay-{number}",
        metadata={},
        occurred_at=datetime.now(UTC),
    )


async def write_outbox(
    sessions: async_sessionmaker[AsyncSession], count: int, prefix: str = "relay"
) -> list[outbox.PendingOutbox]:
    """One commit's outbox rows, keys `ledger:<prefix>-<n>`, as the relay gets them."""
    async with sessions() as session:
        await outbox.add_many(
            session,
            [
                (LEDGER.name, subjects.ledger_entry("orch-relay"), entry(n), f"ledger:{prefix}-{n}")
                for n in range(1, count + 1)
            ],
        )
        await session.commit()
        return outbox.pending_of(session)


async def ledger_count(nc: NatsClient) -> int:
    info = await nc.jetstream().stream_info(LEDGER.name)
    return int(info.state.messages)


async def test_relay_publishes_a_commit_as_one_batch_and_marks_it(
    ops_nc: NatsClient, db_sessions: async_sessionmaker[AsyncSession]
) -> None:
    rows = await write_outbox(db_sessions, ENTRIES)
    relay = OutboxRelay(db_sessions, ops_nc, "test")
    await relay.publish_now(rows)
    assert await ledger_count(ops_nc) == ENTRIES
    async with db_sessions() as session:
        assert await outbox.pending_count(session) == 0
    messages = [await ops_nc.jetstream().get_msg(LEDGER.name, seq) for seq in range(1, ENTRIES + 1)]
    assert [m.headers["Nats-Msg-Id"] for m in messages if m.headers] == [
        f"ledger:relay-{n}" for n in range(1, ENTRIES + 1)
    ]


async def test_republishing_after_a_crash_before_the_mark_stores_nothing_twice(
    ops_nc: NatsClient, db_sessions: async_sessionmaker[AsyncSession]
) -> None:
    rows = await write_outbox(db_sessions, ENTRIES)
    relay = OutboxRelay(db_sessions, ops_nc, "test")
    await relay.publish_now(rows[:3])
    # A crash between the publish and the mark: the rows look unpublished again.
    async with db_sessions() as session, session.begin():
        await session.execute(
            update(OutboxMessage.__table__).values(published_at=None)  # type: ignore[attr-defined]
        )
    await relay.publish_now(rows)  # the batch holds 3 stored ids: refused whole, then one by one
    assert await ledger_count(ops_nc) == ENTRIES
    async with db_sessions() as session:
        assert await outbox.pending_count(session) == 0


async def test_an_atomic_batch_with_a_stored_id_is_refused_whole(ops_nc: NatsClient) -> None:
    def message(n: int) -> OutgoingMessage:
        key = f"ledger:atomic-{n}"
        return OutgoingMessage(
            subject=subjects.ledger_entry("orch-atomic"),
            body=entry(n).model_dump_json().encode(),
            headers={"Nats-Msg-Id": key},
        )

    ack = await publish_atomic(ops_nc, [message(1), message(2)], timeout_s=5.0)
    assert (ack.stream, ack.count, ack.last_seq) == (LEDGER.name, 2, 2)
    with pytest.raises(AtomicBatchRejected) as refused:
        await publish_atomic(ops_nc, [message(2), message(3)], timeout_s=5.0)
    assert refused.value.code == 10201
    assert await ledger_count(ops_nc) == 2


async def test_submitted_rows_are_published_by_the_drain_task_before_stop_returns(
    ops_nc: NatsClient, db_sessions: async_sessionmaker[AsyncSession]
) -> None:
    relay = OutboxRelay(db_sessions, ops_nc, "test")
    relay.start()
    for commit in range(3):
        await relay.submit(await write_outbox(db_sessions, ENTRIES, prefix=f"commit{commit}"))
    await relay.stop(timeout_s=10.0)
    assert await ledger_count(ops_nc) == 3 * ENTRIES
    async with db_sessions() as session:
        assert await outbox.pending_count(session) == 0
