"""`payments replay --into <url>`: rebuild every projection from the streams into an empty database.

Each input stream is read from its first message with an ephemeral, unacknowledged consumer and
fed to the same EventConsumer code the workers run, in stream order: REGISTRY first (so every
orchestrator exists), then HEALTH, then WORKLOADS. What a live worker would retry is
dead-lettered in the new database, as it was dead-lettered live. Nothing is published: the
outbox rows the rebuild writes are marked published, since their messages exist already.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlmodel import col

from contracts.streams import ALL_CONSUMERS, ConsumerSpec
from shared.db.engine import make_engine, make_sessionmaker
from shared.db.migrate import upgrade_async
from shared.db.models import LedgerEntry, Orchestrator, OutboxMessage, ProcessedEvent, Workload
from shared.event_consumer import Delivery, EventConsumer
from shared.nats_client import connect
from shared.settings import Settings

REPLAY_FETCH_BATCH = 1000
REPLAY_FETCH_TIMEOUT_S = 2.0
REPLAY_CONSUMER_IDLE_S = 60.0
PROGRESS_BAR_WIDTH = 30


class ReplayError(RuntimeError):
    pass


@dataclass
class StreamReport:
    stream: str
    consumer: str
    messages: int
    applied: int
    duplicates: int
    dead: int


def replay_consumers() -> list[tuple[ConsumerSpec, EventConsumer[Any]]]:
    """Every worker's consumers, in replay order (importing the worker modules builds them)."""
    from workers import ledger, registry

    by_name = {c.consumer: c for module in (registry, ledger) for c in module.CONSUMERS}
    order = ["registry-events", "registry-health", "ledger-workloads"]
    specs = {spec.durable: spec for spec in ALL_CONSUMERS}
    return [(specs[name], by_name[name]) for name in order]


async def _require_empty(sessions: async_sessionmaker[AsyncSession]) -> None:
    async with sessions() as session:
        for model in (Orchestrator, LedgerEntry, Workload, ProcessedEvent):
            count = (await session.execute(select(func.count()).select_from(model))).scalar_one()
            if count:
                raise ReplayError(
                    f"target database is not empty: {model.__tablename__} has {count} rows"
                )


def _progress(label: str, done: int, total: int) -> None:
    filled = PROGRESS_BAR_WIDTH if total == 0 else PROGRESS_BAR_WIDTH * done // total
    bar = "#" * filled + "." * (PROGRESS_BAR_WIDTH - filled)
    sys.stderr.write(f"\r{label:<18} [{bar}] {done}/{total}")
    sys.stderr.flush()


async def replay_stream(
    js: JetStreamContext,
    spec: ConsumerSpec,
    template: EventConsumer[Any],
    sessions: async_sessionmaker[AsyncSession],
    show: Callable[[str, int, int], None] | None,
) -> StreamReport:
    info = await js.stream_info(spec.stream)
    total = info.state.messages
    consumer = EventConsumer(
        consumer=template.consumer,
        schemas=template.schemas,
        projector=template.projector,
        sessionmaker=sessions,
    )
    report = StreamReport(spec.stream, spec.durable, 0, 0, 0, 0)
    subscription = await js.pull_subscribe(
        spec.filter_subject,
        stream=spec.stream,
        config=ConsumerConfig(
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.NONE,
            inactive_threshold=REPLAY_CONSUMER_IDLE_S,
            mem_storage=True,
        ),
    )
    try:
        while report.messages < total:
            try:
                messages = await subscription.fetch(
                    REPLAY_FETCH_BATCH, timeout=REPLAY_FETCH_TIMEOUT_S
                )
            except TimeoutError:
                break
            plan = await consumer.apply_final([Delivery.from_msg(m) for m in messages])
            report.messages += len(messages)
            report.applied += len(plan.applied)
            report.duplicates += len(plan.duplicates)
            report.dead += len(plan.dead)
            if show:
                show(f"{spec.stream}/{spec.durable}", report.messages, total)
            if messages[-1].metadata.num_pending == 0:
                break
    finally:
        await subscription.unsubscribe()
    if show:
        sys.stderr.write("\n")
    return report


async def replay(settings: Settings, target_url: str, progress: bool = True) -> list[StreamReport]:
    await upgrade_async(target_url)
    engine = make_engine(target_url)
    sessions = make_sessionmaker(engine)
    nc = await connect(settings, "ops", "payments-replay")
    started = time.monotonic()
    try:
        await _require_empty(sessions)
        reports = []
        for spec, template in replay_consumers():
            show = _progress if progress else None
            reports.append(await replay_stream(nc.jetstream(), spec, template, sessions, show))
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
        sys.stderr.write(f"replayed in {time.monotonic() - started:.1f}s\n")
    return reports
