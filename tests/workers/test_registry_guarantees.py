"""The registry worker's guarantees, end to end, on one shared stack per database backend.

The stack: a real nats-server, a fresh database, TWO copies of the registry worker bound to the
same durable `registry-health` (each with its own /metrics port) and the api. Each test uses its own
bootstrapped orchestrator, so its stream subject and inbox keys are its own. Assertions read
effects: processed_events and dead_letters rows, the orchestrators projection, HEALTH stream
counts through the ops user, the workers' Prometheus counters and the CLI's output.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import pytest_asyncio

from contracts import subjects
from contracts.events import EVENT_KEY_HEADER, MSG_ID_HEADER, SCHEMA_HEADER, HealthReportV1
from contracts.streams import HEALTH
from shared.db.engine import make_engine, make_sessionmaker
from shared.db.repositories import dead_letters as dead_letter_repo
from shared.publishing import publish_event
from tests.e2e import (
    BACKENDS,
    HEALTH_CONSUMER,
    HEALTHY,
    Stack,
    consumer_drained,
    dead_letters,
    inbox_rows,
    orchestrator,
    orchestrator_row,
    post_health,
    processed_counter,
    run_cli,
    running_stack,
    stream_count,
)
from tests.harness import wait_for

pytestmark = pytest.mark.asyncio(loop_scope="module")

TRICKLE_S = 4.0
# Far below ack_wait (30 s): a batch dropped on the floor shows up as a stall this long.
TRICKLE_DRAIN_S = 10.0

ORCH_IDEM = "orch-idem"
ORCH_COPY = "orch-copy"
ORCH_RAW = "orch-1"
ORCH_SCALE = "orch-scale"
ORCH_DLQ = "orch-dlq"
BOOTSTRAP = [
    orchestrator(ORCH_IDEM, "1"),
    orchestrator(ORCH_COPY, "2"),
    orchestrator(ORCH_RAW, "3"),
    orchestrator(ORCH_SCALE, "4"),
    orchestrator(ORCH_DLQ, "5"),
]


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=BACKENDS)
async def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    tmp: Path = tmp_path_factory.mktemp(f"registry-{request.param}")
    async with running_stack(request.param, tmp, bootstrap=BOOTSTRAP, worker_copies=2) as stack:
        yield stack


async def registered(stack: Stack, orchestrator_id: str) -> None:
    """Bootstrap registrations apply one by one; each test waits only for its own."""
    await wait_for(lambda: orchestrator_row(stack, orchestrator_id), timeout_s=20)


async def counters(stack: Stack, outcome: str) -> list[float]:
    """payments_events_processed_total{consumer="registry-health", outcome} of each copy."""
    return list(
        await asyncio.gather(*(processed_counter(port, outcome) for port in stack.metrics_ports))
    )


async def quiet(stack: Stack) -> None:
    """Wait until the durable has nothing pending and nothing unacknowledged."""
    await wait_for(lambda: consumer_drained(stack), timeout_s=20)


def report_body(orchestrator_id: str, source: str = "raw") -> bytes:
    report = HealthReportV1(
        orchestrator_id=orchestrator_id, source=source, data=HEALTHY, received_at=datetime.now(UTC)
    )
    return report.model_dump_json().encode()


# -- every effect happens once ------------------------------------------------------------------


async def test_same_report_posted_100_times_changes_projection_once(stack: Stack) -> None:
    await registered(stack, ORCH_IDEM)
    subject = subjects.health_report(ORCH_IDEM)
    await quiet(stack)
    applied_before = await counters(stack, "applied")

    first = await post_health(stack, ORCH_IDEM, key="forwarder-report-0001")
    assert first.status == 202, first
    assert first.body["duplicate"] is False
    key = first.body["event_key"]
    again = await asyncio.gather(
        *(post_health(stack, ORCH_IDEM, key="forwarder-report-0001") for _ in range(99))
    )
    assert [answer.status for answer in again] == [202] * 99
    assert all(a.body == {"ok": True, "event_key": key, "duplicate": True} for a in again)

    await wait_for(lambda: inbox_rows(stack, key), timeout_s=15)
    await quiet(stack)
    rows = [row for row in await inbox_rows(stack, key) if row.event_key == key]
    assert len(rows) == 1
    assert await stream_count(stack.js, HEALTH.name, subject) == 1
    stored = await stack.js.get_last_msg(HEALTH.name, subject)
    assert rows[0].stream_seq == stored.seq
    assert stored.data is not None
    report = HealthReportV1.model_validate_json(stored.data)
    record = await orchestrator_row(stack, ORCH_IDEM)
    assert record is not None
    assert record.forwarder_health_reported_at == report.received_at
    assert record.forwarder_health_data == HEALTHY
    applied_after = await counters(stack, "applied")
    assert sum(applied_after) - sum(applied_before) == 1


async def test_copy_past_the_dedup_window_is_only_acked(stack: Stack) -> None:
    """A second copy that JetStream stores anyway (new Nats-Msg-Id, same event key, as after the
    dedup window) finds the key in the inbox: acked as a duplicate, no second effect."""
    await registered(stack, ORCH_COPY)
    subject = subjects.health_report(ORCH_COPY)
    first = await post_health(stack, ORCH_COPY, key="copy-1")
    assert first.status == 202, first
    key = first.body["event_key"]
    await wait_for(lambda: inbox_rows(stack, key), timeout_s=15)
    await quiet(stack)
    before = await orchestrator_row(stack, ORCH_COPY)
    assert before is not None
    duplicates_before = sum(await counters(stack, "duplicate"))

    stored = await stack.js.get_last_msg(HEALTH.name, subject)
    headers = {**(stored.headers or {}), MSG_ID_HEADER: f"{key}#late-copy"}
    assert headers[EVENT_KEY_HEADER] == key
    ack = await stack.js.publish(subject, stored.data or b"", headers=headers)
    assert ack.duplicate is not True

    async def acked_as_duplicate() -> bool:
        return sum(await counters(stack, "duplicate")) == duplicates_before + 1

    await wait_for(acked_as_duplicate, timeout_s=15)
    await quiet(stack)
    assert await stream_count(stack.js, HEALTH.name, subject) == 2
    rows = await inbox_rows(stack, key)
    assert [(row.event_key, row.stream_seq) for row in rows] == [(key, stored.seq)]
    after = await orchestrator_row(stack, ORCH_COPY)
    assert after is not None
    assert after.forwarder_health_reported_at == before.forwarder_health_reported_at
    assert await dead_letters(stack, subject) == []


# -- nothing poisons a stream -------------------------------------------------------------------

V1 = HealthReportV1.SCHEMA
POISON = [
    # (name, body, headers, expected event_key, what the error must say)
    ("no-headers", b"\x00\xff not json", None, None, "missing Payments-Event-Key"),
    (
        "event-key-without-schema",
        report_body(ORCH_RAW),
        {EVENT_KEY_HEADER: "raw:no-schema"},
        "raw:no-schema",
        "unknown schema None",
    ),
    (
        "wrong-schema",
        report_body(ORCH_RAW),
        {EVENT_KEY_HEADER: "raw:wrong-schema", SCHEMA_HEADER: "health.report.v9"},
        "raw:wrong-schema",
        "unknown schema 'health.report.v9'",
    ),
    (
        "invalid-json",
        b'{"orchestrator_id": "orch-1", ',
        {EVENT_KEY_HEADER: "raw:invalid-json", SCHEMA_HEADER: V1},
        "raw:invalid-json",
        f"invalid {V1} message: body: Invalid JSON",
    ),
    (
        "missing-fields",
        b'{"orchestrator_id": "orch-1"}',
        {EVENT_KEY_HEADER: "raw:missing-fields", SCHEMA_HEADER: V1},
        "raw:missing-fields",
        f"invalid {V1} message: source: Field required",
    ),
    (
        "msg-id-only-not-json",
        b"\xde\xad\xbe\xef",
        {MSG_ID_HEADER: "raw:msg-id-only", SCHEMA_HEADER: V1},
        "raw:msg-id-only",
        "Invalid JSON",
    ),
]


async def test_malformed_messages_are_dead_lettered_and_later_reports_apply(stack: Stack) -> None:
    await registered(stack, ORCH_RAW)
    subject = subjects.health_report(ORCH_RAW)
    assert subject == "health.reports.orch-1"
    sequences = {}
    for name, body, headers, _key, _error in POISON:
        ack = await stack.js.publish(subject, body, headers=headers)
        assert ack.stream == HEALTH.name
        sequences[name] = ack.seq

    # A valid report published straight to the stream after them, and one through the api.
    raw_key = "raw:valid-after-poison"
    raw_report = HealthReportV1.model_validate_json(report_body(ORCH_RAW, source="raw-valid"))
    await publish_event(
        stack.js, stream=HEALTH.name, subject=subject, event=raw_report, key=raw_key
    )
    answer = await post_health(
        stack, ORCH_RAW, {"source": "forwarder-after", "data": HEALTHY}, key="after-poison"
    )
    assert answer.status == 202, answer
    api_key = answer.body["event_key"]

    await wait_for(lambda: inbox_rows(stack, api_key), timeout_s=15)
    await wait_for(lambda: inbox_rows(stack, raw_key), timeout_s=15)
    await quiet(stack)

    letters = {letter.stream_seq: letter for letter in await dead_letters(stack, subject)}
    assert sorted(letters) == sorted(sequences.values()), letters
    for name, body, _headers, key, error in POISON:
        letter = letters[sequences[name]]
        assert letter.consumer == HEALTH_CONSUMER
        assert letter.stream == HEALTH.name
        assert letter.subject == subject
        assert letter.status == "dead"
        assert letter.deliveries == 1, (name, letter.deliveries)
        assert letter.event_key == key
        assert letter.body == body
        assert error in letter.error, (name, letter.error)
    assert await inbox_rows(stack, "raw:no-") == []
    assert await inbox_rows(stack, "raw:wrong") == []
    assert await inbox_rows(stack, "raw:invalid") == []

    record = await orchestrator_row(stack, ORCH_RAW)
    assert record is not None
    applied = [*await inbox_rows(stack, api_key), *await inbox_rows(stack, raw_key)]
    stamps = []
    for row in applied:
        message = await stack.js.get_msg(HEALTH.name, row.stream_seq)
        stamps.append(HealthReportV1.model_validate_json(message.data or b"").received_at)
    latest = max(stamps)
    assert record.forwarder_health_reported_at == latest
    assert record.forwarder_health_source in ("forwarder-after", "raw-valid")


# -- copies share the durable -------------------------------------------------------------------


async def test_two_copies_share_the_durable_and_apply_each_report_once(stack: Stack) -> None:
    await registered(stack, ORCH_SCALE)
    await quiet(stack)
    applied_before = await counters(stack, "applied")
    duplicates_before = await counters(stack, "duplicate")
    limit = asyncio.Semaphore(32)

    async def post(index: int) -> str:
        async with limit:
            answer = await post_health(stack, ORCH_SCALE, key=f"scale-{index:05d}")
        assert answer.status == 202, answer
        assert answer.body["duplicate"] is False
        return str(answer.body["event_key"])

    keys: list[str] = []
    split: list[float] = []
    for _round in range(6):  # one round nearly always reaches both copies; more never hurts
        start = len(keys)
        keys += await asyncio.gather(*(post(i) for i in range(start, start + 300)))

        async def all_applied(expected: int = len(keys)) -> bool:
            return len(await inbox_rows(stack, "health:orch-scale:key:scale-")) == expected

        await wait_for(all_applied, timeout_s=60)
        await quiet(stack)
        after = await counters(stack, "applied")
        split = [a - b for a, b in zip(after, applied_before, strict=True)]
        if all(part > 0 for part in split):
            break

    rows = await inbox_rows(stack, "health:orch-scale:key:scale-")
    assert sorted(row.event_key for row in rows) == sorted(keys)
    assert len({row.stream_seq for row in rows}) == len(keys)
    assert sum(split) == len(keys), split
    assert all(part > 0 for part in split), f"one copy did all the work: {split}"
    duplicates = await counters(stack, "duplicate")
    assert duplicates == duplicates_before
    assert await dead_letters(stack, subjects.health_report(ORCH_SCALE)) == []


async def test_steady_trickle_is_applied_without_a_stall(stack: Stack) -> None:
    """Reports arriving steadily (so batches keep filling while a fetch's deadline runs out) are
    all applied within seconds of the last one, not after ack_wait (30 s) of redelivery."""
    await registered(stack, ORCH_SCALE)
    await quiet(stack)
    keys = []
    started = time.monotonic()
    while time.monotonic() - started < TRICKLE_S:
        answer = await post_health(stack, ORCH_SCALE, key=f"trickle-{len(keys):05d}")
        assert answer.status == 202, answer
        keys.append(answer.body["event_key"])
        await asyncio.sleep(0.01)

    async def all_applied() -> bool:
        rows = await inbox_rows(stack, "health:orch-scale:key:trickle-")
        return len(rows) == len(keys)

    await wait_for(all_applied, timeout_s=TRICKLE_DRAIN_S)
    assert await dead_letters(stack, subjects.health_report(ORCH_SCALE)) == []


# -- operators list and retry dead letters ------------------------------------------------------


async def test_dlq_list_and_retry_republish_a_dead_letter(stack: Stack) -> None:
    await registered(stack, ORCH_DLQ)
    subject = subjects.health_report(ORCH_DLQ)
    bad_headers = {EVENT_KEY_HEADER: "dlq:wrong-schema", SCHEMA_HEADER: "health.report.v0"}
    ack = await stack.js.publish(subject, report_body(ORCH_DLQ), headers=bad_headers)

    async def letter_for(seq: int):  # type: ignore[no-untyped-def]
        return [item for item in await dead_letters(stack, subject) if item.stream_seq == seq]

    (letter,) = await wait_for(lambda: letter_for(ack.seq), timeout_s=15)

    listing = await run_cli(stack.env, "dlq", "list")
    assert listing.code == 0, listing
    (line,) = [item for item in listing.stdout.splitlines() if item.startswith(f"{letter.id}\t")]
    assert f"\tdead\t{HEALTH_CONSUMER}\tHEALTH#{ack.seq}\t{subject}\t" in line
    assert "unknown schema 'health.report.v0'" in line

    before = await stream_count(stack.js, HEALTH.name, subject)
    retried = await run_cli(stack.env, "dlq", "retry", str(letter.id))
    assert retried.code == 0, retried
    new_seq = int(retried.stdout.strip().rsplit("#", 1)[1])
    assert retried.stdout.strip() == f"{letter.id}\tretried as HEALTH#{new_seq}"
    assert await stream_count(stack.js, HEALTH.name, subject) == before + 1
    copy = await stack.js.get_msg(HEALTH.name, new_seq)
    assert copy.subject == subject and copy.data == letter.body
    assert copy.headers is not None
    assert copy.headers[EVENT_KEY_HEADER] == "dlq:wrong-schema"
    assert copy.headers[MSG_ID_HEADER] == f"dlq:wrong-schema#retry-{letter.id}"

    # The copy reached a worker: still the wrong schema, so it is a new dead letter of its own.
    (again,) = await wait_for(lambda: letter_for(new_seq), timeout_s=15)
    (old,) = await letter_for(ack.seq)
    assert old.status == "retried" and old.retried_at is not None
    assert again.status == "dead"
    listing = await run_cli(stack.env, "dlq", "list")
    ids = {int(item.split("\t")[0]) for item in listing.stdout.splitlines() if "\t" in item}
    assert again.id in ids and old.id not in ids
    listing_all = await run_cli(stack.env, "dlq", "list", "--all")
    assert f"{old.id}\tretried\t" in listing_all.stdout


async def test_dlq_retry_applies_a_letter_whose_cause_is_gone_once(stack: Stack) -> None:
    """A letter left by a transient failure (written here as the worker writes it after
    MAX_ATTEMPTS) is applied when retried, once, however often it is retried."""
    await registered(stack, ORCH_DLQ)
    subject = subjects.health_report(ORCH_DLQ)
    key = "dlq:transient-1"
    report = HealthReportV1.model_validate_json(report_body(ORCH_DLQ, source="retried"))
    engine = make_engine(stack.database.url)
    try:
        async with make_sessionmaker(engine)() as session, session.begin():
            await dead_letter_repo.record(
                session,
                [
                    dead_letter_repo.NewDeadLetter(
                        consumer=HEALTH_CONSUMER,
                        stream=HEALTH.name,
                        subject=subject,
                        stream_seq=1_000_000,
                        event_key=key,
                        error="OperationalError: database is unavailable",
                        body=report.model_dump_json().encode(),
                        headers={EVENT_KEY_HEADER: key, MSG_ID_HEADER: key, SCHEMA_HEADER: V1},
                        deliveries=8,
                    )
                ],
            )
    finally:
        await engine.dispose()
    (letter,) = [item for item in await dead_letters(stack, subject) if item.event_key == key]

    retried = await run_cli(stack.env, "dlq", "retry", str(letter.id))
    assert retried.code == 0, retried
    await wait_for(lambda: inbox_rows(stack, key), timeout_s=15)
    await quiet(stack)
    # Retrying it again changes nothing (JetStream's dedup window, then the inbox, absorb it).
    retried = await run_cli(stack.env, "dlq", "retry", str(letter.id))
    assert retried.code == 0, retried
    await quiet(stack)
    assert len(await inbox_rows(stack, key)) == 1
    record = await orchestrator_row(stack, ORCH_DLQ)
    assert record is not None
    assert record.forwarder_health_source == "retried"
    assert record.forwarder_health_reported_at == report.received_at
    (done,) = [item for item in await dead_letters(stack, subject) if item.id == letter.id]
    assert done.status == "retried"
