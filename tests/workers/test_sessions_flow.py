"""Session billing and activity leases through the whole pipeline: HTTP -> SESSIONS stream ->
sessions worker -> sessions, leases and ledger rows -> HTTP reads; then `payments replay`.

One stack per database backend (nats-server, database, registry, sessions and ledger workers)
is shared by the module, with two api processes: "main" with a generous idle timeout, and
"idle" with PAYMENTS_SESSION_IDLE_TIMEOUT_SECONDS=2 (the ingress stamps the timeout into each
event, so the worker closes that api's sessions after 2 s). Workers tick every second. Every
test works on its own orchestrator (its own upstream IP), so their effects do not mix.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from sqlalchemy import select

from contracts import subjects
from contracts.events import EVENT_KEY_HEADER
from shared.db.engine import make_engine, make_sessionmaker
from shared.db.models import LedgerEntry, ProcessedEvent, Session
from tests.conftest import database_backends
from tests.harness import PROJECT_ROOT
from tests.session_stack import (
    RATE_ETH_PER_MINUTE,
    WEI_PER_MS,
    Answer,
    SessionStack,
    call,
    lease_row,
    ledger_rows,
    orchestrator,
    parse_time,
    read_stream,
    session_row,
    session_stack,
    stream_count,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

EDGE = "edge-a"
PORT = 8443
ORCH_FLOW, IP_FLOW = "orch-flow", "198.51.100.7"
ORCH_KEYED, IP_KEYED = "orch-keyed", "198.51.100.8"
ORCH_EVENT_ID, IP_EVENT_ID = "orch-event-id", "198.51.100.9"
ORCH_NO_KEY, IP_NO_KEY = "orch-no-key", "198.51.100.10"
ORCH_IDLE, IP_IDLE = "orch-idle", "198.51.100.11"
ORCH_LEASE, IP_LEASE = "orch-lease", "198.51.100.12"
ORCH_OTHER, IP_OTHER = "orch-other", "198.51.100.13"
ORCHESTRATORS = [
    orchestrator(ORCH_FLOW, "a", IP_FLOW),
    orchestrator(ORCH_KEYED, "b", IP_KEYED),
    orchestrator(ORCH_EVENT_ID, "c", IP_EVENT_ID),
    orchestrator(ORCH_NO_KEY, "d", IP_NO_KEY),
    orchestrator(ORCH_IDLE, "e", IP_IDLE),
    orchestrator(ORCH_LEASE, "f", IP_LEASE),
    orchestrator(ORCH_OTHER, "1", IP_OTHER),
]
LEASE_DEFAULT_S = 900
LEASE_MAX_S = 1800
MAIN_IDLE_S = 60
IDLE_API_IDLE_S = 2


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=database_backends())
async def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[SessionStack]:
    tmp: Path = tmp_path_factory.mktemp(f"sessions-flow-{request.param}")
    async with session_stack(
        request.param,
        tmp,
        ORCHESTRATORS,
        apis={
            "main": {"PAYMENTS_SESSION_IDLE_TIMEOUT_SECONDS": str(MAIN_IDLE_S)},
            "idle": {"PAYMENTS_SESSION_IDLE_TIMEOUT_SECONDS": str(IDLE_API_IDLE_S)},
        },
        PAYMENTS_SESSION_TICK_SECONDS="1",
        PAYMENTS_ACTIVITY_LEASE_SECONDS=str(LEASE_DEFAULT_S),
        PAYMENTS_ACTIVITY_LEASE_MAX_SECONDS=str(LEASE_MAX_S),
    ) as running:
        yield running


# -- helpers ------------------------------------------------------------------------------------


async def post_event(
    stack: SessionStack,
    session_id: str,
    event: str,
    ip: str,
    *,
    api: str = "main",
    key: str | None = None,
    event_id: str | None = None,
) -> Answer:
    body: dict[str, Any] = {
        "session_id": session_id,
        "upstream_addr": ip,
        "upstream_port": PORT,
        "edge_id": EDGE,
        "event": event,
    }
    if event_id is not None:
        body["event_id"] = event_id
    heads = {"Content-Type": "application/json"}
    if key is not None:
        heads["Idempotency-Key"] = key
    answer = await call(
        stack.http, "POST", stack.url("/api/sessions/events", api), json=body, headers=heads
    )
    assert answer.status == 202, answer.body
    return answer


async def sessions_view(stack: SessionStack, **query: str) -> dict[str, dict]:
    answer = await call(stack.http, "GET", stack.url("/api/sessions"), params=query)
    assert answer.status == 200, answer.body
    return {s["session_id"]: s for s in answer.body["sessions"]}


async def leases_view(stack: SessionStack, **query: str) -> dict[str, dict]:
    answer = await call(stack.http, "GET", stack.url("/api/activity/leases"), params=query)
    assert answer.status == 200, answer.body
    return {lease["lease_id"]: lease for lease in answer.body["leases"]}


async def orchestrator_view(stack: SessionStack, orchestrator_id: str) -> dict:
    answer = await call(stack.http, "GET", stack.url(f"/api/orchestrators/{orchestrator_id}"))
    assert answer.status == 200, answer.body
    return answer.body


async def ledger_view(stack: SessionStack, orchestrator_id: str) -> list[dict]:
    answer = await call(
        stack.http,
        "GET",
        stack.url("/api/ledger/events"),
        params={"orchestrator_id": orchestrator_id},
    )
    assert answer.status == 200, answer.body
    return [e for e in answer.body["events"] if e["reason"] == "session_time"]


async def all_applied(stack: SessionStack, session_id: str) -> bool:
    """Every stored event of the session is in the sessions worker's inbox."""
    messages = await read_stream(stack.js, subjects.session_event(session_id))
    keys = {m.headers[EVENT_KEY_HEADER] for m in messages if m.headers}
    async with stack.sessions() as db:
        done = await db.execute(
            select(ProcessedEvent.event_key).where(
                ProcessedEvent.consumer == "sessions",
                ProcessedEvent.event_key.in_(keys),  # type: ignore[attr-defined]
            )
        )
        return bool(keys) and set(done.scalars()) == keys


async def ended(stack: SessionStack, session_id: str) -> Session | None:
    row = await session_row(stack.sessions, session_id)
    return row if row is not None and row.ended_at is not None else None


def whole_ms(start: datetime, end: datetime) -> int:
    return (end - start) // timedelta(milliseconds=1)


def expected_eth(duration_ms: int) -> Decimal:
    return Decimal(duration_ms) * Decimal(RATE_ETH_PER_MINUTE) / Decimal(60_000)


def recipe_proof(metadata: dict, orchestrator_id: str) -> str:
    """The proof_hash recipe over what the entry's metadata says the segment was."""
    document = {
        "session_id": metadata["session_id"],
        "orchestrator_id": orchestrator_id,
        "edge_id": metadata["edge_id"],
        "segment_index": int(metadata["segment_index"]),
        "segment_start": metadata["segment_start"],
        "segment_end": metadata["segment_end"],
        "duration_ms": int(metadata["duration_ms"]),
    }
    text = json.dumps(document, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


# -- 2. start, heartbeat, end ---------------------------------------------------------------


async def test_start_heartbeat_end_credits_duration_times_rate_and_holds_a_lease(
    stack: SessionStack,
) -> None:
    sid = "flow-1"
    lease_id = f"session:{sid}"
    start = await post_event(stack, sid, "start", IP_FLOW)
    assert start.body["duplicate"] is False and start.body["event"] == "start"

    async def lease_active() -> dict:
        return (await leases_view(stack, active_only="true", orchestrator_id=ORCH_FLOW)).get(
            lease_id, {}
        )

    lease = await stack.until(lease_active)
    assert lease["kind"] == "session" and lease["active"] is True
    assert lease["orchestrator_id"] == ORCH_FLOW
    assert lease["metadata"] == {
        "session_id": sid,
        "edge_id": EDGE,
        "upstream_addr": IP_FLOW,
        "upstream_port": PORT,
    }
    assert parse_time(lease["expires_at"]) - parse_time(lease["last_seen_at"]) == timedelta(
        seconds=LEASE_DEFAULT_S
    )
    record = await orchestrator_view(stack, ORCH_FLOW)
    assert record["active_sessions"] == 1
    assert record["active_reason"] == "session" and record["active"] is True
    assert record["in_use"] is True
    assert record["last_session_upstream_addr"] == IP_FLOW
    assert record["last_session_edge_id"] == EDGE
    live = await sessions_view(stack, active_only="true", orchestrator_id=ORCH_FLOW)
    assert live[sid]["ended_at"] is None and live[sid]["orchestrator_id"] == ORCH_FLOW

    await asyncio.sleep(0.2)  # some connected time worth billing
    heartbeat = await post_event(stack, sid, "heartbeat", IP_FLOW)
    end = await post_event(stack, sid, "end", IP_FLOW)
    row = await stack.until(lambda: ended(stack, sid))
    assert row.end_trigger == "end"

    view = (await sessions_view(stack, orchestrator_id=ORCH_FLOW))[sid]
    started_at, ended_at = parse_time(view["started_at"]), parse_time(view["ended_at"])
    # Time comes from the ingress's receive stamps, not from the worker's clock.
    assert started_at == parse_time(start.body["received_at"])
    assert ended_at == parse_time(end.body["received_at"])
    assert parse_time(heartbeat.body["received_at"]) <= ended_at
    duration_ms = whole_ms(started_at, ended_at)
    assert duration_ms >= 200
    eth = expected_eth(duration_ms)
    assert Decimal(view["billed_eth"]) == eth
    assert view["billed_ms"] == duration_ms and view["heartbeat_count"] == 1

    [credit] = await stack.until(lambda: ledger_view(stack, ORCH_FLOW))
    assert Decimal(credit["amount"]) == eth
    assert credit["entry_key"] == f"session:{sid}:0:0"
    metadata = credit["metadata"]
    assert metadata["proof_hash"].startswith("sha256:")
    assert metadata["proof_hash"] == recipe_proof(metadata, ORCH_FLOW)
    assert metadata["proof_hash"] == view["last_credit_proof"]
    assert metadata["duration_ms"] == str(duration_ms)
    assert metadata["trigger"] == "end" and metadata["session_id"] == sid
    assert metadata["upstream_addr"] == IP_FLOW and metadata["upstream_port"] == PORT
    [entry] = await ledger_rows(stack.sessions, ORCH_FLOW)
    assert entry.amount_wei == duration_ms * WEI_PER_MS == int(eth * 10**18)
    assert entry.reason == "session_time" and entry.source_stream == "SESSIONS"

    assert lease_id not in await leases_view(stack, active_only="true")
    revoked = await lease_row(stack.sessions, lease_id)
    assert revoked is not None and revoked.revoked_at == ended_at
    after = await orchestrator_view(stack, ORCH_FLOW)
    assert after["active_sessions"] == 0 and after["active_reason"] != "session"
    assert sid not in await sessions_view(stack, active_only="true")


# -- 3. the same end five times ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("orchestrator_id", "ip", "how"),
    [
        (ORCH_KEYED, IP_KEYED, "idempotency-key"),
        (ORCH_EVENT_ID, IP_EVENT_ID, "event_id"),
        (ORCH_NO_KEY, IP_NO_KEY, "no key"),
    ],
)
async def test_the_same_end_posted_five_times_credits_once(
    stack: SessionStack, orchestrator_id: str, ip: str, how: str
) -> None:
    sid = f"five-ends-{orchestrator_id}"
    await post_event(stack, sid, "start", ip)
    await post_event(stack, sid, "heartbeat", ip)
    await asyncio.sleep(0.05)

    async def send_end() -> Answer:
        if how == "idempotency-key":
            return await post_event(stack, sid, "end", ip, key="edge-end-1")
        if how == "event_id":
            return await post_event(stack, sid, "end", ip, event_id="edge-end-1")
        return await post_event(stack, sid, "end", ip)

    first = await send_end()
    # Four retries: two one after the other, two at the same time.
    answers = [await send_end(), await send_end(), *await asyncio.gather(send_end(), send_end())]
    assert first.body["duplicate"] is False
    if how != "no key":
        assert all(a.body["duplicate"] is True for a in answers)
        assert all(a.body["event_key"] == first.body["event_key"] for a in answers)
        ends = [
            m
            for m in await read_stream(stack.js, subjects.session_event(sid))
            if json.loads(m.data)["event"] == "end"
        ]
        assert len(ends) == 1  # the retries were never stored

    await stack.until(lambda: all_applied(stack, sid))
    row = await session_row(stack.sessions, sid)
    assert row is not None and row.ended_at is not None and row.end_trigger == "end"
    assert row.ended_at == parse_time(first.body["received_at"])
    credits = await ledger_rows(stack.sessions, orchestrator_id)
    assert [c.entry_key for c in credits] == [f"session:{sid}:0:0"]
    duration_ms = whole_ms(row.started_at, row.ended_at)  # type: ignore[operator]
    assert credits[0].amount_wei == duration_ms * WEI_PER_MS
    assert row.billed_wei == duration_ms * WEI_PER_MS and row.segment_index == 1


# -- 5. idle close by a tick, then replay -------------------------------------------------------


async def test_idle_session_is_closed_by_a_tick_and_billed_to_its_last_event(
    stack: SessionStack,
) -> None:
    sid = "idle-1"
    # Event ids: without one, two heartbeats in the same second share the derived key and the
    # second is stored as a duplicate of the first.
    start = await post_event(stack, sid, "start", IP_IDLE, api="idle", event_id="e0")
    await asyncio.sleep(0.1)
    await post_event(stack, sid, "heartbeat", IP_IDLE, api="idle", event_id="e1")
    await asyncio.sleep(0.1)
    last = await post_event(stack, sid, "heartbeat", IP_IDLE, api="idle", event_id="e2")
    assert last.body["duplicate"] is False
    last_at = parse_time(last.body["received_at"])
    stored = [json.loads(m.data) for m in await read_stream(stack.js, subjects.session_event(sid))]
    assert [e["event"] for e in stored] == ["start", "heartbeat", "heartbeat"]
    assert parse_time(stored[-1]["received_at"]) == last_at

    row = await stack.until(lambda: ended(stack, sid), timeout_s=IDLE_API_IDLE_S + 8)
    assert row.end_trigger == "idle"
    assert row.ended_at == last_at
    assert row.started_at == parse_time(start.body["received_at"])
    assert row.heartbeat_count == 2
    duration_ms = whole_ms(row.started_at, last_at)  # type: ignore[arg-type]
    [entry] = await ledger_rows(stack.sessions, ORCH_IDLE)
    assert entry.entry_key == f"session:{sid}:0:0"
    assert entry.amount_wei == duration_ms * WEI_PER_MS
    metadata = entry.entry_metadata or {}
    assert metadata["trigger"] == "idle" and metadata["event"] == "tick"
    assert metadata["segment_end"].startswith(last_at.strftime("%Y-%m-%dT%H:%M:%S"))
    # The tick that closed it is a stored SESSIONS message, after the last event.
    tick_messages = await read_stream(stack.js, subjects.session_tick(row.partition))
    tick_seq = {m.metadata.sequence.stream: m for m in tick_messages}
    assert entry.source_seq in tick_seq
    assert parse_time(json.loads(tick_seq[entry.source_seq].data)["at"]) > last_at + timedelta(
        seconds=IDLE_API_IDLE_S
    )
    lease = await lease_row(stack.sessions, f"session:{sid}")
    assert lease is not None and lease.revoked_at == last_at
    assert (await orchestrator_view(stack, ORCH_IDLE))["active_sessions"] == 0


# -- 7. activity leases -----------------------------------------------------------------------


async def lease_call(stack: SessionStack, method: str, path: str, **body: Any) -> Answer:
    return await call(stack.http, method, stack.url(path), json=body if body else None)


async def test_activity_lease_lifecycle_and_clamps(stack: SessionStack) -> None:
    messages_before = await stream_count(stack.js)

    unknown = await lease_call(
        stack, "POST", "/api/activity/leases", orchestrator_id="orch-nobody", lease_seconds=60
    )
    assert unknown.status == 404 and unknown.body["detail"] == "Unknown orchestrator"
    too_short = await lease_call(
        stack, "POST", "/api/activity/leases", orchestrator_id=ORCH_LEASE, lease_seconds=10
    )
    # The request contract is the original's (30-86400): 10 s is refused, clearly, not clamped.
    assert too_short.status == 422 and "lease_seconds" in too_short.body["detail"]
    no_admin = await call(
        stack.http,
        "POST",
        stack.url("/api/activity/leases"),
        json={"orchestrator_id": ORCH_LEASE},
        headers={"Content-Type": "application/json"},
    )
    assert no_admin.status == 401
    assert await stream_count(stack.js) == messages_before  # refused: nothing published

    long = await lease_call(
        stack,
        "POST",
        "/api/activity/leases",
        orchestrator_id=ORCH_LEASE,
        upstream_addr=IP_LEASE,
        kind="workload",
        lease_seconds=86_400,
        metadata={"job": "render-1"},
    )
    assert long.status == 200, long.body
    assert long.body["applied"] is True
    assert long.body["lease_seconds"] == LEASE_MAX_S
    assert long.body["clamped"] is True and long.body["requested_lease_seconds"] == 86_400
    assert str(LEASE_MAX_S) in long.body["clamp_reason"]
    assert long.body["orchestrator_id"] == ORCH_LEASE and long.body["kind"] == "workload"
    assert long.body["metadata"] == {"job": "render-1"} and long.body["active"] is True
    issued_expiry = parse_time(long.body["expires_at"])
    assert issued_expiry - parse_time(long.body["last_seen_at"]) == timedelta(seconds=LEASE_MAX_S)
    lease_id = long.body["lease_id"]

    default = await lease_call(stack, "POST", "/api/activity/leases", orchestrator_id=ORCH_LEASE)
    assert default.status == 200, default.body
    assert default.body["lease_seconds"] == LEASE_DEFAULT_S and default.body["clamped"] is False
    exact = await lease_call(
        stack, "POST", "/api/activity/leases", orchestrator_id=ORCH_LEASE, lease_seconds=45
    )
    assert exact.body["lease_seconds"] == 45 and exact.body["clamped"] is False

    record = await orchestrator_view(stack, ORCH_LEASE)
    assert record["active_activity_leases"] == 3
    assert record["active_sessions"] == 0 and record["active_reason"] == "activity_lease"

    beat = await lease_call(
        stack,
        "POST",
        f"/api/activity/leases/{lease_id}/heartbeat",
        orchestrator_id=ORCH_LEASE,
        lease_seconds=1_000,
    )
    assert beat.status == 200, beat.body
    assert beat.body["lease_seconds"] == 1_000 and beat.body["clamped"] is False
    beat_seen = parse_time(beat.body["last_seen_at"])
    assert beat_seen > parse_time(long.body["last_seen_at"])
    assert parse_time(beat.body["expires_at"]) == beat_seen + timedelta(seconds=1_000)
    over = await lease_call(
        stack,
        "POST",
        f"/api/activity/leases/{lease_id}/heartbeat",
        orchestrator_id=ORCH_LEASE,
        lease_seconds=86_400,
    )
    assert over.status == 200 and over.body["lease_seconds"] == LEASE_MAX_S
    assert over.body["clamped"] is True
    assert parse_time(over.body["expires_at"]) > parse_time(beat.body["expires_at"])

    theirs = await lease_call(
        stack, "POST", f"/api/activity/leases/{lease_id}/heartbeat", orchestrator_id=ORCH_OTHER
    )
    assert theirs.status == 404
    missing = await lease_call(
        stack, "POST", "/api/activity/leases/no-such-lease/heartbeat", orchestrator_id=ORCH_LEASE
    )
    assert missing.status == 404
    row = await lease_row(stack.sessions, lease_id)
    assert row is not None and row.orchestrator_id == ORCH_LEASE
    assert row.expires_at == parse_time(over.body["expires_at"])  # someone else's beat: no effect

    assert lease_id in await leases_view(stack, active_only="true", orchestrator_id=ORCH_LEASE)
    revoked = await call(stack.http, "DELETE", stack.url(f"/api/activity/leases/{lease_id}"))
    assert revoked.status == 200 and revoked.body == {
        "ok": True,
        "lease_id": lease_id,
        "applied": True,
    }
    active = await leases_view(stack, active_only="true", orchestrator_id=ORCH_LEASE)
    assert lease_id not in active and len(active) == 2
    listed = await leases_view(stack, orchestrator_id=ORCH_LEASE)
    assert listed[lease_id]["revoked_at"] is not None and listed[lease_id]["active"] is False
    after = await lease_call(
        stack, "POST", f"/api/activity/leases/{lease_id}/heartbeat", orchestrator_id=ORCH_LEASE
    )
    assert after.status == 404
    gone = await call(stack.http, "DELETE", stack.url("/api/activity/leases/no-such-lease"))
    assert gone.status == 404
    for other in active:
        answer = await call(stack.http, "DELETE", stack.url(f"/api/activity/leases/{other}"))
        assert answer.status == 200
    record = await orchestrator_view(stack, ORCH_LEASE)
    assert record["active_activity_leases"] == 0 and record["active_reason"] != "activity_lease"


# -- 5, continued: replay (runs last: it needs every session of the module ended) ------------

SESSION_FIELDS = (
    "session_id",
    "orchestrator_id",
    "started_at",
    "ended_at",
    "end_trigger",
    "billed_ms",
    "billed_wei",
    "segment_index",
    "run",
    "metered_ms",
    "last_credit_proof",
)
ENTRY_FIELDS = (
    "entry_key",
    "orchestrator_id",
    "amount_wei",
    "balance_after_wei",
    "reason",
    "source_stream",
    "source_seq",
    "source_key",
    "entry_metadata",
    "occurred_at",
)


async def snapshot(url: str) -> tuple[dict[str, tuple], dict[str, tuple]]:
    engine = make_engine(url, writer=False)
    try:
        async with make_sessionmaker(engine)() as db:
            sessions = (await db.execute(select(Session))).scalars()
            entries = (await db.execute(select(LedgerEntry))).scalars()
            return (
                {s.session_id: tuple(getattr(s, f) for f in SESSION_FIELDS) for s in sessions},
                {e.entry_key: tuple(getattr(e, f) for f in ENTRY_FIELDS) for e in entries},
            )
    finally:
        await engine.dispose()


async def test_replay_into_an_empty_database_gives_identical_sessions_and_credits(
    stack: SessionStack, tmp_path: Path
) -> None:
    async def everything_ended() -> bool:
        async with stack.sessions() as db:
            rows = list((await db.execute(select(Session))).scalars())
        return bool(rows) and all(r.ended_at is not None for r in rows)

    # A session of its own, so the test stands alone; run with the module it also replays the
    # other tests' sessions (the idle one included), credits and leases.
    await post_event(stack, "replay-1", "start", IP_FLOW, event_id="r0")
    await post_event(stack, "replay-1", "end", IP_FLOW, event_id="r1")
    await stack.until(lambda: ended(stack, "replay-1"))
    await stack.until(everything_ended, timeout_s=MAIN_IDLE_S)
    live_sessions, live_entries = await snapshot(stack.database.url)
    assert live_sessions["replay-1"][SESSION_FIELDS.index("end_trigger")] == "end"
    assert any(key.startswith("session:replay-1:") for key in live_entries)

    target = f"sqlite+aiosqlite:///{tmp_path / 'replayed.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAYMENTS_")}
    env.update(
        PAYMENTS_NATS_URL=stack.nats.url,
        PAYMENTS_NATS_OPS_PASSWORD=stack.nats.passwords.ops,
        PAYMENTS_DATABASE_URL=stack.database.url,
    )
    payments = str(Path(sys.executable).parent / "payments")
    done = await asyncio.to_thread(
        subprocess.run,
        [payments, "replay", "--into", target],
        env=env,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert any(line.startswith("sessions:") for line in lines), done.stdout
    assert all(line.endswith(" 0 dead-lettered") for line in lines), done.stdout

    replayed_sessions, replayed_entries = await snapshot(target)
    assert replayed_sessions == live_sessions
    assert replayed_entries == live_entries
