"""Publishes outbox rows to JetStream after their transaction commits, and sweeps up leftovers.

Consumers hand a commit's outbox ids to `submit` and ack their messages at once: the rows are
committed, so publishing them is this relay's job, not the ack path's. One drain task publishes
what was submitted in submission order, many commits at a time; a row left unpublished by a
crash is taken by the sweeper of the next worker to run.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Sequence

import nats.errors
from nats.aio.client import Client as NatsClient
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from contracts.events import EVENT_KEY_HEADER, MSG_ID_HEADER, SCHEMA_HEADER
from shared.atomic_batch import (
    MAX_ATOMIC_BATCH_MESSAGES,
    AtomicBatchRejected,
    OutgoingMessage,
    publish_atomic,
    publish_each,
)
from shared.db.engine import write_turn
from shared.db.models import OutboxMessage
from shared.db.repositories import outbox
from shared.db.repositories.outbox import PendingOutbox
from shared.faults import fault_point
from shared.observability import PUBLISH_SECONDS
from shared.publishing import PUBLISH_TIMEOUT_S

# A row still unpublished this long after its commit was left by a crash: the sweeper takes it.
OUTBOX_STALE_S = 5.0
OUTBOX_SWEEP_INTERVAL_S = 2.0
OUTBOX_SWEEP_BATCH = 500
# Rows the drain task publishes per round (several commits' worth).
RELAY_ROUND_ROWS = 2000
# Submitted rows not yet published beyond which `submit` waits: memory stays bounded and a
# consumer cannot run ahead of its LEDGER feed by more than this.
MAX_RELAY_BACKLOG_ROWS = 20_000

log = logging.getLogger(__name__)

# A row to publish: read back from the table (the sweeper) or kept from the commit.
OutboxRow = OutboxMessage | PendingOutbox


class OutboxRelay:
    """Publishes each commit's rows as atomic batches, one per stream, in outbox order."""

    def __init__(
        self, sessionmaker: async_sessionmaker[AsyncSession], nc: NatsClient, name: str
    ) -> None:
        self.sessionmaker = sessionmaker
        self.nc = nc
        self.js = nc.jetstream()  # one context for the relay's life: see publish_each
        self.name = name
        self._sweeper: asyncio.Task[None] | None = None
        self._drainer: asyncio.Task[None] | None = None
        self._submitted: collections.deque[OutboxRow] = collections.deque()
        self._work = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._publishing = False

    async def submit(self, rows: Sequence[PendingOutbox]) -> None:
        """Queue a committed transaction's rows for the drain task (waits while it is behind)."""
        if not rows:
            return
        await self._room.wait()
        self._submitted.extend(rows)
        self._work.set()
        if len(self._submitted) >= MAX_RELAY_BACKLOG_ROWS:
            self._room.clear()

    async def publish_now(self, rows: Sequence[OutboxRow]) -> None:
        """Publish the rows a just-committed transaction wrote. Failures are left to the sweeper."""
        if not rows:
            return
        fault_point(f"{self.name}:after_commit_before_publish")
        try:
            await self._publish(rows)
        except Exception:
            log.exception(
                "outbox publish failed; the sweeper will retry", extra={"relay": self.name}
            )

    async def sweep_once(self) -> int:
        async with write_turn(self.sessionmaker), self.sessionmaker() as session:
            rows = await outbox.stale(session, OUTBOX_STALE_S, OUTBOX_SWEEP_BATCH)
        await self._publish(rows)
        return len(rows)

    async def _publish(self, rows: Sequence[OutboxRow]) -> None:
        if not rows:
            return
        for chunk in _chunks_by_stream(rows):
            await self._publish_chunk(chunk)
        async with write_turn(self.sessionmaker), self.sessionmaker() as session, session.begin():
            await outbox.mark_published(session, [row.id for row in rows if row.id is not None])

    async def _publish_chunk(self, rows: Sequence[OutboxRow]) -> None:
        started = time.perf_counter()
        try:
            await publish_atomic(self.nc, [_outgoing(row) for row in rows], PUBLISH_TIMEOUT_S)
            PUBLISH_SECONDS.labels(rows[0].stream).observe(time.perf_counter() - started)
            return
        except (AtomicBatchRejected, nats.errors.TimeoutError) as error:
            # Most often a republish after a crash: some ids are stored already, and a batch
            # holding one is refused whole. One by one, the stream's dedup skips those.
            log.info(
                "atomic batch not stored; publishing one by one",
                extra={"relay": self.name, "error": str(error), "messages": len(rows)},
            )
        answers = await publish_each(
            self.js, rows[0].stream, [_outgoing(row) for row in rows], PUBLISH_TIMEOUT_S
        )
        for answer in answers:
            if isinstance(answer, BaseException):
                raise answer  # the rows stay unpublished: the next round or the sweeper retries
        PUBLISH_SECONDS.labels(rows[0].stream).observe(time.perf_counter() - started)

    def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep_forever(), name=f"outbox-sweep:{self.name}")
        self._drainer = asyncio.create_task(self._drain_forever(), name=f"outbox:{self.name}")

    async def stop(self, timeout_s: float) -> None:
        """Publish what was submitted (up to `timeout_s`), then stop; the sweeper takes the rest."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while (
            self._submitted or self._publishing
        ) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        for task in (self._drainer, self._sweeper):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _drain_forever(self) -> None:
        while True:  # runs for the life of the worker; cancelled on shutdown
            await self._work.wait()
            rows = [
                self._submitted.popleft()
                for _ in range(min(RELAY_ROUND_ROWS, len(self._submitted)))
            ]
            if not self._submitted:
                self._work.clear()
            if len(self._submitted) < MAX_RELAY_BACKLOG_ROWS:
                self._room.set()
            self._publishing = True
            try:
                await self.publish_now(rows)
            finally:
                self._publishing = False

    async def _sweep_forever(self) -> None:
        while True:  # runs for the life of the worker; cancelled on shutdown
            await asyncio.sleep(OUTBOX_SWEEP_INTERVAL_S)
            try:
                await self.sweep_once()
            except Exception:
                log.exception("outbox sweep failed", extra={"relay": self.name})


def _outgoing(row: OutboxRow) -> OutgoingMessage:
    return OutgoingMessage(
        subject=row.subject,
        body=row.body,
        headers={
            MSG_ID_HEADER: row.event_key,
            EVENT_KEY_HEADER: row.event_key,
            SCHEMA_HEADER: row.schema_name,
        },
    )


def _chunks_by_stream(rows: Sequence[OutboxRow]) -> list[list[OutboxRow]]:
    """Consecutive rows of one stream, at most one atomic batch each, keeping outbox order."""
    chunks: list[list[OutboxRow]] = []
    for row in rows:
        current = chunks[-1] if chunks else None
        if current and current[0].stream == row.stream and len(current) < MAX_ATOMIC_BATCH_MESSAGES:
            current.append(row)
        else:
            chunks.append([row])
    return chunks
