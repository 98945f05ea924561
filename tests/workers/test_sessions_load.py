"""Load: 1,000 sessions x (start, 20 heartbeats, end) through HTTP, three sessions-worker
processes, each session's events over different connections. Credits must be exactly what the
stored events say, computed here independently, and nothing may be credited twice.

How the events travel: 64 sender tasks each own about 16 sessions and send step k of all
their sessions before step k+1, each event only after the session's previous one answered
202, so per session the events are in order, while the sessions interleave. Each event goes
through one of several aiohttp ClientSessions (each its own connection pool), chosen by
(session + step), so consecutive events of a session arrive on different api connections.
Segments are 10 s long, so a session that lives longer is billed in several segments (several
ledger entries, each with its own key).

Size: PAYMENTS_TEST_LOAD_SESSIONS (default 1000) for quicker local runs. It is marked `slow`:
on a small shared machine the workers apply roughly 60-250 events/s, so it takes minutes.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from sqlalchemy import func, select

from shared.db.models import ActivityLease, Balance, DeadLetter, Session
from tests.conftest import database_backends
from tests.session_stack import (
    WEI_PER_MS,
    SessionStack,
    ledger_rows,
    orchestrator,
    parse_time,
    session_rows,
    session_stack,
    stored_session_events,
)

SESSION_COUNT = int(os.environ.get("PAYMENTS_TEST_LOAD_SESSIONS", "1000"))
HEARTBEATS = 20
SENDERS = 64
CLIENTS = 8
SEGMENT_S = 10
WORKER_COPIES = 3
SEND_TIMEOUT_S = 300.0
SETTLE_TIMEOUT_S = max(60.0, 0.6 * SESSION_COUNT)
ORCHESTRATORS = [
    orchestrator("orch-load-a", "a", "198.51.100.21"),
    orchestrator("orch-load-b", "b", "198.51.100.22"),
    orchestrator("orch-load-c", "c", "198.51.100.23"),
    orchestrator("orch-load-d", "d", "198.51.100.24"),
]
STEPS = ["start", *["heartbeat"] * HEARTBEATS, "end"]

pytestmark = [
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.slow,
    pytest.mark.timeout(SEND_TIMEOUT_S + SETTLE_TIMEOUT_S + 120),
]


def session_id(index: int) -> str:
    return f"load-{index:04d}"


def owner(index: int) -> dict[str, str]:
    return ORCHESTRATORS[index % len(ORCHESTRATORS)]


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=database_backends())
async def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[SessionStack]:
    tmp: Path = tmp_path_factory.mktemp(f"sessions-load-{request.param}")
    async with session_stack(
        request.param,
        tmp,
        ORCHESTRATORS,
        sessions_copies=WORKER_COPIES,
        PAYMENTS_SESSION_SEGMENT_SECONDS=str(SEGMENT_S),
        PAYMENTS_SESSION_IDLE_TIMEOUT_SECONDS="900",
        PAYMENTS_SESSION_TICK_SECONDS="5",
    ) as running:
        yield running


async def send_all(stack: SessionStack) -> int:
    """Send every event; return how many were answered 202."""
    url = stack.url("/api/sessions/events")
    clients = [
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=SENDERS),
            timeout=aiohttp.ClientTimeout(total=30),
        )
        for _ in range(CLIENTS)
    ]
    sent = 0

    async def post(client: aiohttp.ClientSession, body: dict[str, Any], key: str | None) -> None:
        nonlocal sent
        heads = {"Idempotency-Key": key} if key else {}
        async with client.post(url, json=body, headers=heads) as answer:
            text = await answer.text()
            assert answer.status == 202, (answer.status, text)
        sent += 1

    async def sender(first: int) -> None:
        owned = range(first, SESSION_COUNT, SENDERS)
        for step, event in enumerate(STEPS):
            for index in owned:
                target = owner(index)
                body: dict[str, Any] = {
                    "session_id": session_id(index),
                    "upstream_addr": target["host_public_ip"],
                    "upstream_port": 8443,
                    "edge_id": f"edge-{index % 7}",
                    "event": event,
                }
                # Every event has its own key (otherwise two heartbeats of a session in the same
                # second would be one); half the sessions say it in the body, half in a header.
                key = None
                if index % 2:
                    body["event_id"] = f"{step}"
                else:
                    key = f"{session_id(index)}-{step}"
                await post(clients[(index + step) % CLIENTS], body, key)

    try:
        await asyncio.wait_for(asyncio.gather(*(sender(i) for i in range(SENDERS))), SEND_TIMEOUT_S)
    finally:
        for client in clients:
            await client.close()
    return sent


async def ended_count(stack: SessionStack) -> int:
    async with stack.sessions() as db:
        query = select(func.count()).where(
            Session.session_id.startswith("load-"),  # type: ignore[attr-defined]
            Session.ended_at.is_not(None),  # type: ignore[union-attr]
        )
        return int((await db.execute(query.select_from(Session))).scalar_one())


def expected_from_stream(
    events: list[dict[str, Any]],
) -> tuple[dict[str, int], dict[str, set[str]], dict[str, Any]]:
    """Per session: credit in wei and the entry keys, from the stored events alone."""
    by_session: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for event in events:
        by_session[event["session_id"]].append(event)
    credit: dict[str, int] = {}
    keys: dict[str, set[str]] = {}
    bounds: dict[str, Any] = {}
    segment = timedelta(seconds=SEGMENT_S)
    for sid, stored in by_session.items():
        assert [e["event"] for e in stored] == STEPS, sid  # every event stored once, in order
        first = parse_time(stored[0]["received_at"])
        last = parse_time(stored[-1]["received_at"])
        gaps = [
            parse_time(b["received_at"]) - parse_time(a["received_at"])
            for a, b in itertools.pairwise(stored)
        ]
        assert min(gaps) >= timedelta(0), sid  # the ingress stamped them in sending order
        assert max(gaps) < timedelta(seconds=900), sid  # within the idle timeout
        duration_ms = (last - first) // timedelta(milliseconds=1)
        full = (last - first) // segment
        remainder_ms = duration_ms - full * SEGMENT_S * 1000
        count = full + (1 if remainder_ms > 0 else 0)
        credit[sid] = duration_ms * WEI_PER_MS
        keys[sid] = {f"session:{sid}:0:{i}" for i in range(count)}
        bounds[sid] = (first, last)
    return credit, keys, bounds


async def test_thousand_sessions_twenty_heartbeats_three_workers_credit_exactly(
    stack: SessionStack,
) -> None:
    started = time.monotonic()
    sent = await send_all(stack)
    send_s = time.monotonic() - started
    assert sent == SESSION_COUNT * len(STEPS)

    async def all_ended() -> bool:
        return await ended_count(stack) == SESSION_COUNT

    await stack.until(all_ended, timeout_s=SETTLE_TIMEOUT_S)
    settle_s = time.monotonic() - started

    events = [e for e in await stored_session_events(stack.js) if "session_id" in e]
    assert len(events) == sent
    credit, keys, bounds = expected_from_stream(events)
    assert len(credit) == SESSION_COUNT

    rows = await session_rows(stack.sessions, "load-")
    entries = [e for e in await ledger_rows(stack.sessions) if e.reason == "session_time"]
    entry_keys = [e.entry_key for e in entries]
    assert len(entry_keys) == len(set(entry_keys)), "an entry key appears twice"

    credited: dict[str, int] = defaultdict(int)
    keys_of: dict[str, set[str]] = defaultdict(set)
    per_orchestrator: dict[str, int] = defaultdict(int)
    for entry in entries:
        sid = (entry.entry_metadata or {})["session_id"]
        credited[sid] += entry.amount_wei
        keys_of[sid].add(entry.entry_key)
        per_orchestrator[entry.orchestrator_id] += entry.amount_wei
        assert entry.orchestrator_id == owner(int(sid.split("-")[1]))["orchestrator_id"]

    wrong = [sid for sid in credit if credited.get(sid, 0) != credit[sid]]
    assert not wrong, [(s, credited.get(s), credit[s]) for s in wrong[:5]]
    assert keys_of == keys
    for sid, row in rows.items():
        first, last = bounds[sid]
        assert (row.started_at, row.ended_at, row.end_trigger, row.run) == (first, last, "end", 0)
        assert row.heartbeat_count == HEARTBEATS, sid
        assert row.billed_wei == credit[sid], sid
    expected_total = sum(credit.values())
    assert sum(credited.values()) == expected_total

    async with stack.sessions() as db:
        balances = {
            b.orchestrator_id: b.balance_wei for b in (await db.execute(select(Balance))).scalars()
        }
        dead = (await db.execute(select(func.count()).select_from(DeadLetter))).scalar_one()
        live_leases = (
            await db.execute(
                select(func.count())
                .select_from(ActivityLease)
                .where(ActivityLease.revoked_at.is_(None))  # type: ignore[union-attr]
            )
        ).scalar_one()
    assert balances == dict(per_orchestrator)
    assert dead == 0 and live_leases == 0
    several = sum(1 for found in keys_of.values() if len(found) > 1)
    print(
        f"\n[{stack.database.backend}] events sent {sent} in {send_s:.1f}s "
        f"({sent / send_s:.0f}/s); all {SESSION_COUNT} sessions ended after {settle_s:.1f}s; "
        f"{len(entries)} entries credited ({several} sessions in several segments), "
        f"{expected_total} wei ({expected_total / 10**18:.6f} ETH)"
    )
