"""Health poller: polls orchestrators' own `health_url` when no forwarder reports for them.

Consumes
  - nothing from a stream: each round it reads the registry projection for orchestrators with
    a `health_url` and no fresh forwarder report (PAYMENTS_FORWARDER_HEALTH_TTL_SECONDS).

Produces
  - HEALTH `health.reports.<id>` with source `health_url`: the answer when it is a JSON object
    with a `summary`, otherwise a report saying what went wrong (`reachable` false for a
    connection error, timeout or HTTP error status; `malformed` true for an unreadable answer).
    The registry worker turns these, like forwarder reports, into misses and cooldowns.

Guarantee
  An orchestrator is polled at most once per round across every poller copy: a copy polls only
  the orchestrators it claimed for the round (`health_poll_claims`, primary key orchestrator
  and round number). The report's key names the round, so a retried publish is stored once.
  An orchestrator with a fresh forwarder report is never polled.

Limits
  Rounds are PAYMENTS_HEALTH_POLL_INTERVAL_SECONDS long (wall clock, the same for every copy);
  at most PAYMENTS_HEALTH_POLL_CONCURRENCY requests at once; each request gets the record's
  `health_timeout` or PAYMENTS_DEFAULT_HEALTH_TIMEOUT; an answer above MAX_HEALTH_BODY_BYTES is
  malformed. Claims older than KEEP_CLAIM_ROUNDS rounds are deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from datetime import UTC, datetime
from typing import Any

import aiohttp
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from contracts import subjects
from contracts.events import HealthReportV1
from contracts.streams import HEALTH
from shared.db.engine import insert_for
from shared.db.health_poll_models import HealthPollClaim
from shared.db.models import Orchestrator
from shared.publishing import publish_event
from shared.registry_rules import HEALTH_URL_SOURCE, report_is_fresh
from shared.settings import load_settings
from shared.worker_app import WorkerRuntime

log = logging.getLogger(__name__)

MAX_HEALTH_BODY_BYTES = 64 * 1024
# Long enough to audit which copy polled what; a few rows per orchestrator in all.
KEEP_CLAIM_ROUNDS = 100
ERROR_TEXT_CHARS = 200

settings = load_settings()
runtime = WorkerRuntime("health_poller", settings)
app = runtime.app
_CLAIMS = HealthPollClaim.__table__  # type: ignore[attr-defined]


def round_number(now_s: float, interval_s: float) -> int:
    return int(now_s // interval_s)


async def fetch_health(http: aiohttp.ClientSession, url: str, timeout_s: float) -> dict[str, Any]:
    """The health answer, or a report of why there is none. Never raises."""
    try:
        async with http.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
            if response.status != 200:
                return {"reachable": False, "error": f"HTTP {response.status}"}
            body = await response.content.read(MAX_HEALTH_BODY_BYTES + 1)
    except (aiohttp.ClientError, TimeoutError, ValueError) as error:
        return {"reachable": False, "error": _describe(error)}
    return parse_health(body)


def parse_health(body: bytes) -> dict[str, Any]:
    if len(body) > MAX_HEALTH_BODY_BYTES:
        return {"reachable": True, "malformed": True, "error": "answer too large"}
    try:
        payload = json.loads(body)
    except ValueError:
        return {"reachable": True, "malformed": True, "error": "answer is not JSON"}
    if not isinstance(payload, dict) or not isinstance(payload.get("summary"), dict):
        return {"reachable": True, "malformed": True, "error": "answer has no summary object"}
    return payload


def _describe(error: BaseException) -> str:
    # The type and a short text: enough to act on, never a whole response body.
    return f"{type(error).__name__}: {str(error)[:ERROR_TEXT_CHARS]}".rstrip(": ")


class HealthPoller:
    def __init__(self) -> None:
        self.holder = f"{socket.gethostname()}:{os.getpid()}"
        self._task: asyncio.Task[None] | None = None
        self._http: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._http = aiohttp.ClientSession()
        self._task = asyncio.create_task(self._run(), name="health-poller")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._http is not None:
            await self._http.close()

    async def _run(self) -> None:
        interval = settings.health_poll_interval_seconds
        while True:  # for the life of the worker; cancelled on shutdown
            current = round_number(time.time(), interval)
            try:
                await self.poll_round(current)
            except Exception:
                log.exception("health poll round failed", extra={"round": current})
            await asyncio.sleep(max(0.0, (current + 1) * interval - time.time()))

    async def poll_round(self, current: int) -> None:
        """Claim and poll a chunk at a time, so several copies share a round's work."""
        async with runtime.sessionmaker() as session:
            due = await due_for_polling(session, datetime.now(UTC))
        await self._forget_old_rounds(current)
        limit = asyncio.Semaphore(settings.health_poll_concurrency)
        chunk_size = settings.health_poll_concurrency
        for start in range(0, len(due), chunk_size):
            mine = await self._claim(due[start : start + chunk_size], current)
            await asyncio.gather(*(self._poll(record, current, limit) for record in mine))

    async def _forget_old_rounds(self, current: int) -> None:
        async with runtime.sessionmaker() as session, session.begin():
            await session.execute(
                delete(_CLAIMS).where(_CLAIMS.c.round_number < current - KEEP_CLAIM_ROUNDS)
            )

    async def _claim(self, due: list[Orchestrator], current: int) -> list[Orchestrator]:
        """The ones this copy claimed for the round; another copy's claims are skipped."""
        mine = []
        async with runtime.sessionmaker() as session, session.begin():
            now = datetime.now(UTC)
            for record in due:
                result = await session.execute(
                    insert_for(session)(_CLAIMS)
                    .values(
                        orchestrator_id=record.orchestrator_id,
                        round_number=current,
                        holder=self.holder,
                        claimed_at=now,
                    )
                    .on_conflict_do_nothing()
                )
                if result.rowcount == 1:  # type: ignore[attr-defined]
                    mine.append(record)
        return mine

    async def _poll(self, record: Orchestrator, current: int, limit: asyncio.Semaphore) -> None:
        assert self._http is not None and record.health_url
        timeout_s = record.health_timeout or settings.default_health_timeout
        async with limit:
            data = await fetch_health(self._http, record.health_url, timeout_s)
        report = HealthReportV1(
            orchestrator_id=record.orchestrator_id,
            source=HEALTH_URL_SOURCE,
            data=data,
            received_at=datetime.now(UTC),
        )
        await publish_event(
            runtime.js,
            stream=HEALTH.name,
            subject=subjects.health_report(record.orchestrator_id),
            event=report,
            key=f"health:{record.orchestrator_id}:poll:{current}",
        )


async def due_for_polling(session: AsyncSession, now: datetime) -> list[Orchestrator]:
    """Orchestrators with a health_url whose forwarder has not reported within the TTL."""
    rows = await session.execute(
        select(Orchestrator)
        .where(col(Orchestrator.health_url).is_not(None), col(Orchestrator.health_url) != "")
        .order_by(col(Orchestrator.orchestrator_id))
    )
    ttl_s = settings.forwarder_health_ttl_seconds
    return [
        record
        for record in rows.scalars()
        if not report_is_fresh(record.forwarder_health_reported_at, now, ttl_s)
    ]


poller = HealthPoller()
runtime.startup_hooks.append(poller.start)
runtime.shutdown_hooks.append(poller.stop)
