"""The ledger through the whole pipeline: HTTP -> WORKLOADS stream -> ledger worker -> ledger
entries, balances and the LEDGER stream -> HTTP reads.

One stack (nats-server, database, registry worker, ledger worker, api) per database backend is
shared by the module; every test works on its own orchestrator, so their effects do not mix.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import pytest_asyncio

from contracts.events import MSG_ID_HEADER
from contracts.streams import WORKLOADS
from tests.conftest import database_backends
from tests.ledger_stack import (
    LEDGER_CONSUMER,
    LedgerStack,
    assert_ledger_consistent,
    balances,
    call,
    entries,
    ledger_messages,
    ledger_stack,
    orchestrator,
    processed_count,
    stream_count,
    wait_until,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

ORCH_TIME = "orch-time"
ORCH_BURST = "orch-burst"
ORCH_FIXED = "orch-fixed"
ORCH_ADJUST = "orch-adjust"
ORCHESTRATORS = [
    orchestrator(ORCH_TIME, "a"),
    orchestrator(ORCH_BURST, "b"),
    orchestrator(ORCH_FIXED, "c"),
    orchestrator(ORCH_ADJUST, "d"),
]
# The default rate, 0.000005353596 ETH per minute, is 89_226_600 wei per millisecond.
WEI_PER_MS = 5_353_596_000_000 // 60_000
ORIGINAL_TIME_METADATA = {
    "workload_id",
    "plan_id",
    "run_id",
    "status",
    "artifact_uri",
    "artifact_hash",
    "duration_ms",
    "credit_eth_per_minute",
}


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=database_backends())
async def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[LedgerStack]:
    tmp: Path = tmp_path_factory.mktemp(f"ledger-flow-{request.param}")
    async with ledger_stack(request.param, tmp, ORCHESTRATORS) as running:
        yield running


async def consumer_drained(stack: LedgerStack) -> bool:
    info = await stack.js.consumer_info(WORKLOADS.name, LEDGER_CONSUMER)
    return info.num_pending == 0 and info.num_ack_pending == 0


async def events_of(stack: LedgerStack, orchestrator_id: str, **query: str) -> list[dict]:
    answer = await call(
        stack.http,
        "GET",
        f"{stack.base}/api/ledger/events",
        params={"orchestrator_id": orchestrator_id, **query},
    )
    assert answer.status == 200, answer.body
    return answer.body["events"]


async def workloads_of(stack: LedgerStack, **query: str) -> list[dict]:
    answer = await call(stack.http, "GET", f"{stack.base}/api/workloads", params=query)
    assert answer.status == 200, answer.body
    return answer.body["workloads"]


async def test_time_workload_credits_exact_amount_visible_within_a_second(
    stack: LedgerStack,
) -> None:
    body = {
        "workload_id": "wl-time-1",
        "orchestrator_id": ORCH_TIME,
        "duration_ms": 180_000,
        "plan_id": "plan-a",
        "run_id": "run-1",
        "artifact_uri": "s3://bucket/run-1.webm",
        "artifact_hash": "sha256:run-1",
    }
    answer = await call(stack.http, "POST", f"{stack.base}/api/workloads/time", json=body)
    answered = time.monotonic()
    assert answer.status in (200, 202), answer.body
    assert answer.body["payout_amount_eth"] == "0.000016060788"
    assert answer.body["workload_id"] == "wl-time-1"

    async def credited() -> list[dict]:
        return [e for e in await events_of(stack, ORCH_TIME) if e["reason"] == "workload_time"]

    async def in_stats() -> dict:
        stats = await call(
            stack.http, "GET", f"{stack.base}/api/orchestrators/{ORCH_TIME}/stats?days=7"
        )
        assert stats.status == 200, stats.body
        return stats.body if stats.body["total_workload_eth"] != "0" else {}

    (event,) = await wait_until(credited, 1.0, stack)
    stats = await wait_until(in_stats, max(0.05, 1.0 - (time.monotonic() - answered)), stack)
    assert time.monotonic() - answered <= 1.0

    assert event["amount"] == event["delta"] == event["balance"] == "0.000016060788"
    assert event["event"] == "credit"
    assert event["entry_key"] == "workload:wl-time-1"
    assert event["source"]["stream"] == WORKLOADS.name
    assert set(event["metadata"]) == ORIGINAL_TIME_METADATA
    assert event["metadata"] == {
        "workload_id": "wl-time-1",
        "plan_id": "plan-a",
        "run_id": "run-1",
        "status": "verified",
        "artifact_uri": "s3://bucket/run-1.webm",
        "artifact_hash": "sha256:run-1",
        "duration_ms": "180000",
        "credit_eth_per_minute": "0.000005353596",
    }
    assert stats["balance_eth"] == "0.000016060788"
    assert stats["total_workload_eth"] == "0.000016060788"
    assert stats["total_credits_eth"] == "0.000016060788"
    assert stats["total_net_delta_eth"] == "0.000016060788"
    assert stats["days"] == 7 and len(stats["daily"]) == 7
    assert stats["daily"][-1]["date"] == datetime.now(UTC).date().isoformat()
    assert stats["daily"][-1]["workload_eth"] == "0.000016060788"
    assert all(day["workload_eth"] == "0" for day in stats["daily"][:-1])

    rows = await entries(stack.sessions, ORCH_TIME)
    assert [(r.entry_key, r.amount_wei, r.reason) for r in rows] == [
        ("workload:wl-time-1", 16_060_788_000_000, "workload_time")
    ]
    assert (await balances(stack.sessions))[ORCH_TIME] == 16_060_788_000_000

    # The same body again: the stored record, credited.
    again = await call(stack.http, "POST", f"{stack.base}/api/workloads/time", json=body)
    assert again.status == 200, again.body
    assert again.body["credited"] is True
    assert again.body["payout_amount_eth"] == "0.000016060788"

    # A different body under the same workload id: 409, nothing published, nothing credited.
    stored_before = await stream_count(stack.js, WORKLOADS.name)
    conflict = await call(
        stack.http,
        "POST",
        f"{stack.base}/api/workloads/time",
        json={**body, "duration_ms": 60_000},
    )
    assert conflict.status == 409, conflict.body
    assert await stream_count(stack.js, WORKLOADS.name) == stored_before
    await wait_until(lambda: consumer_drained(stack), 5.0, stack)
    assert [r.entry_key for r in await entries(stack.sessions, ORCH_TIME)] == ["workload:wl-time-1"]
    assert (await balances(stack.sessions))[ORCH_TIME] == 16_060_788_000_000

    # Downstream readers got the entry exactly once, keyed by the entry.
    async def published() -> list:
        messages = await ledger_messages(stack.js)
        return [m for m in messages if m.subject == f"ledger.entries.{ORCH_TIME}"]

    (message,) = await wait_until(published, 5.0, stack)
    assert message.headers[MSG_ID_HEADER] == "ledger:workload:wl-time-1"


async def test_same_workload_posted_fifty_times_at_once_credits_once(stack: LedgerStack) -> None:
    body = {
        "workload_id": "wl-burst-1",
        "orchestrator_id": ORCH_BURST,
        "duration_ms": 123_457,
        "artifact_hash": "sha256:burst",
    }
    answers = await asyncio.gather(
        *(
            call(stack.http, "POST", f"{stack.base}/api/workloads/time", json=body)
            for _ in range(50)
        )
    )
    assert {a.status for a in answers} <= {200, 202}, [a.body for a in answers]
    one_credit = 123_457 * WEI_PER_MS

    async def credited() -> list:
        return await entries(stack.sessions, ORCH_BURST)

    await wait_until(credited, 5.0, stack)
    await wait_until(lambda: consumer_drained(stack), 5.0, stack)
    rows = await entries(stack.sessions, ORCH_BURST)
    assert [(r.entry_key, r.amount_wei) for r in rows] == [("workload:wl-burst-1", one_credit)]
    assert (await balances(stack.sessions))[ORCH_BURST] == one_credit
    # JetStream kept one message, the inbox one key, LEDGER one entry message.
    assert await stream_count(stack.js, WORKLOADS.name, f"workloads.time.{ORCH_BURST}") == 1
    assert await processed_count(stack.sessions, "workload_time:wl-burst-1:") == 1

    async def published() -> int:
        return await stream_count(stack.js, "LEDGER", f"ledger.entries.{ORCH_BURST}")

    assert await wait_until(published, 5.0, stack) == 1
    late = await call(stack.http, "POST", f"{stack.base}/api/workloads/time", json=body)
    assert late.status == 200 and late.body["credited"] is True


async def test_fixed_price_workload_credits_once_when_verified_with_an_artifact(
    stack: LedgerStack,
) -> None:
    started = datetime.now(UTC) - timedelta(seconds=5)
    first = {
        "workload_id": "wl-fixed-1",
        "orchestrator_id": ORCH_FIXED,
        "payout_amount_eth": "0.5",
        "plan_id": "plan-f",
        "run_id": "run-f",
        "artifact_uri": "s3://bucket/wl-fixed-1.txt",  # not a video: no artifact yet
    }
    second = {
        "workload_id": "wl-fixed-2",
        "orchestrator_id": ORCH_FIXED,
        "payout_amount_eth": "0.25",
        "artifact_hash": "sha256:fixed-2",
    }
    for body in (first, second):
        answer = await call(stack.http, "POST", f"{stack.base}/api/workloads", json=body)
        assert answer.status in (200, 202), answer.body
        assert answer.body["status"] == "pending" and answer.body["credited"] is False

    async def both_stored() -> list[dict]:
        found = await workloads_of(stack, orchestrator_id=ORCH_FIXED)
        return found if len(found) == 2 else []

    stored = await wait_until(both_stored, 5.0, stack)
    assert {w["status"] for w in stored} == {"pending"}
    assert await entries(stack.sessions, ORCH_FIXED) == []

    async def patch(workload_id: str, document: dict) -> None:
        answer = await call(
            stack.http, "PATCH", f"{stack.base}/api/workloads/{workload_id}", json=document
        )
        assert answer.status in (200, 202), answer.body

    async def shows(workload_id: str, **fields: object) -> dict:
        for record in await workloads_of(stack, orchestrator_id=ORCH_FIXED):
            if record["workload_id"] == workload_id and all(
                record[k] == v for k, v in fields.items()
            ):
                return record
        return {}

    # Verified, but its only artifact field is not a video and it has no hash: no credit.
    await patch("wl-fixed-1", {"status": "verified"})
    record = await wait_until(lambda: shows("wl-fixed-1", status="verified"), 5.0, stack)
    assert record["credited"] is False
    assert await entries(stack.sessions, ORCH_FIXED) == []

    # An artifact hash makes it creditable: one credit, reason workload, the payout amount.
    await patch("wl-fixed-1", {"artifact_hash": "sha256:fixed-1"})
    record = await wait_until(lambda: shows("wl-fixed-1", credited=True), 5.0, stack)
    assert record["payout_amount_eth"] == "0.5"
    (entry,) = await entries(stack.sessions, ORCH_FIXED)
    assert (entry.entry_key, entry.amount_wei, entry.reason) == (
        "workload:wl-fixed-1",
        5 * 10**17,
        "workload",
    )
    assert entry.entry_metadata == {
        "workload_id": "wl-fixed-1",
        "plan_id": "plan-f",
        "run_id": "run-f",
        "status": "verified",
        "artifact_uri": "s3://bucket/wl-fixed-1.txt",
        "artifact_hash": "sha256:fixed-1",
    }

    # Paid later: the status moves, the ledger does not.
    await patch("wl-fixed-1", {"status": "paid", "tx_hash": "0x" + "ab" * 32})
    await wait_until(lambda: shows("wl-fixed-1", status="paid"), 5.0, stack)
    await wait_until(lambda: consumer_drained(stack), 5.0, stack)
    assert [e.entry_key for e in await entries(stack.sessions, ORCH_FIXED)] == [
        "workload:wl-fixed-1"
    ]
    assert (await balances(stack.sessions))[ORCH_FIXED] == 5 * 10**17
    events = await events_of(stack, ORCH_FIXED)
    assert [(e["reason"], e["amount"]) for e in events] == [("workload", "0.5")]

    # PATCH errors.
    bad = await call(
        stack.http, "PATCH", f"{stack.base}/api/workloads/wl-fixed-2", json={"status": "done"}
    )
    assert bad.status == 422, bad.body
    missing = await call(
        stack.http, "PATCH", f"{stack.base}/api/workloads/wl-nope", json={"status": "paid"}
    )
    assert missing.status == 404, missing.body

    # Filters.
    since = started.strftime("%Y-%m-%dT%H:%M:%SZ")
    until = (datetime.now(UTC) + timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    future = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    paid = await workloads_of(stack, orchestrator_id=ORCH_FIXED, status="paid")
    assert [w["workload_id"] for w in paid] == ["wl-fixed-1"]
    pending = await workloads_of(stack, orchestrator_id=ORCH_FIXED, status="pending")
    assert [w["workload_id"] for w in pending] == ["wl-fixed-2"]
    window = await workloads_of(stack, orchestrator_id=ORCH_FIXED, since=since, until=until)
    # Newest first.
    assert [w["workload_id"] for w in window] == ["wl-fixed-2", "wl-fixed-1"]
    assert await workloads_of(stack, orchestrator_id=ORCH_FIXED, since=future) == []
    assert await workloads_of(stack, orchestrator_id=ORCH_FIXED, until=since) == []
    other = await workloads_of(stack, orchestrator_id=ORCH_ADJUST)
    assert other == []
    for query, status in (
        ({"status": "bogus"}, 400),
        ({"since": "yesterday"}, 400),
        ({"until": "2024-13-45T00:00:00Z"}, 400),
    ):
        answer = await call(stack.http, "GET", f"{stack.base}/api/workloads", params=query)
        assert answer.status == status, (query, answer.body)
    for limit in ("0", "501"):
        answer = await call(
            stack.http, "GET", f"{stack.base}/api/workloads", params={"limit": limit}
        )
        assert 400 <= answer.status < 500, (limit, answer.body)

    summary = await call(
        stack.http,
        "GET",
        f"{stack.base}/api/workloads/summary",
        params={"since": since, "until": until},
    )
    assert summary.status == 200, summary.body
    mine = [o for o in summary.body["orchestrators"] if o["orchestrator_id"] == ORCH_FIXED]
    assert mine == [
        {"orchestrator_id": ORCH_FIXED, "workloads": 2, "earned_eth": "0.5", "pending_eth": "0.25"}
    ]
    later = await call(
        stack.http, "GET", f"{stack.base}/api/workloads/summary", params={"since": future}
    )
    assert later.status == 200
    assert not [o for o in later.body["orchestrators"] if o["orchestrator_id"] == ORCH_FIXED]
    bad_summary = await call(
        stack.http, "GET", f"{stack.base}/api/workloads/summary", params={"since": "x"}
    )
    assert bad_summary.status == 400, bad_summary.body


async def test_adjustments_and_ledger_event_listing(stack: LedgerStack) -> None:
    url = f"{stack.base}/api/ledger/adjustments"
    plus = await call(
        stack.http,
        "POST",
        url,
        json={
            "orchestrator_id": ORCH_ADJUST,
            "amount_eth": "0.25",
            "reference_workload_id": "wl-ref",
            "notes": "bonus",
        },
    )
    assert plus.status == 200, plus.body
    assert plus.body["balance_eth"] == "0.25"
    assert plus.body["delta_eth"] == "0.25"
    assert plus.body["reason"] == "adjustment"
    assert plus.body["reference_workload_id"] == "wl-ref" and plus.body["notes"] == "bonus"

    minus = await call(
        stack.http,
        "POST",
        url,
        json={"orchestrator_id": ORCH_ADJUST, "amount_eth": "-0.1", "reason": "correction"},
    )
    assert minus.status == 200, minus.body
    assert minus.body["balance_eth"] == "0.15"
    assert minus.body["delta_eth"] == "-0.1"
    assert minus.body["reason"] == "correction"

    for document, status in (
        ({"orchestrator_id": ORCH_ADJUST, "amount_eth": "0"}, 422),
        ({"orchestrator_id": ORCH_ADJUST, "amount_eth": "-0.000"}, 422),
        ({"orchestrator_id": "orch-unknown", "amount_eth": "1"}, 404),
    ):
        answer = await call(stack.http, "POST", url, json=document)
        assert answer.status == status, (document, answer.body)
    unauthorised = await call(
        stack.http,
        "POST",
        url,
        json={"orchestrator_id": ORCH_ADJUST, "amount_eth": "1"},
        headers={"Content-Type": "application/json"},
    )
    assert unauthorised.status in (401, 403), unauthorised.body

    keyed = {"orchestrator_id": ORCH_ADJUST, "amount_eth": "1", "notes": "keyed"}
    repeated = [
        await call(
            stack.http,
            "POST",
            url,
            json=keyed,
            headers={
                "Content-Type": "application/json",
                "X-Admin-Token": "test-admin-token",
                "Idempotency-Key": "adjust-once-1",
            },
        )
        for _ in range(5)
    ]
    assert [a.status for a in repeated] == [200] * 5, [a.body for a in repeated]
    assert {a.body["balance_eth"] for a in repeated} == {"1.15"}
    await wait_until(lambda: consumer_drained(stack), 5.0, stack)
    rows = await entries(stack.sessions, ORCH_ADJUST)
    assert [(r.amount_wei, r.reason) for r in rows] == [
        (25 * 10**16, "adjustment"),
        (-(10**17), "correction"),
        (10**18, "adjustment"),
    ]
    assert rows[2].entry_key == "adjustment:adjustment:orch-adjust:key:adjust-once-1"
    assert rows[0].entry_metadata == {"reference_workload_id": "wl-ref", "notes": "bonus"}
    assert (await balances(stack.sessions))[ORCH_ADJUST] == 115 * 10**16

    # Newest first, filtered by orchestrator, bounded by limit.
    listed = await events_of(stack, ORCH_ADJUST)
    assert [e["amount"] for e in listed] == ["1", "-0.1", "0.25"]
    assert [e["balance"] for e in listed] == ["1.15", "0.15", "0.25"]
    assert {e["orchestrator_id"] for e in listed} == {ORCH_ADJUST}
    ids = [e["id"] for e in listed]
    assert ids == sorted(ids, reverse=True)
    assert [e["amount"] for e in await events_of(stack, ORCH_ADJUST, limit="1")] == ["1"]
    everything = await call(stack.http, "GET", f"{stack.base}/api/ledger/events")
    assert everything.status == 200
    all_ids = [e["id"] for e in everything.body["events"]]
    assert all_ids == sorted(all_ids, reverse=True)
    assert len({e["orchestrator_id"] for e in everything.body["events"]}) >= 2
    for limit, status in (("0", 422), ("1001", 422), ("many", 400)):
        answer = await call(
            stack.http, "GET", f"{stack.base}/api/ledger/events", params={"limit": limit}
        )
        assert answer.status == status, (limit, answer.body)
    assert len(await events_of(stack, ORCH_ADJUST, limit="1000")) == 3


async def test_every_entry_is_consistent_and_published_once(stack: LedgerStack) -> None:
    """After the tests above: whatever they did, the ledger adds up and the LEDGER
    stream holds exactly one message per entry."""
    await wait_until(lambda: consumer_drained(stack), 5.0, stack)
    rows = await entries(stack.sessions)
    assert_ledger_consistent(rows, await balances(stack.sessions))

    async def all_published() -> list:
        messages = await ledger_messages(stack.js)
        return messages if len(messages) >= len(rows) else []

    messages = await wait_until(all_published, 10.0, stack)
    ids = [m.headers[MSG_ID_HEADER] for m in messages]
    assert sorted(ids) == sorted(f"ledger:{r.entry_key}" for r in rows)


async def test_amounts_no_ledger_entry_can_hold_are_refused_and_change_nothing(
    stack: LedgerStack,
) -> None:
    """Below one wei, or beyond a uint256 (NUMERIC(78, 0) on PostgreSQL): a clear 422 at the
    edge, never a 500 and never an event that the ledger worker cannot store."""
    published_before = await stream_count(stack.js, WORKLOADS.name)
    huge = "1" + "0" * 60  # 10**78 wei
    bad = [
        ("/api/ledger/adjustments", {"orchestrator_id": ORCH_ADJUST, "amount_eth": huge}),
        ("/api/ledger/adjustments", {"orchestrator_id": ORCH_ADJUST, "amount_eth": "-" + huge}),
        ("/api/ledger/adjustments", {"orchestrator_id": ORCH_ADJUST, "amount_eth": "1e-19"}),
        (
            "/api/workloads",
            {
                "workload_id": "wl-tiny",
                "orchestrator_id": ORCH_FIXED,
                "payout_amount_eth": "0.0000000000000000001",
                "artifact_hash": "sha256:tiny",
            },
        ),
        (
            "/api/workloads",
            {
                "workload_id": "wl-huge",
                "orchestrator_id": ORCH_FIXED,
                "payout_amount_eth": "1e80",
                "artifact_hash": "sha256:huge",
            },
        ),
    ]
    for path, document in bad:
        answer = await call(stack.http, "POST", f"{stack.base}{path}", json=document)
        assert answer.status == 422, (document, answer.status, answer.body)
        assert "wei" in answer.body["detail"] or "large" in answer.body["detail"]
    assert await stream_count(stack.js, WORKLOADS.name) == published_before
