"""The ledger worker killed at its fault points, as real processes (exit code 86, like SIGKILL):

- between the commit and the acks: the redelivered messages find their inbox rows and credit
  nothing a second time;
- between the commit and the LEDGER publish: the outbox sweeper of the restarted worker publishes
  every entry, and the stream ends with exactly one message per entry.

The ledger consumer's ack_wait is shortened to 2 s here so the redelivery comes in seconds.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from contracts.events import EVENT_KEY_HEADER, MSG_ID_HEADER
from contracts.streams import WORKLOADS
from shared.db.repositories import outbox
from shared.embedded_nats import free_port
from shared.faults import FAULT_EXIT_CODE
from tests.conftest import database_backends
from tests.ledger_stack import (
    ADMIN,
    LEDGER_CONSUMER,
    LedgerStack,
    assert_ledger_consistent,
    balances,
    call,
    dead_letters,
    entries,
    ledger_messages,
    ledger_stack,
    orchestrator,
    processed_count,
    processed_metric,
    stream_count,
    wait_until,
)

ORCHESTRATORS = [orchestrator("orch-f1", "1"), orchestrator("orch-f2", "2")]
WEI_PER_MS = 5_353_596_000_000 // 60_000
ACK_WAIT_S = 2.0
# The sweeper takes rows left unpublished for 5 s, every 2 s; the restart adds a few seconds.
SWEEP_BOUND_S = 15.0


async def post_time_workload(stack: LedgerStack, workload_id: str, orchestrator_id: str) -> None:
    answer = await call(
        stack.http,
        "POST",
        f"{stack.base}/api/workloads/time",
        json={
            "workload_id": workload_id,
            "orchestrator_id": orchestrator_id,
            "duration_ms": 60_000 + int(workload_id.rsplit("-", 1)[-1]),
            "artifact_hash": f"sha256:{workload_id}",
        },
    )
    assert answer.status == 202, answer.body


def credit_of(workload_id: str) -> int:
    return (60_000 + int(workload_id.rsplit("-", 1)[-1])) * WEI_PER_MS


async def drained(stack: LedgerStack) -> bool:
    info = await stack.js.consumer_info(WORKLOADS.name, LEDGER_CONSUMER)
    return info.num_pending == 0 and info.num_ack_pending == 0


async def crash(stack: LedgerStack, point: str) -> None:
    """Wait for the armed ledger worker to hit `point` and exit with the fault exit code."""
    worker = stack.ledger[-1]
    code = await asyncio.to_thread(worker.wait_exit, 20.0)
    assert code == FAULT_EXIT_CODE, worker.log_text()[-3000:]
    assert f"fault point {point} reached" in worker.log_text()


async def pending_outbox(stack: LedgerStack) -> int:
    async with stack.sessions() as session:
        return await outbox.pending_count(session)


async def assert_each_credited_once(stack: LedgerStack, workload_ids: list[str]) -> None:
    rows = await entries(stack.sessions)
    assert sorted(r.entry_key for r in rows) == sorted(f"workload:{w}" for w in workload_ids)
    by_key = {r.entry_key: r for r in rows}
    for workload_id in workload_ids:
        assert by_key[f"workload:{workload_id}"].amount_wei == credit_of(workload_id)
    stored = await balances(stack.sessions)
    assert_ledger_consistent(rows, stored)
    assert sum(stored.values()) == sum(credit_of(w) for w in workload_ids)
    assert await processed_count(stack.sessions) == len(workload_ids)
    assert await dead_letters(stack.sessions) == []


async def assert_ledger_stream_matches(stack: LedgerStack) -> None:
    """Exactly one LEDGER message per entry: same keys, none missing, none doubled."""
    rows = await entries(stack.sessions)

    async def complete() -> bool:
        return await stream_count(stack.js, "LEDGER") >= len(rows) and not await pending_outbox(
            stack
        )

    await wait_until(complete, SWEEP_BOUND_S, stack)
    messages = await ledger_messages(stack.js)
    msg_ids = [m.headers[MSG_ID_HEADER] for m in messages]
    keys = [json.loads(m.data)["entry_key"] for m in messages]
    assert len(msg_ids) == len(set(msg_ids)) == len(rows), msg_ids
    assert sorted(keys) == sorted(r.entry_key for r in rows)
    assert sorted(msg_ids) == sorted(f"ledger:{r.entry_key}" for r in rows)
    assert all(m.headers[EVENT_KEY_HEADER] == m.headers[MSG_ID_HEADER] for m in messages)
    for message in messages:
        body = json.loads(message.data)
        assert message.subject == f"ledger.entries.{body['orchestrator_id']}"


@pytest.mark.parametrize("backend", database_backends())
async def test_killed_between_commit_and_ack_credits_each_workload_once(
    backend: str, tmp_path: Path
) -> None:
    async with ledger_stack(
        backend, tmp_path, ORCHESTRATORS, start_ledger=False, ack_wait_s=ACK_WAIT_S
    ) as stack:
        point = f"{LEDGER_CONSUMER}:after_commit_before_ack"
        await stack.start_ledger(PAYMENTS_FAULT_POINTS=point)
        first = [f"wl-ack-{i}" for i in range(6)]
        await asyncio.gather(
            *(
                post_time_workload(stack, w, ORCHESTRATORS[i % 2]["orchestrator_id"])
                for i, w in enumerate(first)
            )
        )
        await crash(stack, point)
        committed = await entries(stack.sessions)
        assert committed, "the crash came after a commit: some credits are stored"
        applied_before_crash = await processed_count(stack.sessions)
        info = await stack.js.consumer_info(WORKLOADS.name, LEDGER_CONSUMER)
        assert info.num_ack_pending + info.num_pending == len(first)  # nothing was acked

        # More work arrives while the worker is down.
        second = [f"wl-ack-{i}" for i in range(6, 9)]
        for i, workload_id in enumerate(second):
            await post_time_workload(stack, workload_id, ORCHESTRATORS[i % 2]["orchestrator_id"])

        metrics = free_port()
        await stack.start_ledger(copy=1, PAYMENTS_METRICS_PORT=str(metrics))
        await wait_until(lambda: drained(stack), 20.0, stack)
        # The crashed batch came back and was recognised: acked as duplicates, applied never.
        assert await processed_metric(metrics, "duplicate") == applied_before_crash
        assert await processed_metric(metrics, "applied") == len(first + second) - (
            applied_before_crash
        )
        await assert_each_credited_once(stack, first + second)
        # The crash also came before the LEDGER publish: the sweeper makes up for it.
        await assert_ledger_stream_matches(stack)
        assert "dead-lettered" not in stack.ledger[-1].log_text()


@pytest.mark.parametrize("backend", database_backends())
async def test_killed_between_commit_and_ledger_publish_loses_and_doubles_nothing(
    backend: str, tmp_path: Path
) -> None:
    async with ledger_stack(
        backend, tmp_path, ORCHESTRATORS, start_ledger=False, ack_wait_s=ACK_WAIT_S
    ) as stack:
        point = "ledger:after_commit_before_publish"
        await stack.start_ledger(PAYMENTS_FAULT_POINTS=point)
        workload_ids = [f"wl-pub-{i}" for i in range(5)]
        await asyncio.gather(
            *(
                post_time_workload(stack, w, ORCHESTRATORS[i % 2]["orchestrator_id"])
                for i, w in enumerate(workload_ids)
            )
        )
        adjustment = await call(
            stack.http,
            "POST",
            f"{stack.base}/api/ledger/adjustments",
            json={"orchestrator_id": "orch-f2", "amount_eth": "-0.00001"},
            headers={**ADMIN, "Prefer": "wait=0", "Idempotency-Key": "fault-adjust"},
        )
        assert adjustment.status == 202, adjustment.body
        await crash(stack, point)
        stored = await entries(stack.sessions)
        assert stored, "the crash came after a commit: some entries are stored"
        assert await stream_count(stack.js, "LEDGER") == 0
        assert await pending_outbox(stack) == len(stored)
        applied_before_crash = await processed_count(stack.sessions)

        metrics = free_port()
        await stack.start_ledger(copy=1, PAYMENTS_METRICS_PORT=str(metrics))
        await wait_until(lambda: drained(stack), 20.0, stack)
        rows = await entries(stack.sessions)
        assert len(rows) == len(workload_ids) + 1
        assert_ledger_consistent(rows, await balances(stack.sessions))
        assert await processed_count(stack.sessions) == len(workload_ids) + 1
        # The relay publishes in the background, so acks sent before the crash may or may not
        # have left the process: a redelivered message is a duplicate, never a second credit.
        assert 0 <= await processed_metric(metrics, "duplicate") <= applied_before_crash
        assert await dead_letters(stack.sessions) == []
        await assert_ledger_stream_matches(stack)
        # One more sweep interval: still one message per entry.
        await asyncio.sleep(2.5)
        assert await stream_count(stack.js, "LEDGER") == len(rows)
        assert await pending_outbox(stack) == 0
