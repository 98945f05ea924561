"""The sessions worker's projector, driven in process: hand-made SESSIONS deliveries (session
events, lease commands, ticks) through shared.event_consumer.EventConsumer.apply_final (the
path `payments replay` takes) against a migrated SQLite file. Covers what would take minutes
of wall clock through the stack: lease expiry by tick (a lease is at least 30 s long), ticks
being scoped to their partition, a session lease that expires and comes back, and redelivery.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from contracts import subjects
from contracts.events import ActivityLeaseCommandV1, SessionEventV1, SessionTickV1
from shared.db.engine import make_engine, make_sessionmaker
from shared.db.models import ActivityLease, LedgerEntry, Orchestrator, Session
from shared.event_consumer import Delivery, EventConsumer
from shared.publishing import event_headers
from tests.harness import create_database
from workers.sessions import SCHEMAS, SessionsProjector

T0 = datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)
ORCH, ORCH_2 = "orch-1", "orch-2"
IP = "198.51.100.7"
WEI_PER_MS = 10**12  # at 0.06 ETH per minute


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


class Feed:
    """Builds deliveries with increasing stream sequences and applies them like a replay."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self.sessions = sessions
        self.consumer: EventConsumer[Any] = EventConsumer(
            consumer="sessions",
            schemas=SCHEMAS,
            projector=SessionsProjector(),
            sessionmaker=sessions,
        )
        self.seq = 0

    def delivery(self, subject: str, event: Any, key: str) -> Delivery:
        self.seq += 1
        headers = event_headers(event, key)
        return Delivery(
            subject=subject,
            stream="SESSIONS",
            stream_seq=self.seq,
            num_delivered=1,
            num_pending=0,
            headers=headers,
            body=event.model_dump_json().encode(),
            event_key=key,
            schema=event.SCHEMA,
        )

    async def apply(self, *deliveries: Delivery) -> list[dict[str, Any] | None]:
        plan = await self.consumer.apply_final(list(deliveries))
        assert not plan.dead, plan.dead
        return [outcome.detail for _item, outcome in plan.applied]

    def session_event(
        self,
        session_id: str,
        event: str,
        when: datetime,
        *,
        idle_s: float = 120.0,
        lease_s: int = 900,
    ) -> Delivery:
        body = SessionEventV1(
            session_id=session_id,
            upstream_addr=IP,
            upstream_port=8443,
            edge_id="edge-1",
            event=event,  # type: ignore[arg-type]
            received_at=when,
            credit_eth_per_minute="0.06",
            segment_seconds=2400,
            idle_timeout_seconds=idle_s,
            lease_seconds=lease_s,
        )
        key = f"session:{session_id}:key:{self.seq + 1}"
        return self.delivery(subjects.session_event(session_id), body, key)

    def lease(self, action: str, lease_id: str, when: datetime, **fields: Any) -> Delivery:
        command = ActivityLeaseCommandV1(
            action=action,  # type: ignore[arg-type]
            lease_id=lease_id,
            received_at=when,
            **fields,
        )
        key = f"lease:{action}:{lease_id}:{when.isoformat()}"
        return self.delivery(subjects.activity_lease_command(lease_id), command, key)

    def tick(self, partition: int, when: datetime) -> Delivery:
        key = f"tick:{partition}:{when.isoformat()}"
        return self.delivery(
            subjects.session_tick(partition), SessionTickV1(partition=partition, at=when), key
        )

    async def lease_row(self, lease_id: str) -> ActivityLease:
        async with self.sessions() as db:
            row = await db.get(ActivityLease, lease_id)
        assert row is not None
        return row

    async def session_row(self, session_id: str) -> Session:
        async with self.sessions() as db:
            row = await db.get(Session, session_id)
        assert row is not None
        return row

    async def entries(self) -> list[LedgerEntry]:
        async with self.sessions() as db:
            return list((await db.execute(select(LedgerEntry))).scalars())


@pytest.fixture
async def feed(tmp_path: Path) -> AsyncIterator[Feed]:
    async for made in feed_in(tmp_path):
        yield made


async def feed_in(tmp_path: Path) -> AsyncIterator[Feed]:
    """A migrated SQLite file in `tmp_path` with two orchestrators registered, and its Feed."""
    database = await create_database("sqlite", tmp_path)
    engine = make_engine(database.url)
    sessions = make_sessionmaker(engine)
    async with sessions() as db, db.begin():
        for order, (oid, digit, ip) in enumerate(
            [(ORCH, "a", IP), (ORCH_2, "b", "198.51.100.8")], start=1
        ):
            db.add(
                Orchestrator(
                    orchestrator_id=oid,
                    address="0x" + digit * 40,
                    registration_order=order,
                    host_public_ip=ip,
                    first_seen=T0 - timedelta(days=1),
                )
            )
    yield Feed(sessions)
    await engine.dispose()


def other_partition(partition: int) -> int:
    return (partition + 1) % subjects.SESSION_PARTITIONS


async def test_a_tick_at_or_after_expires_at_expires_the_lease_in_its_partition_only(
    feed: Feed,
) -> None:
    lease_id = "lease-expiry-1"
    partition = subjects.session_partition(lease_id)
    [issued] = await feed.apply(
        feed.lease("issue", lease_id, T0, orchestrator_id=ORCH, kind="workload", lease_seconds=30)
    )
    assert issued == {"status": 200}
    row = await feed.lease_row(lease_id)
    assert row.expires_at == at(30) and row.expired_at is None and row.partition == partition

    await feed.apply(
        feed.tick(partition, at(29.999)), feed.tick(other_partition(partition), at(90))
    )
    assert (await feed.lease_row(lease_id)).expired_at is None

    [expired] = await feed.apply(feed.tick(partition, at(30)))
    assert expired == {"closed_sessions": 0, "expired_leases": 1}
    row = await feed.lease_row(lease_id)
    assert row.expired_at == at(30) and row.revoked_at is None

    # An expired lease cannot be heartbeaten; issuing it again brings it back.
    [beat] = await feed.apply(
        feed.lease("heartbeat", lease_id, at(31), orchestrator_id=ORCH, lease_seconds=30)
    )
    assert beat == {"status": 404}
    assert (await feed.lease_row(lease_id)).expires_at == at(30)
    [again] = await feed.apply(
        feed.lease(
            "issue", lease_id, at(40), orchestrator_id=ORCH, kind="workload", lease_seconds=60
        )
    )
    assert again == {"status": 200}
    row = await feed.lease_row(lease_id)
    assert (row.expired_at, row.expires_at) == (None, at(100))
    [later] = await feed.apply(feed.tick(partition, at(99)))
    assert later == {"closed_sessions": 0, "expired_leases": 0}


async def test_heartbeat_extends_and_revoke_is_final_and_others_get_404_or_409(
    feed: Feed,
) -> None:
    lease_id = "lease-beat-1"
    partition = subjects.session_partition(lease_id)
    await feed.apply(
        feed.lease("issue", lease_id, T0, orchestrator_id=ORCH, kind="workload", lease_seconds=30)
    )
    [beat] = await feed.apply(
        feed.lease("heartbeat", lease_id, at(20), orchestrator_id=ORCH, lease_seconds=30)
    )
    assert beat == {"status": 200}
    assert (await feed.lease_row(lease_id)).expires_at == at(50)
    await feed.apply(feed.tick(partition, at(45)))  # would have expired without the heartbeat
    assert (await feed.lease_row(lease_id)).expired_at is None

    theirs, taken = await feed.apply(
        feed.lease("heartbeat", lease_id, at(21), orchestrator_id=ORCH_2, lease_seconds=30),
        feed.lease("issue", lease_id, at(22), orchestrator_id=ORCH_2, lease_seconds=30),
    )
    assert theirs == {"status": 404} and taken == {"status": 409}
    row = await feed.lease_row(lease_id)
    assert (row.orchestrator_id, row.expires_at) == (ORCH, at(50))

    # A heartbeat at or after expires_at fails even before a tick has marked the lease expired.
    late_id = "lease-late-beat"
    await feed.apply(
        feed.lease("issue", late_id, T0, orchestrator_id=ORCH, kind="workload", lease_seconds=30)
    )
    [late] = await feed.apply(
        feed.lease("heartbeat", late_id, at(30), orchestrator_id=ORCH, lease_seconds=30)
    )
    assert late == {"status": 404}
    assert (await feed.lease_row(late_id)).expires_at == at(30)

    [revoked] = await feed.apply(feed.lease("revoke", lease_id, at(25)))
    assert revoked == {"status": 200}
    [beat] = await feed.apply(
        feed.lease("heartbeat", lease_id, at(26), orchestrator_id=ORCH, lease_seconds=30)
    )
    assert beat == {"status": 404}
    await feed.apply(feed.tick(partition, at(60)))
    row = await feed.lease_row(lease_id)
    assert row.revoked_at == at(25) and row.expired_at is None  # revoked, not expired


async def test_idle_session_is_closed_by_its_partitions_tick_and_its_lease_revoked(
    feed: Feed,
) -> None:
    sid = "sess-idle"
    partition = subjects.session_partition(sid)
    start = feed.session_event(sid, "start", T0, idle_s=2)
    beat = feed.session_event(sid, "heartbeat", at(1.25), idle_s=2)
    await feed.apply(start, beat)
    lease = await feed.lease_row(f"session:{sid}")
    assert (lease.orchestrator_id, lease.kind, lease.expires_at) == (ORCH, "session", at(901.25))

    early = feed.tick(partition, at(3.25))  # exactly the timeout after the last event
    elsewhere = feed.tick(other_partition(partition), at(60))
    assert await feed.apply(early, elsewhere) == [
        {"closed_sessions": 0, "expired_leases": 0},
        {"closed_sessions": 0, "expired_leases": 0},
    ]
    assert (await feed.session_row(sid)).ended_at is None

    closing = feed.tick(partition, at(3.5))
    [closed] = await feed.apply(closing)
    assert closed == {"closed_sessions": 1, "expired_leases": 0}
    row = await feed.session_row(sid)
    assert (row.ended_at, row.end_trigger, row.billed_ms) == (at(1.25), "idle", 1_250)
    [entry] = await feed.entries()
    assert entry.entry_key == f"session:{sid}:0:0"
    assert entry.amount_wei == 1_250 * WEI_PER_MS and entry.orchestrator_id == ORCH
    assert (entry.source_seq, entry.source_key) == (closing.stream_seq, closing.event_key)
    assert (entry.entry_metadata or {})["trigger"] == "idle"
    assert (await feed.lease_row(f"session:{sid}")).revoked_at == at(1.25)

    # Redelivered, everything is a duplicate: no second close, no second credit.
    plan = await feed.consumer.apply_final([start, beat, closing])
    assert len(plan.duplicates) == 3 and not plan.applied
    assert len(await feed.entries()) == 1


async def test_a_session_lease_that_expired_comes_back_with_the_next_event(feed: Feed) -> None:
    sid = "sess-long"
    partition = subjects.session_partition(sid)
    await feed.apply(feed.session_event(sid, "start", T0, idle_s=3600, lease_s=30))
    [tick] = await feed.apply(feed.tick(partition, at(31)))
    assert tick == {"closed_sessions": 0, "expired_leases": 1}
    lease = await feed.lease_row(f"session:{sid}")
    assert lease.expired_at == at(31)
    assert (await feed.session_row(sid)).ended_at is None  # the session itself is live

    await feed.apply(feed.session_event(sid, "heartbeat", at(40), idle_s=3600, lease_s=30))
    lease = await feed.lease_row(f"session:{sid}")
    assert (lease.expired_at, lease.issued_at, lease.expires_at) == (None, at(40), at(70))

    await feed.apply(feed.session_event(sid, "end", at(50), idle_s=3600, lease_s=30))
    lease = await feed.lease_row(f"session:{sid}")
    assert lease.revoked_at == at(50)
    [entry] = await feed.entries()
    assert entry.amount_wei == 50_000 * WEI_PER_MS


def session_state(row: Session) -> dict[str, Any]:
    return {
        name: getattr(row, name)
        for name in (
            "run",
            "started_at",
            "last_seen_at",
            "ended_at",
            "end_trigger",
            "last_event",
            "billed_ms",
            "billed_wei",
            "segment_index",
            "heartbeat_count",
            "segments",
        )
    }


async def test_one_long_batch_applies_as_its_events_one_at_a_time(tmp_path: Path) -> None:
    """Replay hands the projector long runs of one partition: a session's start, heartbeats,
    its partition's tick that finds it idle, a lease heartbeat, a new run and a tick that
    expires the lease. Applied as one batch or one event at a time, the outcome is the same."""
    results: list[tuple[Any, ...]] = []
    issued: list[datetime | None] = []
    for one_batch in (False, True):
        workdir = tmp_path / ("batch" if one_batch else "single")
        workdir.mkdir()
        async for feed in feed_in(workdir):
            sid = "sess-long-batch"
            partition = subjects.session_partition(sid)
            lease_id = f"session:{sid}"
            run = [
                feed.session_event(sid, "start", at(0), idle_s=60, lease_s=30),
                feed.session_event(sid, "heartbeat", at(20), idle_s=60, lease_s=30),
                feed.tick(partition, at(200)),  # idle since 20 s: the run ends there
                feed.session_event(sid, "heartbeat", at(300), idle_s=60, lease_s=30),
                feed.session_event(sid, "heartbeat", at(310), idle_s=60, lease_s=30),
                feed.tick(partition, at(345)),  # lease due at 340: expired
                feed.session_event(sid, "heartbeat", at(350), idle_s=60, lease_s=30),
            ]
            if one_batch:
                details = await feed.apply(*run)
            else:
                details = [detail for delivery in run for detail in await feed.apply(delivery)]
            lease = await feed.lease_row(lease_id)
            issued.append(lease.issued_at)
            entries = sorted(
                (e.entry_key, e.amount_wei, e.entry_metadata["trigger"])  # type: ignore[index]
                for e in await feed.entries()
            )
            results.append(
                (
                    details,
                    session_state(await feed.session_row(sid)),
                    (lease.expires_at, lease.expired_at, lease.revoked_at),
                    entries,
                )
            )
    single, batch = results
    assert batch == single
    assert single[3] == [(f"session:{sid}:0:0", 20_000 * WEI_PER_MS, "idle")]
    # The lease expired at the second tick; the next heartbeat issued it afresh.
    assert single[2] == (at(380), None, None) and issued == [at(350), at(350)]
    assert single[1]["run"] == 1 and single[1]["ended_at"] is None
