"""Sessions worker: bills connected Pixel Streaming time and keeps activity leases.

Consumes
  - SESSIONS `sessions.events.<partition>.<session>` (edge events), `sessions.events.<partition>.
    lease-<lease>` (admin lease commands) and `sessions.ticks.<partition>` (clock ticks), through
    one durable per partition, `sessions-p0` .. `sessions-p15`.

Produces
  - ledger entries with reason `session_time` (one per closed segment with a positive credit),
    each also on LEDGER through the outbox;
  - the `session:<id>` activity lease and admin leases; registry contacts (source `session`);
  - ticks: every PAYMENTS_SESSION_TICK_SECONDS each copy publishes one tick per partition, keyed
    by the tick's time bucket, so all copies together store one tick per bucket.

Ordering under scale
  The ingress puts a session's events on partition hash(session_id) mod 16. Each partition is a
  durable consumer with max_ack_pending 1: JetStream gives one of its messages at a time to any
  copy of this worker, and the next only once that one is acked, naked or redelivered. So one
  session's events (and its partition's ticks) are applied in stream order however many copies
  run, on SQLite or PostgreSQL alike, while the 16 partitions proceed in parallel; a copy
  applies whatever its partitions have ready in one transaction (shared.pull_loop).

Guarantee
  Each event applies once (inbox key); each segment is credited once (entry key
  `session:<id>:<run>:<segment>`). Time comes from the events (the ingress's receive time) and
  from tick events, never the wall clock, and the billing terms travel in the events, so a
  replay bills the same. Billing rules: shared.session_billing.

Rows
  Sessions and leases are plain rows (shared.db.repositories.sessions), one per key in a
  batch, saved before a query that must see them and at the end: no ORM objects on this path.

Limits
  A message that keeps failing holds its partition (order first) until it is dead-lettered
  after MAX_ATTEMPTS deliveries; a crashed copy's message holds it for PARTITION_ACK_WAIT_S.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from nats.aio.msg import Msg
from sqlalchemy.ext.asyncio import AsyncSession

from contracts import subjects
from contracts.events import ActivityLeaseCommandV1, SessionEventV1, SessionTickV1
from contracts.streams import SESSION_PARTITION_CONSUMERS, SESSIONS, ConsumerSpec
from shared.db.repositories import ledger, registry, sessions
from shared.db.repositories.ledger import NewEntry
from shared.db.repositories.sessions import LeaseRow, SessionRow
from shared.event_consumer import Decoded, EventConsumer, Outcome
from shared.publishing import publish_event
from shared.session_billing import ClosedSegment, apply_event, apply_tick, end_run, iso_z, open_run
from shared.settings import load_settings
from shared.worker_app import WorkerRuntime

log = logging.getLogger(__name__)
CONSUMER = "sessions"
SessionsEvent = SessionEventV1 | SessionTickV1 | ActivityLeaseCommandV1

settings = load_settings()
runtime = WorkerRuntime("sessions", settings)
app = runtime.app


def session_lease_id(session_id: str) -> str:
    return f"session:{session_id}"


class Batch:
    """What one transaction touches: one row per session and lease (loaded once, changed in
    place, saved together), new entries and registry contacts."""

    def __init__(self, db: AsyncSession) -> None:
        self.db = db
        self.sessions: dict[str, SessionRow] = {}
        self.leases: dict[str, LeaseRow] = {}
        self.contacts: dict[str, registry.Contact] = {}
        self.attributions: dict[str, str | None] = {}
        self.entries: list[NewEntry] = []

    async def save(self) -> None:
        """Write the new and changed rows. Called before a query that must see them (as the
        ORM's autoflush did, so a replay's long batches read what their earlier events wrote)
        and at the end of the batch."""
        await sessions.save_session_rows(self.db, self.sessions.values())
        await sessions.save_lease_rows(self.db, self.leases.values())

    async def lease(self, lease_id: str) -> LeaseRow | None:
        """The batch's row of `lease_id`, loaded when the batch does not hold it yet."""
        if lease_id not in self.leases:
            self.leases.update(await sessions.lease_rows(self.db, [lease_id]))
        return self.leases.get(lease_id)

    async def attribute(self, address: str) -> str | None:
        if address not in self.attributions:
            await self.save()  # attribution falls back to earlier sessions from the address
            self.attributions[address] = await sessions.attribute(self.db, address)
        return self.attributions[address]

    def credit(
        self, item: Decoded[Any], closed: list[ClosedSegment], session: SessionRow, event: str
    ) -> None:
        for segment in closed:
            if segment.credit_wei <= 0 or segment.orchestrator_id is None:
                continue
            self.entries.append(
                NewEntry(
                    entry_key=f"session:{segment.session_id}:{segment.run}:{segment.segment_index}",
                    orchestrator_id=segment.orchestrator_id,
                    amount_wei=segment.credit_wei,
                    reason="session_time",
                    source_stream=item.delivery.stream,
                    source_seq=item.delivery.stream_seq,
                    source_key=item.key,
                    occurred_at=segment.end,
                    metadata={
                        "session_id": segment.session_id,
                        "event": event,
                        "trigger": segment.trigger,
                        "segment_index": str(segment.segment_index),
                        "segment_start": iso_z(segment.start),
                        "segment_end": iso_z(segment.end),
                        "duration_ms": str(segment.duration_ms),
                        "proof_hash": segment.proof_hash,
                        "upstream_addr": session.upstream_addr,
                        "upstream_port": session.upstream_port,
                        "edge_id": session.edge_id,
                    },
                )
            )

    def contact(self, orchestrator_id: str, at: datetime, source: str, ip: str | None) -> None:
        """Remember the newest contact; written once per orchestrator at the end of the batch."""
        known = self.contacts.get(orchestrator_id)
        if known is None:
            self.contacts[orchestrator_id] = registry.Contact(at, source, ip)
        elif at >= known.at:
            known.at, known.source, known.ip = at, source, ip


class SessionsProjector:
    async def apply(
        self, db: AsyncSession, items: Sequence[Decoded[SessionsEvent]]
    ) -> list[Outcome]:
        batch = Batch(db)
        session_ids = [i.event.session_id for i in items if isinstance(i.event, SessionEventV1)]
        batch.sessions = await sessions.session_rows(db, session_ids)
        lease_ids = [session_lease_id(s) for s in session_ids]
        lease_ids += [
            i.event.lease_id for i in items if isinstance(i.event, ActivityLeaseCommandV1)
        ]
        batch.leases = await sessions.lease_rows(db, lease_ids)
        outcomes = []
        for item in items:
            event = item.event
            if isinstance(event, SessionEventV1):
                outcomes.append(await self._session_event(batch, item, event))
            elif isinstance(event, SessionTickV1):
                outcomes.append(await self._tick(batch, item, event))
            else:
                outcomes.append(await self._lease_command(batch, event))
        await batch.save()
        await registry.record_contacts(db, batch.contacts)
        await ledger.post_entries(db, batch.entries)
        return outcomes

    async def _session_event(
        self, batch: Batch, item: Decoded[SessionsEvent], event: SessionEventV1
    ) -> Outcome:
        at = event.received_at
        session = batch.sessions.get(event.session_id)
        created = session is None
        if session is None:
            session = SessionRow(
                session_id=event.session_id,
                partition=subjects.session_partition(event.session_id),
                upstream_addr=event.upstream_addr,
                upstream_port=event.upstream_port,
                last_event=event.event,
                updated_at=at,
                orchestrator_id=await batch.attribute(event.upstream_addr),
                is_new=True,
            )
            open_run(session, at)
            batch.sessions[event.session_id] = session
        elif session.orchestrator_id is None:
            session.orchestrator_id = await batch.attribute(event.upstream_addr)
        session.changed = True
        session.credit_eth_per_minute = event.credit_eth_per_minute
        session.segment_seconds = event.segment_seconds
        session.idle_timeout_seconds = event.idle_timeout_seconds
        session.upstream_port = event.upstream_port
        session.edge_id = event.edge_id or session.edge_id
        if created and event.event == "end":
            closed = end_run(session, at, "end")
        else:
            closed = apply_event(session, event.event, at)
        session.last_event = event.event
        session.updated_at = max(at, session.updated_at or at)
        batch.credit(item, closed, session, event.event)
        self._touch_lease(batch, session, event)
        self._record_contact(batch, session, event)
        return Outcome.done(
            {"closed_segments": len(closed), "orchestrator_id": session.orchestrator_id}
        )

    def _touch_lease(self, batch: Batch, session: SessionRow, event: SessionEventV1) -> None:
        if session.orchestrator_id is None:
            return
        lease_id = session_lease_id(session.session_id)
        lease = batch.leases.get(lease_id)
        if lease is not None and lease.orchestrator_id != session.orchestrator_id:
            return
        at = event.received_at
        if session.ended_at is not None:
            if lease is not None and lease.revoked_at is None:
                lease.revoked_at = session.ended_at
                lease.changed = True
            return
        if lease is None:
            lease = LeaseRow(
                lease_id=lease_id,
                partition=session.partition,
                orchestrator_id=session.orchestrator_id,
                kind="session",
                lease_seconds=event.lease_seconds,
                issued_at=at,
                last_seen_at=at,
                expires_at=at,
                is_new=True,
            )
            batch.leases[lease_id] = lease
        lease.changed = True
        if lease.revoked_at is not None or lease.expired_at is not None:
            lease.issued_at, lease.revoked_at, lease.expired_at = at, None, None
        lease.upstream_addr = session.upstream_addr
        lease.lease_metadata = {
            "session_id": session.session_id,
            "edge_id": session.edge_id,
            "upstream_addr": session.upstream_addr,
            "upstream_port": session.upstream_port,
        }
        lease.lease_seconds = event.lease_seconds
        lease.last_seen_at = at
        lease.expires_at = at + timedelta(seconds=event.lease_seconds)

    def _record_contact(self, batch: Batch, session: SessionRow, event: SessionEventV1) -> None:
        if session.orchestrator_id is None:
            return
        at = event.received_at
        batch.contact(session.orchestrator_id, at, "session", session.upstream_addr)
        contact = batch.contacts[session.orchestrator_id]
        if contact.session_at is None or at >= contact.session_at:
            contact.session_at = at
            contact.session_addr = session.upstream_addr
            contact.session_edge_id = session.edge_id

    async def _tick(
        self, batch: Batch, item: Decoded[SessionsEvent], tick: SessionTickV1
    ) -> Outcome:
        await batch.save()  # the partition's live sessions and due leases, as stored now
        closed_sessions = 0
        for loaded in await sessions.live_session_rows(batch.db, tick.partition):
            # The batch's own row when it holds one: one row per session in a batch.
            session = batch.sessions.setdefault(loaded.session_id, loaded)
            if session.ended_at is not None:
                continue
            closed = apply_tick(session, tick.at)
            if session.ended_at is None:
                continue
            session.changed = True
            closed_sessions += 1
            batch.credit(item, closed, session, "tick")
            lease = await batch.lease(session_lease_id(session.session_id))
            if lease is not None and lease.revoked_at is None:
                lease.revoked_at = session.ended_at
                lease.changed = True
        expired = await sessions.expire_leases(batch.db, tick.partition, tick.at)
        # The batch's lease rows say what the statement stored, so a later save keeps it.
        for lease in batch.leases.values():
            if lease.partition == tick.partition and sessions.lease_expires_by(lease, tick.at):
                lease.expired_at = tick.at
        return Outcome.done({"closed_sessions": closed_sessions, "expired_leases": expired})

    async def _lease_command(self, batch: Batch, command: ActivityLeaseCommandV1) -> Outcome:
        at = command.received_at
        lease = batch.leases.get(command.lease_id)
        if command.action == "issue":
            return await self._issue_lease(batch, command, lease)
        if lease is None or (
            command.orchestrator_id and lease.orchestrator_id != command.orchestrator_id
        ):
            return Outcome.done({"status": 404})
        if command.action == "revoke":
            if lease.revoked_at is None:
                lease.revoked_at = at
                lease.changed = True
            return Outcome.done({"status": 200})
        if (
            lease.revoked_at is not None
            or lease.expired_at is not None
            or (lease.expires_at is not None and lease.expires_at <= at)
        ):
            return Outcome.done({"status": 404})
        seconds = command.lease_seconds or lease.lease_seconds
        lease.changed = True
        lease.lease_seconds = seconds
        lease.last_seen_at = at
        lease.last_seen_ip = command.request_ip
        lease.expires_at = at + timedelta(seconds=seconds)
        return Outcome.done({"status": 200})

    async def _issue_lease(
        self, batch: Batch, command: ActivityLeaseCommandV1, lease: LeaseRow | None
    ) -> Outcome:
        at = command.received_at
        if (
            command.orchestrator_id is None
            or await registry.get(batch.db, command.orchestrator_id) is None
        ):
            return Outcome.retry("unknown orchestrator")
        assert command.orchestrator_id is not None and command.lease_seconds is not None
        if lease is None:
            lease = LeaseRow(
                lease_id=command.lease_id,
                partition=subjects.session_partition(command.lease_id),
                orchestrator_id=command.orchestrator_id,
                kind=command.kind or "workload",
                lease_seconds=command.lease_seconds,
                issued_at=at,
                last_seen_at=at,
                expires_at=at,
                is_new=True,
            )
            batch.leases[command.lease_id] = lease
        elif lease.orchestrator_id != command.orchestrator_id:
            return Outcome.done({"status": 409})
        lease.changed = True
        lease.upstream_addr = command.upstream_addr
        lease.lease_metadata = command.metadata
        lease.last_seen_at = at
        lease.last_seen_ip = command.request_ip
        lease.lease_seconds = command.lease_seconds
        lease.expires_at = at + timedelta(seconds=command.lease_seconds)
        lease.revoked_at = None
        lease.expired_at = None
        batch.contact(command.orchestrator_id, at, "activity_lease", command.request_ip)
        return Outcome.done({"status": 200})


SCHEMAS: dict[str, type[Any]] = {
    model.SCHEMA: model for model in (SessionEventV1, SessionTickV1, ActivityLeaseCommandV1)
}
session_events = runtime.event_consumer(
    consumer=CONSUMER, schemas=SCHEMAS, projector=SessionsProjector()
)
ROUTES: list[tuple[ConsumerSpec, EventConsumer[Any]]] = [
    (spec, session_events) for spec in SESSION_PARTITION_CONSUMERS
]


@runtime.consume_partitions(SESSION_PARTITION_CONSUMERS)
async def on_partition_messages(messages: list[Msg]) -> None:
    await session_events.handle(messages)


# -- the ticker -----------------------------------------------------------------------------


def tick_bucket(now: datetime, interval_s: float) -> datetime:
    seconds = now.timestamp()
    return datetime.fromtimestamp(seconds - seconds % interval_s, UTC)


async def publish_ticks(at: datetime) -> None:
    for partition in range(subjects.SESSION_PARTITIONS):
        await publish_event(
            runtime.js,
            stream=SESSIONS.name,
            subject=subjects.session_tick(partition),
            event=SessionTickV1(partition=partition, at=at),
            key=f"tick:{partition}:{at.isoformat()}",
        )


async def tick_forever() -> None:
    interval = settings.session_tick_seconds
    while True:  # runs for the life of the worker; cancelled at shutdown
        bucket = tick_bucket(datetime.now(UTC), interval)
        try:
            await publish_ticks(bucket)
        except Exception:
            log.exception("tick publish failed; the next tick covers it")
        next_bucket = bucket + timedelta(seconds=interval)
        await asyncio.sleep(max(0.05, (next_bucket - datetime.now(UTC)).total_seconds()))


ticker: asyncio.Task[None] | None = None


async def start_ticker() -> None:
    global ticker
    ticker = asyncio.create_task(tick_forever(), name="sessions:ticker")


async def stop_ticker() -> None:
    if ticker is not None:
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker


runtime.startup_hooks.append(start_ticker)
runtime.shutdown_hooks.append(stop_ticker)
