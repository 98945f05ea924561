"""Publishes outbox rows to JetStream after their transaction commits, and sweeps up leftovers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from nats.js.client import JetStreamContext
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from contracts.events import EVENT_KEY_HEADER, MSG_ID_HEADER, SCHEMA_HEADER
from shared.db.models import OutboxMessage
from shared.db.repositories import outbox
from shared.faults import fault_point
from shared.publishing import PUBLISH_TIMEOUT_S

# A row still unpublished this long after its commit was left by a crash: the sweeper takes it.
OUTBOX_STALE_S = 5.0
OUTBOX_SWEEP_INTERVAL_S = 2.0
OUTBOX_SWEEP_BATCH = 500

log = logging.getLogger(__name__)


class OutboxRelay:
    def __init__(
        self, sessionmaker: async_sessionmaker[AsyncSession], js: JetStreamContext, name: str
    ) -> None:
        self.sessionmaker = sessionmaker
        self.js = js
        self.name = name
        self._sweeper: asyncio.Task[None] | None = None

    async def publish_ids(self, ids: Sequence[int]) -> None:
        """Publish the rows a just-committed transaction wrote. Failures are left to the sweeper."""
        if not ids:
            return
        fault_point(f"{self.name}:after_commit_before_publish")
        try:
            async with self.sessionmaker() as session:
                rows = await outbox.load(session, ids)
            await self._publish(rows)
        except Exception:
            log.exception(
                "outbox publish failed; the sweeper will retry", extra={"relay": self.name}
            )

    async def sweep_once(self) -> int:
        async with self.sessionmaker() as session:
            rows = await outbox.stale(session, OUTBOX_STALE_S, OUTBOX_SWEEP_BATCH)
        await self._publish(rows)
        return len(rows)

    async def _publish(self, rows: Sequence[OutboxMessage]) -> None:
        if not rows:
            return
        futures = [
            await self.js.publish_async(
                row.subject,
                row.body,
                stream=row.stream,
                headers={
                    MSG_ID_HEADER: row.event_key,
                    EVENT_KEY_HEADER: row.event_key,
                    SCHEMA_HEADER: row.schema_name,
                },
            )
            for row in rows
        ]
        await asyncio.wait_for(asyncio.gather(*futures), PUBLISH_TIMEOUT_S)
        async with self.sessionmaker() as session, session.begin():
            await outbox.mark_published(session, [row.id for row in rows if row.id is not None])

    def start_sweeper(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep_forever())

    async def stop_sweeper(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper

    async def _sweep_forever(self) -> None:
        while True:  # runs for the life of the worker; cancelled on shutdown
            await asyncio.sleep(OUTBOX_SWEEP_INTERVAL_S)
            try:
                await self.sweep_once()
            except Exception:
                log.exception("outbox sweep failed", extra={"relay": self.name})
