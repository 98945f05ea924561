"""The ledger consumer's prepared path when another copy gets there first.

A batch is worked out from reads outside the write lock and written under it. Here a second
copy of the worker commits between the first copy's prepare and its write, as two processes can:
the first copy's INSERTs then fail a unique key, its transaction rolls back, and it applies the
batch again under the lock. Whatever the interleaving, the workload is credited once, on SQLite
and on PostgreSQL.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlmodel import col

from contracts import subjects
from contracts.events import WorkloadTimeRecordedV1
from contracts.streams import LEDGER_WORKLOADS_CONSUMER, WORKLOADS
from shared.db.engine import make_engine, make_sessionmaker
from shared.db.models import Balance, LedgerEntry, Orchestrator, ProcessedEvent, Workload
from shared.event_consumer import Decoded, Delivery, EventConsumer, Plan, PreparedBatch
from shared.money import rate_credit_wei
from shared.publishing import event_headers
from tests.harness import Database
from workers.ledger import SCHEMAS, LedgerProjector, WorkloadEvent

CONSUMER = LEDGER_WORKLOADS_CONSUMER.durable
ORCHESTRATOR = "o-prepared"
RATE = "0.000005353596"
DURATION_MS = 180_000
RECEIVED_AT = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def delivery(seq: int, workload_id: str, key: str) -> Delivery:
    event = WorkloadTimeRecordedV1(
        workload_id=workload_id,
        orchestrator_id=ORCHESTRATOR,
        duration_ms=DURATION_MS,
        credit_eth_per_minute=RATE,
        artifact_uri="/out.webm",
        body_sha256=hashlib.sha256(workload_id.encode()).hexdigest(),
        received_at=RECEIVED_AT,
    )
    headers = event_headers(event, key)
    return Delivery(
        subject=subjects.workload_time(ORCHESTRATOR),
        stream=WORKLOADS.name,
        stream_seq=seq,
        num_delivered=1,
        num_pending=0,
        headers=headers,
        body=event.model_dump_json().encode(),
        event_key=key,
        schema=event.SCHEMA,
    )


class Interleaved(LedgerProjector):
    """Runs `meanwhile` (another copy's commit) after preparing, before the write."""

    def __init__(self, meanwhile: Callable[[], Awaitable[Any]]) -> None:
        self.meanwhile = meanwhile
        self.prepared = 0

    async def prepare(
        self, reader: AsyncSession, items: Sequence[Decoded[WorkloadEvent]]
    ) -> PreparedBatch | None:
        prepared = await super().prepare(reader, items)
        self.prepared += 1
        await self.meanwhile()
        return prepared


@pytest.fixture
async def sessions(
    database: Database,
) -> AsyncIterator[tuple[async_sessionmaker[AsyncSession], async_sessionmaker[AsyncSession]]]:
    writer, reader = make_engine(database.url), make_engine(database.url, writer=False)
    async with make_sessionmaker(writer)() as session, session.begin():
        await session.execute(
            insert(Orchestrator).values(
                orchestrator_id=ORCHESTRATOR, address="0x" + "7" * 40, registration_order=1
            )
        )
    yield make_sessionmaker(writer), make_sessionmaker(reader)
    await writer.dispose()
    await reader.dispose()


async def ledger_state(sessions: async_sessionmaker[AsyncSession]) -> dict[str, Any]:
    async with sessions() as session:

        async def count(model: Any) -> int:
            query = select(func.count()).select_from(model)
            return int((await session.execute(query)).scalar_one())

        balance = await session.execute(
            select(col(Balance.balance_wei)).where(col(Balance.orchestrator_id) == ORCHESTRATOR)
        )
        return {
            "entries": await count(LedgerEntry),
            "workloads": await count(Workload),
            "inbox": await count(ProcessedEvent),
            "balance": int(balance.scalar_one()),
        }


async def race(
    sessions: tuple[async_sessionmaker[AsyncSession], async_sessionmaker[AsyncSession]],
    ours: Delivery,
    theirs: Delivery,
    caplog: pytest.LogCaptureFixture,
) -> Plan[Any]:
    """Our copy prepares `ours`; the other copy commits `theirs` before our write, which then
    falls back to the locked path (checked: the race did happen)."""
    writer, reader = sessions
    other: EventConsumer[Any] = EventConsumer(
        consumer=CONSUMER, schemas=SCHEMAS, projector=LedgerProjector(), sessionmaker=writer
    )
    projector = Interleaved(lambda: other.apply_final([theirs]))
    ours_consumer: EventConsumer[Any] = EventConsumer(
        consumer=CONSUMER,
        schemas=SCHEMAS,
        projector=projector,
        sessionmaker=writer,
        reader=reader,
    )
    with caplog.at_level(logging.INFO, logger="shared.event_consumer"):
        plan = await ours_consumer.apply_final([ours])
    assert projector.prepared == 1
    assert "batch changed since it was prepared" in caplog.text
    return plan


CREDIT_WEI = rate_credit_wei(DURATION_MS, RATE)


async def test_the_same_message_committed_by_another_copy_meanwhile_is_a_duplicate(
    sessions: tuple[async_sessionmaker[AsyncSession], async_sessionmaker[AsyncSession]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    message = delivery(1, "w-race", "workload_time:w-race")
    plan = await race(sessions, message, message, caplog)
    assert plan.duplicates == [message] and not plan.applied
    assert await ledger_state(sessions[0]) == {
        "entries": 1,
        "workloads": 1,
        "inbox": 1,
        "balance": CREDIT_WEI,
    }


async def test_the_same_workload_under_another_key_meanwhile_is_credited_once(
    sessions: tuple[async_sessionmaker[AsyncSession], async_sessionmaker[AsyncSession]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    ours = delivery(2, "w-twice", "workload_time:w-twice:retry")
    theirs = delivery(1, "w-twice", "workload_time:w-twice")
    plan = await race(sessions, ours, theirs, caplog)
    # Applied under the lock as what it now is: a repeat of a stored workload.
    assert [outcome.detail for _, outcome in plan.applied] == [
        {"duplicate": True, "conflict": False}
    ]
    assert await ledger_state(sessions[0]) == {
        "entries": 1,
        "workloads": 1,
        "inbox": 2,
        "balance": CREDIT_WEI,
    }


async def test_without_a_race_the_prepared_batch_is_written_as_prepared(
    sessions: tuple[async_sessionmaker[AsyncSession], async_sessionmaker[AsyncSession]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def nothing() -> None:
        return None

    writer, reader = sessions
    projector = Interleaved(nothing)
    consumer: EventConsumer[Any] = EventConsumer(
        consumer=CONSUMER, schemas=SCHEMAS, projector=projector, sessionmaker=writer, reader=reader
    )
    messages = [delivery(seq, f"w-{seq}", f"workload_time:w-{seq}") for seq in range(1, 6)]
    with caplog.at_level(logging.INFO, logger="shared.event_consumer"):
        plan = await consumer.apply_final(messages)
    assert projector.prepared == 1
    assert "batch changed" not in caplog.text
    assert len(plan.applied) == 5 and len(plan.outbox_rows) == 5
    assert await ledger_state(writer) == {
        "entries": 5,
        "workloads": 5,
        "inbox": 5,
        "balance": 5 * CREDIT_WEI,
    }
