"""The health poller and health-based eligibility, with real processes and a fake health endpoint.

The fake endpoint is an aiohttp server on loopback playing orchestrators' `GET /health`: its
answers are scripted per orchestrator and it counts the calls it gets.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from sqlalchemy import select

from contracts import subjects
from contracts.events import HealthReportV1
from contracts.streams import HEALTH
from shared.db.engine import make_engine, make_sessionmaker
from shared.db.health_poll_models import HealthPollClaim
from shared.db.models import Orchestrator
from shared.embedded_nats import free_port
from shared.registry_rules import HEALTH_URL_SOURCE
from tests.harness import Process, worker_process
from tests.ledger_stack import (
    ADMIN,
    LedgerStack,
    call,
    ledger_stack,
    read_stream,
    run_payments,
    wait_until,
)
from tests.payouts_stack import payout_stack, wei

HEALTHY = {
    "summary": {"services_up": 3, "services_down": 0, "total_services": 3, "overall_uptime": 100}
}
DOWN = {"summary": {"services_up": 0, "services_down": 3, "total_services": 3, "overall_uptime": 0}}
POLL_ENV = {
    "PAYMENTS_HEALTH_POLL_INTERVAL_SECONDS": "0.4",
    "PAYMENTS_MISS_THRESHOLD": "3",
    "PAYMENTS_COOLDOWN_SECONDS": "2",
    "PAYMENTS_FORWARDER_HEALTH_TTL_SECONDS": "120",
}
COOLDOWN_FIELDS = (
    "cooldown_expires_at",
    "last_cooldown_started_at",
    "last_cooldown_cleared_at",
    "last_missed_all_services",
    "consecutive_misses",
    "eligible_for_payments",
)


@dataclass
class FakeHealth:
    """Scripted answers per orchestrator (the last one repeats) and the calls received."""

    port: int
    scripts: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    calls: Counter[str] = field(default_factory=Counter)

    def url(self, orchestrator_id: str) -> str:
        return f"http://127.0.0.1:{self.port}/health/{orchestrator_id}"

    async def answer(self, request: web.Request) -> web.Response:
        oid = request.match_info["oid"]
        script = self.scripts.get(oid, [HEALTHY])
        index = min(self.calls[oid], len(script) - 1)
        self.calls[oid] += 1
        return web.json_response(script[index])


@contextlib.asynccontextmanager
async def fake_health() -> AsyncIterator[FakeHealth]:
    fake = FakeHealth(port=free_port())
    app = web.Application()
    app.router.add_get("/health/{oid}", fake.answer)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", fake.port).start()
    try:
        yield fake
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def running_poller(stack: LedgerStack, copy: int = 0) -> AsyncIterator[Process]:
    """A health poller process, stopped however the test ends."""
    poller = worker_process("health_poller", stack.env, stack.tmp, copy).start()
    try:
        await asyncio.to_thread(poller.wait_log, "worker started")
        yield poller
    finally:
        poller.terminate()


async def record(stack: LedgerStack, orchestrator_id: str) -> Orchestrator:
    async with stack.sessions() as session:
        found = await session.get(Orchestrator, orchestrator_id)
        assert found is not None
        return found


async def polled_reports(stack: LedgerStack, orchestrator_id: str) -> list[HealthReportV1]:
    """The poller's reports in the HEALTH stream, in stream order."""
    messages = await read_stream(stack.js, HEALTH.name, subjects.health_report(orchestrator_id))
    reports = [HealthReportV1.model_validate_json(m.data) for m in messages]
    assert all(r.source == HEALTH_URL_SOURCE for r in reports)
    return reports


def cooldown_state(row: Orchestrator) -> tuple[Any, ...]:
    return tuple(getattr(row, name) for name in COOLDOWN_FIELDS)


async def test_three_misses_start_a_cooldown_that_holds_payouts_until_a_healthy_report(
    tmp_path: Path,
) -> None:
    async with fake_health() as fake:
        polled = "orch-pay0"
        # Healthy, then down: the third miss starts the cooldown, and further misses keep it
        # going (every third restarts it) until the test makes the endpoint healthy again.
        fake.scripts[polled] = [HEALTHY, DOWN]
        async with payout_stack(
            "sqlite",
            tmp_path,
            strategy="eth_transfer",
            metadata={polled: {"health_url": fake.url(polled)}},
            **POLL_ENV,
        ) as paying:
            stack = paying.stack
            async with running_poller(stack):

                async def cooling() -> Orchestrator | None:
                    row = await record(stack, polled)
                    return row if row.cooldown_expires_at is not None else None

                started = await wait_until(cooling, 30.0, stack)
                assert started.last_healthy_at is not None  # the first answer was healthy
                assert started.last_cooldown_started_at == started.last_missed_all_services
                reports = await polled_reports(stack, polled)
                # healthy, miss, miss, miss: the cooldown starts at the third miss's report time
                assert [r.data == HEALTHY for r in reports[:4]] == [True, False, False, False]
                assert started.last_cooldown_started_at == reports[3].received_at
                assert not started.eligible_for_payments

                # Credits during the cooldown are held, and the payout record says why.
                await paying.credit(polled, "0.002", "during-cooldown")
                await paying.start_payouts()

                async def skipped() -> list[Any] | None:
                    rows = [p for p in await paying.payouts_rows() if p.status == "skipped"]
                    return rows or None

                skip = (await wait_until(skipped, 30.0, stack))[0]
                assert skip.orchestrator_id == polled
                assert "cooldown" in (skip.reason or "")
                assert await paying.debits() == {}

                # A healthy report after the cooldown's end clears it; the payout follows.
                fake.scripts[polled] = [HEALTHY]
                await paying.wait_paid(1)
                cleared = await record(stack, polled)
                assert cleared.cooldown_expires_at is None and cleared.eligible_for_payments
                assert cleared.last_cooldown_cleared_at is not None
                assert cleared.last_cooldown_cleared_at >= started.cooldown_expires_at
                assert await paying.debits() == {polled: -wei("0.002")}
            await assert_replay_gives_the_same_cooldowns(stack, tmp_path, polled)


async def assert_replay_gives_the_same_cooldowns(
    stack: LedgerStack, tmp_path: Path, orchestrator_id: str
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'replayed-health.db'}"
    replayed = await run_payments(stack.env, "replay", "--into", url)
    assert replayed.code == 0, replayed.stderr[-3000:]
    engine = make_engine(url, writer=False)
    try:
        async with make_sessionmaker(engine)() as session:
            rebuilt = await session.get(Orchestrator, orchestrator_id)
        assert rebuilt is not None
        live = await record(stack, orchestrator_id)
        assert cooldown_state(rebuilt) == cooldown_state(live)
        assert live.last_cooldown_started_at is not None
    finally:
        await engine.dispose()


async def test_an_orchestrator_with_a_fresh_forwarder_report_is_never_polled(
    tmp_path: Path,
) -> None:
    async with fake_health() as fake:
        fresh, silent = "orch-fresh", "orch-silent"
        orchestrators = [
            {"orchestrator_id": fresh, "address": "0x" + "a" * 40, "health_url": fake.url(fresh)},
            {"orchestrator_id": silent, "address": "0x" + "b" * 40, "health_url": fake.url(silent)},
        ]
        async with ledger_stack("sqlite", tmp_path, orchestrators, **POLL_ENV) as stack:
            answer = await call(
                stack.http,
                "POST",
                f"{stack.base}/api/orchestrators/{fresh}/health",
                json={"source": "forwarder", "data": HEALTHY},
                headers=ADMIN,
            )
            assert answer.status == 202, answer.body

            async def forwarder_fresh() -> bool:
                return (await record(stack, fresh)).forwarder_health_reported_at is not None

            await wait_until(forwarder_fresh, 20.0, stack)
            async with running_poller(stack):

                async def several_rounds() -> bool:
                    return fake.calls[silent] >= 3

                await wait_until(several_rounds, 30.0, stack)
            assert fake.calls[fresh] == 0
            polled = await record(stack, silent)
            assert polled.health_checked_at is not None and polled.last_healthy_at is not None


async def test_two_pollers_over_fifty_orchestrators_poll_each_once_per_round(
    tmp_path: Path,
) -> None:
    count = 50
    async with fake_health() as fake:
        orchestrators = [
            {
                "orchestrator_id": f"orch-h{i:02d}",
                "address": "0x" + f"{i + 1:040x}",
                "health_url": fake.url(f"orch-h{i:02d}"),
            }
            for i in range(count)
        ]
        async with ledger_stack("sqlite", tmp_path, orchestrators, **POLL_ENV) as stack:
            async with running_poller(stack), running_poller(stack, copy=1):

                async def rounds_done() -> bool:
                    return min(fake.calls[o["orchestrator_id"]] for o in orchestrators) >= 4

                await wait_until(rounds_done, 60.0, stack)
            async with stack.sessions() as session:
                claims = list((await session.execute(select(HealthPollClaim))).scalars())
            per_orchestrator: dict[str, set[int]] = defaultdict(set)
            for claim in claims:
                per_orchestrator[claim.orchestrator_id].add(claim.round_number)
            # Every call was a claimed (orchestrator, round), and a claim is unique: no
            # orchestrator was polled twice in a round, whichever copy polled it. A copy claims a
            # chunk before it polls it, so the round in flight when the pollers stopped may hold a
            # claim whose call never went out: at most one per orchestrator.
            for oid, rounds in per_orchestrator.items():
                assert len(rounds) - 1 <= fake.calls[oid] <= len(rounds), (oid, fake.calls[oid])
            assert set(fake.calls) == {o["orchestrator_id"] for o in orchestrators}
