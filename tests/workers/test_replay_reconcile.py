"""`payments replay` and `payments reconcile` after 10,000 mixed events.

The events go straight into the WORKLOADS stream, as the ingress publishes them (ingress user,
the same headers, well-formed contracts.events models): time-based workloads, fixed-price
workloads and their verifying updates, adjustments both ways, exact duplicates (same
Nats-Msg-Id, absorbed by JetStream), late duplicates (same event key in a second stream message,
absorbed by the inbox) and conflicting reuses of a workload id. The live ledger worker applies
them; the test computes the expected balances on its own. Then:

- replay into an empty SQLite database (and an empty PostgreSQL one when configured) rebuilds the
  same ledger, entry for entry, and reconcile against it reports nothing;
- a hand-corrupted balance row is reported, and only that orchestrator;
- replay refuses a database that is not empty.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import nats
import pytest
from sqlalchemy import select, update

from contracts.events import (
    MSG_ID_HEADER,
    EventModel,
    LedgerAdjustmentV1,
    WorkloadSubmittedV1,
    WorkloadTimeRecordedV1,
    WorkloadUpdatedV1,
)
from contracts.streams import WORKLOADS
from shared.db.engine import make_engine, make_sessionmaker
from shared.db.models import Balance, LedgerEntry, Workload
from shared.publishing import event_headers
from tests.conftest import POSTGRES_URL_ENV
from tests.ledger_stack import (
    LEDGER_CONSUMER,
    LedgerStack,
    assert_ledger_consistent,
    balances,
    dead_letters,
    empty_postgres_database,
    entries,
    ledger_stack,
    orchestrator,
    processed_count,
    run_payments,
    stream_count,
    wait_until,
)

ORCHESTRATORS = [orchestrator(f"orch-r{i}", digit) for i, digit in enumerate("5678")]
IDS = [o["orchestrator_id"] for o in ORCHESTRATORS]
TOTAL_EVENTS = 10_000
SEED = 20_250_101
RATE = "0.000005353596"
WEI_PER_MS = 5_353_596_000_000 // 60_000


@dataclass
class Planned:
    subject: str
    event: EventModel
    key: str
    msg_id: str


@dataclass
class Plan:
    """The events to publish and what they must do, computed without the product's code."""

    messages: list[Planned] = field(default_factory=list)
    expected: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    expected_entries: set[str] = field(default_factory=set)

    @property
    def stored(self) -> int:
        return len({m.msg_id for m in self.messages})

    @property
    def keys(self) -> int:
        return len({m.key for m in self.messages})


def digest(document: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


def make_plan(rng: random.Random) -> Plan:
    plan = Plan()
    clock = datetime.now(UTC) - timedelta(minutes=5)
    fixed: list[tuple[str, str, int]] = []
    time_workloads: list[tuple[str, dict[str, Any]]] = []

    def add(subject: str, event: EventModel, key: str, msg_id: str | None = None) -> Planned:
        planned = Planned(subject, event, key, msg_id or key)
        plan.messages.append(planned)
        return planned

    def now() -> datetime:
        nonlocal clock
        clock += timedelta(milliseconds=1)
        return clock

    while len(plan.messages) < TOTAL_EVENTS:
        roll = rng.random()
        oid = rng.choice(IDS)
        n = len(plan.messages)
        if roll < 0.45:
            workload_id = f"wt-{n}"
            body = {"orchestrator_id": oid, "duration_ms": rng.randint(1, 3_600_000)}
            status = "verified" if rng.random() < 0.9 else "pending"
            sha = digest({"id": workload_id, **body, "status": status})
            event: EventModel = WorkloadTimeRecordedV1(
                workload_id=workload_id,
                credit_eth_per_minute=RATE,
                status=status,
                artifact_hash=f"sha256:{workload_id}",
                body_sha256=sha,
                received_at=now(),
                **body,
            )
            add(f"workloads.time.{oid}", event, f"workload_time:{workload_id}:{sha[:16]}")
            time_workloads.append((workload_id, body))
            if status == "verified":
                plan.expected[oid] += body["duration_ms"] * WEI_PER_MS
                plan.expected_entries.add(f"workload:{workload_id}")
        elif roll < 0.60:
            workload_id = f"wf-{n}"
            payout = rng.randint(1, 10**18)
            sha = digest({"id": workload_id, "orchestrator_id": oid, "payout": payout})
            event = WorkloadSubmittedV1(
                workload_id=workload_id,
                orchestrator_id=oid,
                payout_amount_wei=payout,
                artifact_uri=f"s3://bucket/{workload_id}.mp4",
                body_sha256=sha,
                received_at=now(),
            )
            add(f"workloads.fixed.{oid}", event, f"workload_fixed:{workload_id}:{sha[:16]}")
            fixed.append((workload_id, oid, payout))
        elif roll < 0.75 and fixed:
            workload_id, owner, payout = fixed.pop(rng.randrange(len(fixed)))
            for status in ("verified", "paid") if rng.random() < 0.5 else ("verified",):
                event = WorkloadUpdatedV1(
                    workload_id=workload_id,
                    orchestrator_id=owner,
                    status=status,
                    received_at=now(),
                )
                add(f"workloads.updates.{owner}", event, f"workload_update:{workload_id}:{status}")
            plan.expected[owner] += payout
            plan.expected_entries.add(f"workload:{workload_id}")
        elif roll < 0.87:
            amount = rng.choice([-1, 1]) * rng.randint(1, 10**17)
            event = LedgerAdjustmentV1(
                orchestrator_id=oid,
                amount_wei=amount,
                reason="adjustment",
                notes=f"replay test {n}",
                received_at=now(),
            )
            key = f"adjustment:{oid}:key:replay-{n}"
            add(f"workloads.adjustments.{oid}", event, key)
            plan.expected[oid] += amount
            plan.expected_entries.add(f"adjustment:{key}")
        elif roll < 0.93:
            # An exact duplicate (same Nats-Msg-Id) of an earlier message.
            earlier = rng.choice(plan.messages)
            add(earlier.subject, earlier.event, earlier.key, earlier.msg_id)
        elif roll < 0.97:
            # A late duplicate: a second stream message with the same event key.
            earlier = rng.choice(plan.messages)
            add(earlier.subject, earlier.event, earlier.key, f"{earlier.key}:late-{n}")
        elif time_workloads:
            # The same workload id with another body: a conflict, never a credit.
            workload_id, body = rng.choice(time_workloads)
            changed = {**body, "duration_ms": body["duration_ms"] + 1}
            sha = digest({"id": workload_id, **changed, "status": "verified"})
            event = WorkloadTimeRecordedV1(
                workload_id=workload_id,
                credit_eth_per_minute=RATE,
                artifact_hash=f"sha256:{workload_id}",
                body_sha256=sha,
                received_at=now(),
                **changed,
            )
            oid = changed["orchestrator_id"]
            add(f"workloads.time.{oid}", event, f"workload_time:{workload_id}:{sha[:16]}")
    return plan


async def publish_as_ingress(stack: LedgerStack, plan: Plan) -> None:
    nc = await nats.connect(
        stack.nats.url, user="ingress", password=stack.nats.passwords.ingress, name="test-ingress"
    )
    try:
        js = nc.jetstream(publish_async_max_pending=2000)
        futures = []
        for message in plan.messages:
            headers = event_headers(message.event, message.key)
            headers[MSG_ID_HEADER] = message.msg_id
            futures.append(
                await js.publish_async(
                    message.subject,
                    message.event.model_dump_json().encode(),
                    stream=WORKLOADS.name,
                    headers=headers,
                )
            )
        acks = await asyncio.wait_for(asyncio.gather(*futures), 60)
    finally:
        await nc.close()
    assert sum(1 for ack in acks if not ack.duplicate) == plan.stored


async def ledger_by_orchestrator(url: str) -> tuple[dict[str, set[tuple[str, int, str]]], dict]:
    engine = make_engine(url, writer=False)
    try:
        sessions = make_sessionmaker(engine)
        found: dict[str, set[tuple[str, int, str]]] = defaultdict(set)
        for entry in await entries(sessions):
            found[entry.orchestrator_id].add((entry.entry_key, entry.amount_wei, entry.reason))
        async with sessions() as session:
            workloads = {
                w.workload_id: (w.status, w.credited, w.payout_amount_wei)
                for w in (await session.execute(select(Workload))).scalars()
            }
        return dict(found), {"balances": await balances(sessions), "workloads": workloads}
    finally:
        await engine.dispose()


@pytest.fixture
async def applied(tmp_path: Path) -> AsyncIterator[tuple[LedgerStack, Plan]]:
    rng = random.Random(SEED)
    plan = make_plan(rng)
    async with ledger_stack("sqlite", tmp_path, ORCHESTRATORS) as stack:
        await publish_as_ingress(stack, plan)
        assert await stream_count(stack.js, WORKLOADS.name) == plan.stored

        async def all_applied() -> bool:
            return await processed_count(stack.sessions) == plan.keys

        await wait_until(all_applied, 90.0, stack)

        async def drained_and_published() -> bool:
            info = await stack.js.consumer_info(WORKLOADS.name, LEDGER_CONSUMER)
            published = await stream_count(stack.js, "LEDGER")
            return (
                info.num_pending == 0
                and info.num_ack_pending == 0
                and published == len(plan.expected_entries)
            )

        await wait_until(drained_and_published, 30.0, stack)
        yield stack, plan


def cli_env(stack: LedgerStack) -> dict[str, str]:
    # PAYMENTS_NATS_URL, PAYMENTS_NATS_OPS_PASSWORD and the live PAYMENTS_DATABASE_URL, among the
    # stack's own settings.
    return {**stack.env, "PAYMENTS_LOG_LEVEL": "WARNING"}


async def test_replay_rebuilds_the_live_ledger_and_reconcile_finds_one_corruption(
    applied: tuple[LedgerStack, Plan], tmp_path: Path
) -> None:
    stack, plan = applied
    rows = await entries(stack.sessions)
    live_balances = await balances(stack.sessions)
    assert_ledger_consistent(rows, live_balances)
    assert {r.entry_key for r in rows} == plan.expected_entries
    assert {oid: live_balances.get(oid, 0) for oid in IDS} == {
        oid: plan.expected.get(oid, 0) for oid in IDS
    }
    assert await dead_letters(stack.sessions) == []
    env = cli_env(stack)
    live_ledger = await ledger_by_orchestrator(stack.database.url)

    targets = {"sqlite": f"sqlite+aiosqlite:///{tmp_path / 'replay.db'}"}
    drops = []
    if os.environ.get(POSTGRES_URL_ENV):
        targets["postgres"], drop = await empty_postgres_database()
        drops.append(drop)
    try:
        # Both rebuilds at once: they only read the streams.
        replays = await asyncio.gather(
            *(run_payments(env, "replay", "--into", url) for url in targets.values())
        )
        for name, replayed in zip(targets, replays, strict=True):
            assert replayed.code == 0, (name, replayed.stderr[-3000:])
            assert "replayed in" in replayed.stderr and "[" + "#" * 30 + "]" in replayed.stderr
            assert (
                f"ledger-workloads: {plan.stored} messages, {plan.keys} applied, "
                f"{plan.stored - plan.keys} duplicates, 0 dead-lettered"
            ) in replayed.stdout, replayed.stdout
            # Entry for entry, per orchestrator; the same balances and workloads.
            assert await ledger_by_orchestrator(targets[name]) == live_ledger, name

        reconciles = await asyncio.gather(
            *(
                run_payments(
                    env,
                    "reconcile",
                    "--against",
                    url,
                    "--out",
                    str(tmp_path / f"report-{name}.md"),
                    "--write-mismatches-json",
                    str(tmp_path / f"mismatches-{name}.json"),
                )
                for name, url in targets.items()
            )
        )
        for name, reconciled in zip(targets, reconciles, strict=True):
            assert reconciled.code == 0, (name, reconciled.stderr[-3000:])
            assert (
                "mismatches: 0; replay differences: 0; entries missing from LEDGER stream: 0"
                in reconciled.stderr
            )
            assert json.loads((tmp_path / f"mismatches-{name}.json").read_text()) == []
            markdown = (tmp_path / f"report-{name}.md").read_text()
            assert "- mismatches: 0" in markdown and "- differing orchestrators: 0" in markdown

        # A target that is not empty is refused, and left as it was.
        refused = await run_payments(env, "replay", "--into", targets["sqlite"])
        assert refused.code == 2, refused.stderr[-3000:]
        assert "replay refused" in refused.stderr
        assert await ledger_by_orchestrator(targets["sqlite"]) == live_ledger

        # Corrupt one balance row by hand: reconcile names that orchestrator, and only it.
        victim = IDS[2]
        writer = make_engine(stack.database.url, writer=True)
        try:
            async with make_sessionmaker(writer)() as session, session.begin():
                await session.execute(
                    update(Balance)
                    .where(Balance.orchestrator_id == victim)
                    .values(balance_wei=live_balances[victim] + 12345)
                )
        finally:
            await writer.dispose()
        mismatches = tmp_path / "mismatches-corrupt.json"
        corrupt = await run_payments(
            env,
            "reconcile",
            "--against",
            targets["postgres" if "postgres" in targets else "sqlite"],
            "--out",
            str(tmp_path / "corrupt.md"),
            "--write-mismatches-json",
            str(mismatches),
        )
        assert corrupt.code == 1, corrupt.stderr[-3000:]
        assert "mismatches: 1; replay differences: 1;" in corrupt.stderr
        found = json.loads(mismatches.read_text())
        assert [m["orchestrator_id"] for m in found] == [victim]
        assert found[0]["delta"] == "0.000000000000012345"
        markdown = (tmp_path / "corrupt.md").read_text()
        assert f"- {victim}: balance" in markdown
        assert not any(f"- {oid}: " in markdown for oid in IDS if oid != victim)
        # The entries themselves were never touched.
        async with stack.sessions() as session:
            count = len(list((await session.execute(select(LedgerEntry.id))).scalars()))
        assert count == len(rows)
    finally:
        for drop in drops:
            await drop()
