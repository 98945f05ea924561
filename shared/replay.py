"""`payments replay --into <url>`: rebuild every projection from the streams into an empty database.

Every input stream (REGISTRY, HEALTH, WORKLOADS, SESSIONS) is read from its first message with
an ephemeral, unacknowledged consumer. The streams are merged by the time JetStream stored each
message, which is the order the live workers saw them in (up to their concurrency), and each
message goes to the same EventConsumer code its live worker runs, in runs of consecutive
messages for the same consumer, so the registry a session is attributed against and the order
of entries on a balance are those of the live system. What a live worker would retry is
dead-lettered in the new database, as it was dead-lettered live. Nothing is published: the
outbox rows the rebuild writes are marked published, since their messages exist already.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlmodel import col

from contracts.streams import ConsumerSpec
from shared.db.engine import make_engine, make_sessionmaker
from shared.db.migrate import upgrade_async
from shared.db.models import LedgerEntry, Orchestrator, OutboxMessage, ProcessedEvent, Workload
from shared.event_consumer import Delivery, EventConsumer
from shared.nats_client import JETSTREAM_UNANSWERED, connect
from shared.pull_consumer import UNAVAILABLE, PullConsumer, PullError
from shared.settings import Settings

REPLAY_FETCH_BATCH = 1000
REPLAY_APPLY_BATCH = 1000
REPLAY_FETCH_TIMEOUT_S = 5.0
# A stream that delivers nothing for this long mid-read fails the replay.
REPLAY_STALL_TIMEOUT_S = 60.0
REPLAY_UNAVAILABLE_PAUSE_S = 0.5
REPLAY_CONSUMER_IDLE_S = 120.0
PROGRESS_BAR_WIDTH = 30
PROGRESS_EVERY_MESSAGES = 2000

Route = tuple[ConsumerSpec, EventConsumer[Any]]


class ReplayError(RuntimeError):
    pass


@dataclass
class ConsumerReport:
    consumer: str
    messages: int = 0
    applied: int = 0
    duplicates: int = 0
    dead: int = 0


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: `*` is one token, `>` the rest."""
    wanted, actual = pattern.split("."), subject.split(".")
    for index, token in enumerate(wanted):
        if token == ">":
            return len(actual) > index
        if index >= len(actual) or (token != "*" and token != actual[index]):
            return False
    return len(wanted) == len(actual)


def live_routes() -> list[Route]:
    """Every worker's consumers (importing the worker modules builds them)."""
    from workers import jobs, ledger, payouts, registry, sessions

    return [*registry.ROUTES, *ledger.ROUTES, *sessions.ROUTES, *jobs.ROUTES, *payouts.ROUTES]


class Router:
    def __init__(self, routes: list[Route], sessions: async_sessionmaker[AsyncSession]) -> None:
        self.routes = routes
        self._bound: dict[str, EventConsumer[Any]] = {}
        for _spec, template in routes:
            if template.consumer not in self._bound:
                self._bound[template.consumer] = EventConsumer(
                    consumer=template.consumer,
                    schemas=template.schemas,
                    projector=template.projector,
                    sessionmaker=sessions,
                )

    @property
    def streams(self) -> list[str]:
        return sorted({spec.stream for spec, _ in self.routes})

    def consumer_for(self, stream: str, subject: str) -> EventConsumer[Any] | None:
        for spec, template in self.routes:
            if spec.stream == stream and any(
                subject_matches(f, subject) for f in spec.filter_subjects
            ):
                return self._bound[template.consumer]
        return None


async def _require_empty(sessions: async_sessionmaker[AsyncSession]) -> None:
    async with sessions() as session:
        for model in (Orchestrator, LedgerEntry, Workload, ProcessedEvent):
            count = (await session.execute(select(func.count()).select_from(model))).scalar_one()
            if count:
                raise ReplayError(
                    f"target database is not empty: {model.__tablename__} has {count} rows"
                )


async def read_stream(nc: NatsClient, stream: str) -> AsyncIterator[Msg]:
    """Every message of `stream` from its first, through an ephemeral unacknowledged consumer.

    It ends when the consumer has nothing left to deliver. A fetch that brings nothing while
    messages are still pending (a leader election, a pull refused with 503) is asked again; a
    stream that delivers nothing for REPLAY_STALL_TIMEOUT_S raises ReplayError, so a replay is
    never reported done with part of a stream left unread.
    """
    js = nc.jetstream()
    info = await js.stream_info(stream)
    total = info.state.messages
    if total == 0:
        return
    consumer = await js.add_consumer(
        stream,
        ConsumerConfig(
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.NONE,
            inactive_threshold=REPLAY_CONSUMER_IDLE_S,
            mem_storage=True,
        ),
    )
    reader = PullConsumer(nc, stream, consumer.name)
    await reader.start()
    seen = 0
    last_delivery = time.monotonic()
    try:
        while seen < total:
            messages = await _fetch_or_nothing(reader)
            if not messages:
                if await _pending(js, stream, consumer.name, seen, total) == 0:
                    return  # the rest was removed by the stream's limits while we read
                if time.monotonic() - last_delivery > REPLAY_STALL_TIMEOUT_S:
                    raise ReplayError(
                        f"stream {stream}: read {seen} of {total} messages, then nothing for "
                        f"{REPLAY_STALL_TIMEOUT_S:.0f}s; the target database holds a partial "
                        "rebuild, replay again into an empty one"
                    )
                continue
            last_delivery = time.monotonic()
            for message in messages:
                seen += 1
                yield message
            if messages[-1].metadata.num_pending == 0:
                return
    finally:
        await reader.stop()
        with contextlib.suppress(Exception):
            await js.delete_consumer(stream, consumer.name)


async def _fetch_or_nothing(reader: PullConsumer) -> list[Msg]:
    """A batch; nothing when the server refused the pull as unavailable (503: the consumer is
    not reachable yet, or JetStream is electing a leader), after a pause."""
    try:
        return await reader.fetch(REPLAY_FETCH_BATCH, REPLAY_FETCH_TIMEOUT_S)
    except PullError as error:
        if error.status != UNAVAILABLE:
            raise ReplayError(f"stream {reader.stream}: {error}") from error
        await asyncio.sleep(REPLAY_UNAVAILABLE_PAUSE_S)
        return []


async def _pending(js: JetStreamContext, stream: str, consumer: str, seen: int, total: int) -> int:
    """How many messages the replay consumer still has to deliver (all the unread ones when
    JetStream does not answer); ReplayError when it is gone (the server restarted: the consumer
    lived in memory)."""
    try:
        return int((await js.consumer_info(stream, consumer)).num_pending)
    except nats.js.errors.NotFoundError as error:
        raise ReplayError(
            f"stream {stream}: the replay consumer vanished after {seen} of {total} messages "
            "(the server restarted?); replay again into an empty database"
        ) from error
    except JETSTREAM_UNANSWERED:
        return total - seen  # unknown: count it as pending, the stall deadline still applies


async def merged(nc: NatsClient, streams: list[str]) -> AsyncIterator[Msg]:
    """All messages of `streams`, ordered by the time JetStream stored them."""
    readers = [read_stream(nc, name) for name in streams]
    heap: list[tuple[datetime, str, int, int, Msg]] = []

    async def push(index: int) -> None:
        try:
            message = await anext(readers[index])
        except StopAsyncIteration:
            return
        metadata = message.metadata
        heapq.heappush(
            heap, (metadata.timestamp, metadata.stream, metadata.sequence.stream, index, message)
        )

    for index in range(len(readers)):
        await push(index)
    while heap:
        *_, index, message = heapq.heappop(heap)
        yield message
        await push(index)


async def _flush(
    consumer: EventConsumer[Any] | None, pending: list[Delivery], reports: dict[str, ConsumerReport]
) -> None:
    if consumer is None or not pending:
        return
    plan = await consumer.apply_final(pending)
    report = reports.setdefault(consumer.consumer, ConsumerReport(consumer.consumer))
    report.messages += len(pending)
    report.applied += len(plan.applied)
    report.duplicates += len(plan.duplicates)
    report.dead += len(plan.dead)


async def replay_all(
    nc: NatsClient, router: Router, show: Callable[[int, int], None] | None
) -> list[ConsumerReport]:
    js = nc.jetstream()
    total = sum([(await js.stream_info(name)).state.messages for name in router.streams])
    reports: dict[str, ConsumerReport] = {}
    current: EventConsumer[Any] | None = None
    pending: list[Delivery] = []
    done = 0
    # One run is applied while the next is read: the streams' round trips and parsing overlap
    # the commit's wait for the disk. Runs are still applied one at a time, in stream order.
    applying: asyncio.Task[None] | None = None

    async def apply_in_turn(consumer: EventConsumer[Any] | None, run: list[Delivery]) -> None:
        nonlocal applying
        if applying is not None:
            await applying
        applying = asyncio.create_task(_flush(consumer, run, reports))

    async for message in merged(nc, router.streams):
        done += 1
        consumer = router.consumer_for(message.metadata.stream, message.subject)
        if consumer is not current or len(pending) >= REPLAY_APPLY_BATCH:
            await apply_in_turn(current, pending)
            current, pending = consumer, []
        if consumer is not None:
            pending.append(Delivery.from_msg(message))
        if show and done % PROGRESS_EVERY_MESSAGES == 0:
            show(done, total)
    await apply_in_turn(current, pending)
    if applying is not None:
        await applying
    if show:
        show(done, total)
    return list(reports.values())


def progress_bar(done: int, total: int) -> None:
    filled = PROGRESS_BAR_WIDTH if total == 0 else PROGRESS_BAR_WIDTH * min(done, total) // total
    bar = "#" * filled + "." * (PROGRESS_BAR_WIDTH - filled)
    sys.stderr.write(f"\rreplay [{bar}] {done}/{total} messages")
    sys.stderr.flush()


async def replay(
    settings: Settings, target_url: str, progress: bool = True
) -> list[ConsumerReport]:
    await upgrade_async(target_url)
    engine = make_engine(target_url)
    sessions = make_sessionmaker(engine)
    nc = await connect(settings, "ops", "payments-replay")
    started = time.monotonic()
    try:
        await _require_empty(sessions)
        router = Router(live_routes(), sessions)
        reports = await replay_all(nc, router, progress_bar if progress else None)
        async with sessions() as session, session.begin():
            await session.execute(
                update(OutboxMessage)
                .where(col(OutboxMessage.published_at).is_(None))
                .values(published_at=datetime.now(UTC))
            )
    finally:
        await nc.close()
        await engine.dispose()
    if progress:
        sys.stderr.write(f"\nreplayed in {time.monotonic() - started:.1f}s\n")
    return reports
