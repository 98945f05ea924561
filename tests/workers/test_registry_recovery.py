"""Crash and outage recovery, each on a stack of its own (they kill or stop parts of it).

- The registry worker killed at the fault point between commit and ack: after a restart every
  report is applied exactly once and nothing is missing (guarantee 2, commit-then-ack).
- NATS stopped and started again on the same port and store: the ingress answers 503 with
  Retry-After meanwhile, and every report accepted before the outage is still stored and applied
  (guarantee 1, accepted means stored).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from contracts import subjects
from contracts.events import HealthReportV1
from contracts.streams import HEALTH
from shared.embedded_nats import free_port
from shared.faults import FAULT_EXIT_CODE, FAULT_POINTS_ENV
from tests.e2e import (
    BACKENDS,
    HEALTH_CONSUMER,
    HEALTHY,
    Stack,
    call,
    consumer_drained,
    dead_letters,
    inbox_rows,
    orchestrator,
    orchestrator_row,
    post_health,
    processed_counter,
    running_stack,
    start_processes,
    stream_count,
)
from tests.harness import headers, wait_for, worker_process

ORCH_ID = "orch-1"
KEY_PREFIX = f"health:{ORCH_ID}:key:"
FAULT = f"{HEALTH_CONSUMER}:after_commit_before_ack"
# The crashed worker's batch comes back after ack_wait; shortened on this stack's durable only.
SHORT_ACK_WAIT_S = 3.0


@pytest_asyncio.fixture(params=BACKENDS)
async def stack(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Stack]:
    async with running_stack(
        request.param, tmp_path, bootstrap=[orchestrator(ORCH_ID, "1")], start_workers=False
    ) as stack:
        yield stack


async def latest_received_at(stack: Stack, seqs: list[int]):  # type: ignore[no-untyped-def]
    stamps = []
    for seq in seqs:
        message = await stack.js.get_msg(HEALTH.name, seq)
        stamps.append(HealthReportV1.model_validate_json(message.data or b"").received_at)
    return max(stamps)


async def post_reports(stack: Stack, names: list[str]) -> list[str]:
    answers = await asyncio.gather(*(post_health(stack, ORCH_ID, key=name) for name in names))
    assert [answer.status for answer in answers] == [202] * len(names), answers
    return [str(answer.body["event_key"]) for answer in answers]


async def test_crash_between_commit_and_ack_duplicates_nothing_and_loses_nothing(
    stack: Stack,
) -> None:
    info = await stack.js.consumer_info(HEALTH.name, HEALTH_CONSUMER)
    config = info.config
    config.ack_wait = SHORT_ACK_WAIT_S
    await stack.js.add_consumer(HEALTH.name, config)

    crashing = stack.workers[0]
    crashing.extra_env = {**crashing.extra_env, FAULT_POINTS_ENV: FAULT}
    await start_processes([crashing])
    await wait_for(lambda: orchestrator_row(stack, ORCH_ID), timeout_s=15)

    first_keys = await post_reports(stack, [f"crash-{i:02d}" for i in range(10)])
    code = await asyncio.to_thread(crashing.wait_exit, 30)
    assert code == FAULT_EXIT_CODE, crashing.log_text()[-2000:]
    assert f"fault point {FAULT} reached" in crashing.log_text()

    # The batch was committed but never acknowledged.
    committed = await inbox_rows(stack, KEY_PREFIX)
    assert committed, "the worker died before committing anything"
    assert {row.event_key for row in committed} <= set(first_keys)
    info = await stack.js.consumer_info(HEALTH.name, HEALTH_CONSUMER)
    assert (info.num_ack_pending or 0) >= len(committed)

    # With no registry worker at all, a registration cannot be answered: 503, not a hang.
    answer = await call(
        stack.http,
        "POST",
        f"{stack.base}/api/orchestrators/register",
        json={"orchestrator_id": "orch-new", "address": "0x" + "7" * 40},
    )
    assert answer.status == 503, answer
    assert answer.body == {"detail": "No worker is available to answer; retry shortly"}
    assert answer.headers.get("Retry-After") == "2"

    # The ingress does not need the worker: reports keep being accepted meanwhile.
    later_keys = await post_reports(stack, [f"crash-{i:02d}" for i in range(10, 15)])
    all_keys = first_keys + later_keys

    metrics_port = free_port()
    restarted = worker_process("registry", stack.env, stack.tmp, copy=1)
    restarted.extra_env = {"PAYMENTS_METRICS_PORT": str(metrics_port)}
    stack.workers.append(restarted)
    await start_processes([restarted])

    async def all_applied() -> bool:
        return len(await inbox_rows(stack, KEY_PREFIX)) >= len(all_keys)

    await wait_for(all_applied, timeout_s=30)
    await wait_for(lambda: consumer_drained(stack), timeout_s=30)
    rows = await inbox_rows(stack, KEY_PREFIX)
    assert sorted(row.event_key for row in rows) == sorted(all_keys)
    assert await dead_letters(stack) == []
    assert await processed_counter(metrics_port, "duplicate") == len(committed)
    assert await processed_counter(metrics_port, "applied") == len(all_keys) - len(committed)
    record = await orchestrator_row(stack, ORCH_ID)
    assert record is not None
    assert record.forwarder_health_reported_at == await latest_received_at(
        stack, [row.stream_seq for row in rows]
    )


async def readiness(stack: Stack) -> tuple[int, object]:
    answer = await call(stack.http, "GET", f"{stack.base}/readyz")
    return answer.status, answer.body


async def test_nats_outage_answers_503_and_loses_nothing(stack: Stack) -> None:
    subject = subjects.health_report(ORCH_ID)
    worker = stack.workers[0]
    await start_processes([worker])
    await wait_for(lambda: orchestrator_row(stack, ORCH_ID), timeout_s=15)
    assert await readiness(stack) == (200, {"ready": True})
    (before_0,) = await post_reports(stack, ["before-0"])
    await wait_for(lambda: inbox_rows(stack, before_0), timeout_s=15)

    # Freeze the worker (once its pull requests have expired) so the next reports are accepted
    # but not applied before the outage: they must survive it in the stream.
    assert worker.process is not None
    worker.process.send_signal(signal.SIGSTOP)
    try:

        async def no_pull_waiting() -> bool:
            info = await stack.js.consumer_info(HEALTH.name, HEALTH_CONSUMER)
            return info.num_waiting == 0

        await wait_for(no_pull_waiting, timeout_s=10)
        unapplied = await post_reports(stack, ["before-1", "before-2"])
        assert await stream_count(stack.js, HEALTH.name, subject) == 3

        stack.nats.stop()

        async def nats_unreachable() -> bool:
            status, body = await readiness(stack)
            return status == 503 and "nats unreachable" in body.get("problems", [])  # type: ignore[union-attr]

        await wait_for(nats_unreachable, timeout_s=15)
        during = await post_health(stack, ORCH_ID, key="during-outage")
        assert during.status == 503, during
        assert during.body == {"detail": "Event store unavailable; retry shortly"}
        assert during.headers.get("Retry-After") == "2"
        # Reads come from the database and keep working.
        read = await call(
            stack.http, "GET", f"{stack.base}/api/orchestrators/{ORCH_ID}", headers=headers()
        )
        assert read.status == 200, read

        stack.nats.start()
    finally:
        worker.process.send_signal(signal.SIGCONT)

    async def accepted_again() -> str | None:
        answer = await post_health(stack, ORCH_ID, key="after-0")
        return str(answer.body["event_key"]) if answer.status == 202 else None

    after_0 = await wait_for(accepted_again, timeout_s=30, interval_s=0.2)

    async def ready() -> bool:
        return await readiness(stack) == (200, {"ready": True})

    await wait_for(ready, timeout_s=15)

    expected = sorted([before_0, *unapplied, after_0])

    async def all_applied() -> bool:
        rows = await inbox_rows(stack, f"{KEY_PREFIX}")
        return sorted(row.event_key for row in rows) == expected

    await wait_for(all_applied, timeout_s=45)
    await wait_for(lambda: consumer_drained(stack), timeout_s=15)
    # Exactly the accepted reports were stored: the 503 one never was.
    assert await stream_count(stack.js, HEALTH.name, subject) == 4
    assert await dead_letters(stack) == []
    assert worker.running(), "the worker should have reconnected, not died"
    record = await orchestrator_row(stack, ORCH_ID)
    assert record is not None and record.forwarder_health_data == HEALTHY
