"""The machinery every worker reuses to turn stream messages into database effects exactly once.

One fetched batch becomes one database transaction:

1. decode each message (missing event key, wrong schema or invalid JSON: poison);
2. drop the ones whose event key the inbox already holds (a redelivery: only ack it);
3. let the projector apply the rest, each answering done, retry later, or dead;
4. write inbox rows for the applied ones and dead-letter rows for the poison, in the same
   transaction as the effect; commit;
5. hand what the transaction wrote to the outbox to the relay, which publishes it in the
   background (shared.outbox_relay): it is committed, so it no longer depends on the ack;
6. ack the applied and duplicate messages, term the dead ones and nak the rest with a backoff
   delay.

A projector that can (`PreparingProjector`) does steps 2 and 3 before the write transaction,
reading outside it, and only its writes run under the write lock: on SQLite, where one writer
at a time holds the database, copies of a worker then overlap everything but the writes. The
writes are plain INSERTs, so if another copy applied one of the events or stored one of the
rows meanwhile, a unique key fails, the transaction rolls back, and the batch is applied the
ordinary way under the lock. A projector answers None for a batch it must apply under the lock
(one that changes existing rows).

A crash before the commit leaves nothing; a crash after it leaves the inbox row, so the
redelivery is acked without a second effect. An unexpected exception rolls the batch back and
handles each message alone, so one bad message cannot hold back the others. A message that
still fails after MAX_ATTEMPTS deliveries is dead-lettered and terminated.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

from nats.aio.msg import Msg
from pydantic import BaseModel, ValidationError
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from contracts.events import EVENT_KEY_HEADER, MSG_ID_HEADER, SCHEMA_HEADER
from contracts.streams import MAX_ATTEMPTS, RETRY_BACKOFF_S
from shared.db.engine import run_insert, write_turn
from shared.db.repositories import dead_letters, inbox, outbox
from shared.faults import fault_point
from shared.observability import (
    BATCH_SECONDS,
    CONSUMER_LAG,
    DEAD_LETTERS,
    EVENTS_PROCESSED,
    REDELIVERIES,
)
from shared.outbox_relay import OutboxRelay

log = logging.getLogger(__name__)

EventT = TypeVar("EventT", bound=BaseModel)


@dataclass(frozen=True)
class Delivery:
    """One stream message, with what the consumer needs to know about it."""

    subject: str
    stream: str
    stream_seq: int
    num_delivered: int
    num_pending: int
    headers: dict[str, str]
    body: bytes
    event_key: str | None
    schema: str | None

    @classmethod
    def from_msg(cls, msg: Msg) -> Delivery:
        metadata = msg.metadata
        headers = dict(msg.headers or {})
        return cls(
            subject=msg.subject,
            stream=metadata.stream,
            stream_seq=metadata.sequence.stream,
            num_delivered=metadata.num_delivered,
            num_pending=metadata.num_pending,
            headers=headers,
            body=msg.data,
            event_key=headers.get(EVENT_KEY_HEADER) or headers.get(MSG_ID_HEADER),
            schema=headers.get(SCHEMA_HEADER),
        )


@dataclass(frozen=True)
class Outcome:
    """A projector's answer for one event."""

    kind: str  # done | retry | dead
    detail: dict[str, Any] | None = None
    reason: str = ""

    @classmethod
    def done(cls, detail: dict[str, Any] | None = None) -> Outcome:
        return cls("done", detail)

    @classmethod
    def retry(cls, reason: str) -> Outcome:
        return cls("retry", reason=reason)

    @classmethod
    def dead(cls, reason: str) -> Outcome:
        return cls("dead", reason=reason)


@dataclass(frozen=True)
class Decoded(Generic[EventT]):
    delivery: Delivery
    event: EventT
    key: str


class Projector(Protocol[EventT]):
    """What a worker supplies: how to apply a batch of decoded events inside a transaction."""

    async def apply(
        self, session: AsyncSession, items: Sequence[Decoded[EventT]]
    ) -> list[Outcome]: ...


@dataclass(frozen=True)
class PreparedBatch:
    """A batch worked out before the write lock: each event's outcome, and the writes that carry
    them out (run inside the write transaction; plain INSERTs, so a row stored meanwhile by
    another copy fails its unique key instead of being written twice)."""

    outcomes: list[Outcome]
    write: Callable[[AsyncSession], Awaitable[None]]


@runtime_checkable
class PreparingProjector(Protocol[EventT]):
    """A projector that can also work a batch out from reads outside the write transaction."""

    async def apply(
        self, session: AsyncSession, items: Sequence[Decoded[EventT]]
    ) -> list[Outcome]: ...

    async def prepare(
        self, reader: AsyncSession, items: Sequence[Decoded[EventT]]
    ) -> PreparedBatch | None: ...


@dataclass
class Plan(Generic[EventT]):
    applied: list[tuple[Decoded[EventT], Outcome]] = field(default_factory=list)
    duplicates: list[Delivery] = field(default_factory=list)
    retry: list[tuple[Delivery, str]] = field(default_factory=list)
    dead: list[tuple[Delivery, str]] = field(default_factory=list)
    outbox_rows: list[outbox.PendingOutbox] = field(default_factory=list)


def describe_error(error: BaseException) -> str:
    """What went wrong, without the statement parameters SQLAlchemy would append."""
    if isinstance(error, DBAPIError) and error.orig is not None:
        return f"{type(error.orig).__name__}: {str(error.orig).splitlines()[0][:300]}"
    return f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"


def dead_letter(consumer: str, delivery: Delivery, reason: str) -> dead_letters.NewDeadLetter:
    """The dead-letter row of `delivery` for `consumer`: subject, sequence, key, body, error."""
    return dead_letters.NewDeadLetter(
        consumer=consumer,
        stream=delivery.stream,
        subject=delivery.subject,
        stream_seq=delivery.stream_seq,
        event_key=delivery.event_key,
        error=reason,
        body=delivery.body,
        headers=delivery.headers,
        deliveries=delivery.num_delivered,
    )


def backoff_s(num_delivered: int) -> float:
    index = min(max(num_delivered - 1, 0), len(RETRY_BACKOFF_S) - 1)
    return RETRY_BACKOFF_S[index]


class EventConsumer(Generic[EventT]):
    """Applies batches of one durable consumer's messages, exactly once per event key."""

    def __init__(
        self,
        *,
        consumer: str,
        schemas: dict[str, type[EventT]],
        projector: Projector[EventT],
        sessionmaker: async_sessionmaker[AsyncSession],
        relay: OutboxRelay | None = None,
        max_attempts: int = MAX_ATTEMPTS,
        reader: async_sessionmaker[AsyncSession] | None = None,
    ) -> None:
        self.consumer = consumer
        self.schemas = schemas
        self.projector = projector
        self.sessionmaker = sessionmaker
        self.relay = relay
        self.max_attempts = max_attempts
        # Sessions that never take the write lock (SQLite: deferred BEGIN), for prepare().
        self.reader = reader

    # -- decoding -------------------------------------------------------------------------

    def decode(self, delivery: Delivery) -> Decoded[EventT] | str:
        """The decoded event, or the reason it can never be applied."""
        if not delivery.event_key:
            return f"missing {EVENT_KEY_HEADER} and {MSG_ID_HEADER} headers"
        model = self.schemas.get(delivery.schema or "")
        if model is None:
            return f"unknown schema {delivery.schema!r}; expected one of {sorted(self.schemas)}"
        try:
            event = model.model_validate_json(delivery.body)
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "body"
            return f"invalid {delivery.schema} message: {where}: {first['msg']}"
        return Decoded(delivery=delivery, event=event, key=delivery.event_key)

    # -- the batch path ---------------------------------------------------------------------

    async def handle(self, messages: Sequence[Msg]) -> None:
        started = time.perf_counter()
        deliveries = [(msg, Delivery.from_msg(msg)) for msg in messages]
        for _msg, delivery in deliveries:
            if delivery.num_delivered > 1:
                REDELIVERIES.labels(self.consumer).inc()
        if deliveries:
            CONSUMER_LAG.labels(self.consumer).set(deliveries[-1][1].num_pending)
        try:
            plan = await self._commit([delivery for _msg, delivery in deliveries])
        except Exception as error:
            log.warning(
                "batch failed; handling its messages one by one",
                extra=self._tag(error=describe_error(error)),
            )
            for msg, delivery in deliveries:
                await self._handle_alone(msg, delivery)
            return
        fault_point(f"{self.consumer}:after_commit_before_ack")
        await self._settle(dict((id(d), m) for m, d in deliveries), plan)
        BATCH_SECONDS.labels(self.consumer).observe(time.perf_counter() - started)

    async def _handle_alone(self, msg: Msg, delivery: Delivery) -> None:
        try:
            plan = await self._commit([delivery])
        except Exception as error:
            log.error("message failed", extra=self._tag(delivery, error=describe_error(error)))
            plan = Plan()
            plan.retry.append((delivery, describe_error(error)))
        fault_point(f"{self.consumer}:after_commit_before_ack")
        await self._settle({id(delivery): msg}, plan)

    async def apply_final(self, deliveries: Sequence[Delivery]) -> Plan[EventT]:
        """Apply without acking, as `payments replay` does: what would be retried is dead."""
        try:
            return await self._commit(deliveries, final=True)
        except Exception:
            log.exception(
                "replay batch failed; applying its messages one by one", extra=self._tag()
            )
        plan: Plan[EventT] = Plan()
        for delivery in deliveries:
            single = await self._commit([delivery], final=True)
            plan.applied += single.applied
            plan.duplicates += single.duplicates
            plan.dead += single.dead
        return plan

    async def _commit(self, deliveries: Sequence[Delivery], final: bool = False) -> Plan[EventT]:
        dead: list[tuple[Delivery, str]] = []
        decoded: list[Decoded[EventT]] = []
        for delivery in deliveries:
            result = self.decode(delivery)
            if isinstance(result, str):
                dead.append((delivery, result))
            else:
                decoded.append(result)
        if self.reader is not None and isinstance(self.projector, PreparingProjector):
            prepared = await self._commit_prepared(
                self.reader, self.projector, dead, decoded, final
            )
            if prepared is not None:
                return prepared
        return await self._commit_locked(dead, decoded, final)

    async def _commit_locked(
        self, dead: list[tuple[Delivery, str]], decoded: list[Decoded[EventT]], final: bool
    ) -> Plan[EventT]:
        """Read, apply and write the batch in one write transaction."""
        plan: Plan[EventT] = Plan(dead=list(dead))
        async with (
            write_turn(self.sessionmaker),
            self.sessionmaker() as session,
            session.begin(),
        ):
            known = await inbox.existing_keys(session, self.consumer, (d.key for d in decoded))
            fresh = self._drop_duplicates(decoded, known, plan)
            outcomes = await self.projector.apply(session, fresh) if fresh else []
            self._sort_outcomes(fresh, outcomes, plan, final)
            await inbox.record(session, self.consumer, self._inbox_rows(plan))
            await dead_letters.record(session, [self._letter(d, why) for d, why in plan.dead])
            fault_point(f"{self.consumer}:before_commit")
            plan.outbox_rows = outbox.pending_of(session)
        return plan

    async def _commit_prepared(
        self,
        reader: async_sessionmaker[AsyncSession],
        projector: PreparingProjector[EventT],
        dead: list[tuple[Delivery, str]],
        decoded: list[Decoded[EventT]],
        final: bool,
    ) -> Plan[EventT] | None:
        """Work the batch out from reads outside the write lock, then write it under the lock;
        None when the projector cannot, or when a unique key shows it changed meanwhile."""
        plan: Plan[EventT] = Plan(dead=list(dead))
        async with reader() as session:
            known = await inbox.existing_keys(session, self.consumer, (d.key for d in decoded))
            fresh = self._drop_duplicates(decoded, known, plan)
            prepared = await projector.prepare(session, fresh)
            dialect = session.get_bind().dialect
        if prepared is None:
            return None
        self._sort_outcomes(fresh, prepared.outcomes, plan, final)
        inbox_insert = inbox.draft(dialect, self.consumer, self._inbox_rows(plan))
        letters = [self._letter(d, why) for d, why in plan.dead]
        try:
            async with (
                write_turn(self.sessionmaker),
                self.sessionmaker() as session,
                session.begin(),
            ):
                await run_insert(session, inbox_insert)
                await prepared.write(session)
                await dead_letters.record(session, letters)
                fault_point(f"{self.consumer}:before_commit")
                plan.outbox_rows = outbox.pending_of(session)
        except IntegrityError as error:
            log.info(
                "batch changed since it was prepared; applying it under the write lock",
                extra=self._tag(error=describe_error(error)),
            )
            return None
        return plan

    @staticmethod
    def _inbox_rows(plan: Plan[EventT]) -> list[inbox.InboxRow]:
        return [
            (item.key, item.delivery.stream, item.delivery.stream_seq, outcome.detail)
            for item, outcome in plan.applied
        ]

    def _drop_duplicates(
        self, decoded: list[Decoded[EventT]], known: set[str], plan: Plan[EventT]
    ) -> list[Decoded[EventT]]:
        """The events not applied yet; the others are the plan's duplicates."""
        fresh: list[Decoded[EventT]] = []
        for item in decoded:
            if item.key in known:
                plan.duplicates.append(item.delivery)
                continue
            known.add(item.key)  # a second copy inside the same batch is a duplicate too
            fresh.append(item)
        return fresh

    def _sort_outcomes(
        self,
        fresh: list[Decoded[EventT]],
        outcomes: list[Outcome],
        plan: Plan[EventT],
        final: bool,
    ) -> None:
        if len(outcomes) != len(fresh):
            raise RuntimeError("projector returned a different number of outcomes")
        for item, outcome in zip(fresh, outcomes, strict=True):
            if outcome.kind == "done":
                plan.applied.append((item, outcome))
            elif (
                outcome.kind == "dead" or final or item.delivery.num_delivered >= self.max_attempts
            ):
                plan.dead.append((item.delivery, outcome.reason))
            else:
                plan.retry.append((item.delivery, outcome.reason))

    async def _settle(self, msgs: dict[int, Msg], plan: Plan[EventT]) -> None:
        if self.relay is not None:
            await self.relay.submit(plan.outbox_rows)
        for item, _outcome in plan.applied:
            await msgs[id(item.delivery)].ack()
        for delivery in plan.duplicates:
            await msgs[id(delivery)].ack()
        for delivery, reason in plan.dead:
            log.warning("dead-lettered", extra=self._tag(delivery, reason=reason))
            await msgs[id(delivery)].term()
        for delivery, reason in plan.retry:
            await self._retry_or_bury(msgs[id(delivery)], delivery, reason)
        self._count(plan)

    async def _retry_or_bury(self, msg: Msg, delivery: Delivery, reason: str) -> None:
        if delivery.num_delivered < self.max_attempts:
            await msg.nak(delay=backoff_s(delivery.num_delivered))
            return
        try:
            async with (
                write_turn(self.sessionmaker),
                self.sessionmaker() as session,
                session.begin(),
            ):
                await dead_letters.record(session, [self._letter(delivery, reason)])
        except Exception:
            # The server's max_deliver sits above MAX_ATTEMPTS, so a later delivery tries again.
            log.exception("could not write a dead letter", extra=self._tag(delivery))
            await msg.nak(delay=backoff_s(delivery.num_delivered))
            return
        log.warning("dead-lettered after retries", extra=self._tag(delivery, reason=reason))
        DEAD_LETTERS.labels(self.consumer).inc()
        await msg.term()

    def _letter(self, delivery: Delivery, reason: str) -> dead_letters.NewDeadLetter:
        return dead_letter(self.consumer, delivery, reason)

    def _count(self, plan: Plan[EventT]) -> None:
        counter = EVENTS_PROCESSED
        counter.labels(self.consumer, "applied").inc(len(plan.applied))
        counter.labels(self.consumer, "duplicate").inc(len(plan.duplicates))
        counter.labels(self.consumer, "dead_lettered").inc(len(plan.dead))
        counter.labels(self.consumer, "retried").inc(len(plan.retry))
        DEAD_LETTERS.labels(self.consumer).inc(len(plan.dead))

    def _tag(self, delivery: Delivery | None = None, **extra: Any) -> dict[str, Any]:
        tags: dict[str, Any] = {"consumer": self.consumer, **extra}
        if delivery is not None:
            tags.update(
                stream=delivery.stream,
                stream_seq=delivery.stream_seq,
                event_key=delivery.event_key,
                subject=delivery.subject,
            )
        return tags
