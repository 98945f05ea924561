"""Property test: random sequences of workload credits, verifying updates, adjustments, exact
duplicates, redeliveries and conflicting reuses of a workload id, driven through the ledger
worker's real EventConsumer and LedgerProjector against a real (migrated) SQLite file.

After every step the database must agree with an independent model kept by the test:

- every balance equals the sum of its entries, and the model's expected total;
- no entry key twice, each workload credited at most once (and `credited` set exactly then);
- the inbox holds exactly the applied event keys, the dead letters exactly the given-up ones;
- every entry is queued once in the outbox for the LEDGER stream;
- each delivered message was settled once, the way the model expects (ack, nak or term).

At the end of a run without retries, `apply_final` (what `payments replay` runs) over the same
messages in stream order rebuilds the same entries and balances in an empty database.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from contracts.events import (
    EventModel,
    LedgerAdjustmentV1,
    WorkloadSubmittedV1,
    WorkloadTimeRecordedV1,
    WorkloadUpdatedV1,
)
from contracts.streams import LEDGER_WORKLOADS_CONSUMER, MAX_ATTEMPTS
from shared.db.engine import make_engine, make_sessionmaker
from shared.db.migrate import upgrade
from shared.db.models import (
    Balance,
    DeadLetter,
    LedgerEntry,
    Orchestrator,
    OutboxMessage,
    ProcessedEvent,
    Workload,
)
from shared.event_consumer import Delivery, EventConsumer
from shared.publishing import event_headers
from workers.ledger import SCHEMAS, LedgerProjector

CONSUMER = LEDGER_WORKLOADS_CONSUMER.durable
KNOWN = ("o1", "o2", "o3")
UNKNOWN = "o-missing"  # never registered: its events are retried, then dead-lettered
WORKLOAD_IDS = ("w0", "w1", "w2", "w3", "w4")
RATES = ("0.000005353596", "0", "0.000000000000000001", "1.5", "0.123456789012345678")
VIDEO = (".webm", ".mkv", ".mp4", ".mov")
BASE_TIME = datetime(2025, 1, 1, tzinfo=UTC)


# -- the actions a run is made of ---------------------------------------------------------------


@dataclass(frozen=True)
class TimeWorkload:
    workload_id: str
    orchestrator_id: str
    duration_ms: int
    rate: str
    status: str
    artifact_hash: str | None


@dataclass(frozen=True)
class FixedWorkload:
    workload_id: str
    orchestrator_id: str
    payout_wei: int
    artifact_uri: str | None
    artifact_hash: str | None


@dataclass(frozen=True)
class Update:
    workload_id: str
    status: str | None
    artifact_hash: str | None
    artifact_uri: str | None
    stale: bool  # stamped before the workload's creation: must not move its fields back


@dataclass(frozen=True)
class Adjustment:
    orchestrator_id: str
    amount_wei: int


@dataclass(frozen=True)
class Duplicate:
    """A new stream message carrying an earlier event again, same event key (as a publish after
    the dedup window would)."""

    pick: int


@dataclass(frozen=True)
class Redeliver:
    """The same stream message delivered again (num_delivered + 1)."""

    pick: int


orchestrators = st.sampled_from(KNOWN) | st.just(UNKNOWN)
optional_hash = st.sampled_from([None, "", "  ", "sha256:a", "sha256:b"])
time_workloads = st.builds(
    TimeWorkload,
    workload_id=st.sampled_from(WORKLOAD_IDS),
    orchestrator_id=st.sampled_from(KNOWN) | orchestrators,
    duration_ms=st.integers(1, 86_400_000),
    rate=st.sampled_from(RATES),
    status=st.sampled_from(["verified", "verified", "paid", "pending", "rejected"]),
    artifact_hash=st.sampled_from(["sha256:t1", "sha256:t2"]),
)
fixed_workloads = st.builds(
    FixedWorkload,
    workload_id=st.sampled_from(WORKLOAD_IDS),
    orchestrator_id=st.sampled_from(KNOWN) | orchestrators,
    payout_wei=st.integers(1, 10**22),
    artifact_uri=st.sampled_from([None, "s3://b/a.mp4", "s3://b/A.MOV", "s3://b/a.txt"]),
    artifact_hash=optional_hash,
)
updates = st.builds(
    Update,
    workload_id=st.sampled_from(WORKLOAD_IDS),
    status=st.sampled_from([None, "pending", "verified", "paid", "rejected"]),
    artifact_hash=optional_hash,
    artifact_uri=st.sampled_from([None, "s3://b/u.mkv", "s3://b/u.json"]),
    stale=st.booleans(),
)
adjustments = st.builds(
    Adjustment,
    orchestrator_id=st.sampled_from(KNOWN) | orchestrators,
    amount_wei=st.integers(-(10**21), 10**21).filter(bool),
)
actions = st.one_of(
    time_workloads,
    fixed_workloads,
    updates,
    adjustments,
    st.builds(Duplicate, st.integers(0, 10_000)),
    st.builds(Redeliver, st.integers(0, 10_000)),
)
# A step is one fetched batch: one to three messages handled in one transaction.
steps = st.lists(st.lists(actions, min_size=1, max_size=3), min_size=1, max_size=20)


# -- fake JetStream messages --------------------------------------------------------------------


@dataclass
class FakeMsg:
    subject: str
    data: bytes
    headers: dict[str, str]
    metadata: Any
    settled: list[str] = field(default_factory=list)

    async def ack(self) -> None:
        self.settled.append("ack")

    async def nak(self, delay: float | None = None) -> None:
        self.settled.append("nak")

    async def term(self) -> None:
        self.settled.append("term")


@dataclass
class Sent:
    """One stream message: its event, key and sequence, and how often it was delivered."""

    seq: int
    subject: str
    event: EventModel
    key: str
    deliveries: int = 0

    def deliver(self) -> FakeMsg:
        self.deliveries += 1
        metadata = SimpleNamespace(
            stream="WORKLOADS",
            sequence=SimpleNamespace(stream=self.seq, consumer=self.seq),
            num_delivered=self.deliveries,
            num_pending=0,
        )
        return FakeMsg(
            subject=self.subject,
            data=self.event.model_dump_json().encode(),
            headers=event_headers(self.event, self.key),
            metadata=metadata,
        )


def body_digest(document: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


# -- the independent model ----------------------------------------------------------------------


def has_artifact(uri: str | None, digest: str | None) -> bool:
    return (uri or "").lower().endswith(VIDEO) or bool((digest or "").strip())


def time_credit_wei(duration_ms: int, rate: str) -> int:
    wei_per_minute = Decimal(rate) * 10**18
    assert wei_per_minute == int(wei_per_minute)
    return duration_ms * int(wei_per_minute) // 60_000


@dataclass
class Model:
    inbox: set[str] = field(default_factory=set)
    workloads: dict[str, dict[str, Any]] = field(default_factory=dict)
    entries: dict[str, tuple[str, int, str]] = field(default_factory=dict)
    dead: int = 0
    retried: int = 0

    def balances(self) -> dict[str, int]:
        totals: dict[str, int] = defaultdict(int)
        for orchestrator_id, amount, _reason in self.entries.values():
            totals[orchestrator_id] += amount
        return dict(totals)

    def apply_batch(self, batch: list[tuple[Sent, int]]) -> list[str]:
        """The settle call expected for each (message, num_delivered) of one batch."""
        seen_in_batch: set[str] = set()
        expected = []
        for sent, delivered in batch:
            if sent.key in self.inbox or sent.key in seen_in_batch:
                expected.append("ack")
                continue
            seen_in_batch.add(sent.key)
            if self._apply(sent):
                self.inbox.add(sent.key)
                expected.append("ack")
            elif delivered >= MAX_ATTEMPTS:
                self.dead += 1
                expected.append("term")
            else:
                self.retried += 1
                expected.append("nak")
        return expected

    def _apply(self, sent: Sent) -> bool:
        event = sent.event
        if event.orchestrator_id not in KNOWN:  # type: ignore[attr-defined]
            return False
        if isinstance(event, LedgerAdjustmentV1):
            self.entries[f"adjustment:{sent.key}"] = (
                event.orchestrator_id,
                event.amount_wei,
                event.reason,
            )
            return True
        if isinstance(event, WorkloadUpdatedV1):
            workload = self.workloads.get(event.workload_id)
            if workload is None:
                return False
            if event.received_at >= workload["updated_at"]:
                for name in ("status", "artifact_uri", "artifact_hash"):
                    if getattr(event, name) is not None:
                        workload[name] = getattr(event, name)
                workload["updated_at"] = event.received_at
            self._credit_if_due(workload)
            return True
        assert isinstance(event, WorkloadTimeRecordedV1 | WorkloadSubmittedV1)
        if event.workload_id in self.workloads:
            return True  # a duplicate or a conflict: recorded, nothing credited
        time_based = isinstance(event, WorkloadTimeRecordedV1)
        workload = {
            "workload_id": event.workload_id,
            "orchestrator_id": event.orchestrator_id,
            "time": time_based,
            "status": event.status if time_based else "pending",
            "artifact_uri": event.artifact_uri,
            "artifact_hash": event.artifact_hash,
            "payout": (
                time_credit_wei(event.duration_ms, event.credit_eth_per_minute)
                if time_based
                else event.payout_amount_wei
            ),
            "credited": False,
            "updated_at": event.received_at,
        }
        self.workloads[event.workload_id] = workload
        self._credit_if_due(workload)
        return True

    def _credit_if_due(self, workload: dict[str, Any]) -> None:
        if workload["credited"] or workload["status"] not in ("verified", "paid"):
            return
        if workload["payout"] <= 0:
            return
        if not workload["time"] and not has_artifact(
            workload["artifact_uri"], workload["artifact_hash"]
        ):
            return
        workload["credited"] = True
        reason = "workload_time" if workload["time"] else "workload"
        self.entries[f"workload:{workload['workload_id']}"] = (
            workload["orchestrator_id"],
            workload["payout"],
            reason,
        )


# -- a run ----------------------------------------------------------------------------------------


class Run:
    """The live worker's path: batches worked out from a reader before the write transaction
    (shared.event_consumer's prepared path, with its fallback under the lock)."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        reader: async_sessionmaker[AsyncSession],
    ) -> None:
        self.consumer: EventConsumer[Any] = EventConsumer(
            consumer=CONSUMER,
            schemas=SCHEMAS,
            projector=LedgerProjector(),
            sessionmaker=sessions,
            reader=reader,
        )
        self.sessions = sessions
        self.model = Model()
        self.sent: list[Sent] = []
        self.adjustments = 0

    def _new(self, subject: str, event: EventModel, key: str) -> Sent:
        sent = Sent(seq=len(self.sent) + 1, subject=subject, event=event, key=key)
        self.sent.append(sent)
        return sent

    def _now(self) -> datetime:
        return BASE_TIME + timedelta(seconds=len(self.sent) + 1)

    def message_for(self, action: Any) -> Sent | None:
        if isinstance(action, Duplicate | Redeliver):
            if not self.sent:
                return None
            earlier = self.sent[action.pick % len(self.sent)]
            if isinstance(action, Redeliver):
                return earlier
            return self._new(earlier.subject, earlier.event, earlier.key)
        if isinstance(action, TimeWorkload):
            digest = body_digest({"kind": "time", **action.__dict__})
            event: EventModel = WorkloadTimeRecordedV1(
                workload_id=action.workload_id,
                orchestrator_id=action.orchestrator_id,
                duration_ms=action.duration_ms,
                credit_eth_per_minute=action.rate,
                status=action.status,  # type: ignore[arg-type]
                artifact_hash=action.artifact_hash,
                body_sha256=digest,
                received_at=self._now(),
            )
            key = f"workload_time:{action.workload_id}:{digest[:16]}"
            return self._new(f"workloads.time.{action.orchestrator_id}", event, key)
        if isinstance(action, FixedWorkload):
            digest = body_digest({"kind": "fixed", **action.__dict__})
            event = WorkloadSubmittedV1(
                workload_id=action.workload_id,
                orchestrator_id=action.orchestrator_id,
                payout_amount_wei=action.payout_wei,
                artifact_uri=action.artifact_uri,
                artifact_hash=action.artifact_hash,
                body_sha256=digest,
                received_at=self._now(),
            )
            key = f"workload_fixed:{action.workload_id}:{digest[:16]}"
            return self._new(f"workloads.fixed.{action.orchestrator_id}", event, key)
        if isinstance(action, Update):
            known = self.model.workloads.get(action.workload_id)
            orchestrator_id = known["orchestrator_id"] if known else KNOWN[0]
            at = BASE_TIME - timedelta(hours=1) if action.stale else self._now()
            event = WorkloadUpdatedV1(
                workload_id=action.workload_id,
                orchestrator_id=orchestrator_id,
                status=action.status,  # type: ignore[arg-type]
                artifact_hash=action.artifact_hash,
                artifact_uri=action.artifact_uri,
                received_at=at,
            )
            key = f"workload_update:{action.workload_id}:{len(self.sent)}"
            return self._new(f"workloads.updates.{orchestrator_id}", event, key)
        assert isinstance(action, Adjustment)
        self.adjustments += 1
        event = LedgerAdjustmentV1(
            orchestrator_id=action.orchestrator_id,
            amount_wei=action.amount_wei,
            reason="adjustment" if action.amount_wei > 0 else "correction",
            notes=f"adjustment {self.adjustments}",
            received_at=self._now(),
        )
        key = f"adjustment:{action.orchestrator_id}:key:{self.adjustments}"
        return self._new(f"workloads.adjustments.{action.orchestrator_id}", event, key)

    async def step(self, batch_actions: list[Any]) -> None:
        batch: list[tuple[Sent, FakeMsg]] = []
        for action in batch_actions:
            sent = self.message_for(action)
            if sent is not None:
                batch.append((sent, sent.deliver()))
        if not batch:
            return
        expected = self.model.apply_batch([(s, m.metadata.num_delivered) for s, m in batch])
        await self.consumer.handle([m for _s, m in batch])  # type: ignore[arg-type]
        assert [m.settled for _s, m in batch] == [[e] for e in expected]
        await self.check()

    async def check(self) -> None:
        async with self.sessions() as session:
            rows = list((await session.execute(select(LedgerEntry))).scalars())
            stored = {
                oid: int(value)
                for oid, value in (
                    await session.execute(select(Balance.orchestrator_id, Balance.balance_wei))
                ).all()
            }
            inbox = list(
                (
                    await session.execute(
                        select(ProcessedEvent.event_key).where(ProcessedEvent.consumer == CONSUMER)
                    )
                ).scalars()
            )
            dead = list((await session.execute(select(DeadLetter))).scalars())
            workloads = {
                w.workload_id: w for w in (await session.execute(select(Workload))).scalars()
            }
            outbox = list((await session.execute(select(OutboxMessage.event_key))).scalars())
        # Balance = sum of its entries, for every orchestrator, and = the model's total.
        sums: dict[str, int] = defaultdict(int)
        for entry in rows:
            sums[entry.orchestrator_id] += entry.amount_wei
        expected = self.model.balances()
        for oid in set(sums) | set(stored) | set(expected):
            assert stored.get(oid, 0) == sums.get(oid, 0) == expected.get(oid, 0), oid
        # No entry key twice; exactly the model's entries.
        keys = [e.entry_key for e in rows]
        assert len(keys) == len(set(keys))
        assert {e.entry_key: (e.orchestrator_id, e.amount_wei, e.reason) for e in rows} == (
            self.model.entries
        )
        # Each workload credited at most once, and `credited` set exactly when it was.
        credited_ids = [
            (e.entry_metadata or {})["workload_id"]
            for e in rows
            if e.reason in ("workload", "workload_time")
        ]
        assert len(credited_ids) == len(set(credited_ids))
        assert {w for w, row in workloads.items() if row.credited} == set(credited_ids)
        assert set(workloads) == set(self.model.workloads)
        # The inbox, dead letters and outbox tell the same story.
        assert len(inbox) == len(set(inbox))
        assert set(inbox) == self.model.inbox
        assert len(dead) == self.model.dead
        assert sorted(outbox) == sorted(f"ledger:{key}" for key in keys)


async def ledger_of(
    sessions: async_sessionmaker[AsyncSession],
) -> tuple[set[tuple[Any, ...]], dict[str, int]]:
    async with sessions() as session:
        rows = (await session.execute(select(LedgerEntry))).scalars()
        found = {
            (e.entry_key, e.orchestrator_id, e.amount_wei, e.reason, e.source_seq) for e in rows
        }
        balance_rows = await session.execute(select(Balance.orchestrator_id, Balance.balance_wei))
        return found, {oid: int(b) for oid, b in balance_rows.all()}


async def replay_matches(live: Run, target: Path) -> None:
    """apply_final over every message in stream order, all under the write lock as replay runs
    it, rebuilds the same ledger as the live path did."""
    engine = make_engine(f"sqlite+aiosqlite:///{target}", writer=True)
    try:
        sessions = make_sessionmaker(engine)
        consumer: EventConsumer[Any] = EventConsumer(
            consumer=CONSUMER, schemas=SCHEMAS, projector=LedgerProjector(), sessionmaker=sessions
        )
        deliveries = [Delivery.from_msg(s.deliver()) for s in live.sent]  # type: ignore[arg-type]
        for start in range(0, len(deliveries), 7):
            plan = await consumer.apply_final(deliveries[start : start + 7])
            assert not plan.dead
        assert await ledger_of(sessions) == await ledger_of(live.sessions)
    finally:
        await engine.dispose()


async def run_steps(template: Path, workdir: Path, batches: list[list[Any]]) -> None:
    live_path, replay_path = workdir / "live.db", workdir / "replay.db"
    shutil.copyfile(template, live_path)
    engine = make_engine(f"sqlite+aiosqlite:///{live_path}", writer=True)
    reader = make_engine(f"sqlite+aiosqlite:///{live_path}", writer=False)
    try:
        run = Run(make_sessionmaker(engine), make_sessionmaker(reader))
        for batch in batches:
            await run.step(batch)
        if run.model.retried == 0 and run.model.dead == 0:
            shutil.copyfile(template, replay_path)
            await replay_matches(run, replay_path)
    finally:
        await engine.dispose()
        await reader.dispose()


@pytest.fixture(scope="module")
def template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file with the known orchestrators registered; each example copies it."""
    path = tmp_path_factory.mktemp("ledger-property") / "template.db"
    url = f"sqlite+aiosqlite:///{path}"
    upgrade(url)

    async def register() -> None:
        engine = make_engine(url, writer=True)
        try:
            async with make_sessionmaker(engine)() as session, session.begin():
                await session.execute(
                    insert(Orchestrator),
                    [
                        {
                            "orchestrator_id": oid,
                            "address": "0x" + str(i + 1) * 40,
                            "registration_order": i + 1,
                        }
                        for i, oid in enumerate(KNOWN)
                    ],
                )
        finally:
            await engine.dispose()

    asyncio.run(register())
    return path


@settings(
    max_examples=120,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(batches=steps)
def test_ledger_invariants_hold_after_every_step(template_db: Path, batches: list) -> None:
    with tempfile.TemporaryDirectory(dir=template_db.parent) as workdir:
        asyncio.run(run_steps(template_db, Path(workdir), batches))


def test_model_agrees_on_a_known_sequence(template_db: Path) -> None:
    """A fixed sequence touching every path, so the property above cannot pass vacuously."""
    batches = [
        [TimeWorkload("w0", "o1", 180_000, RATES[0], "verified", "sha256:t1")],
        [Redeliver(0), Duplicate(0)],  # same message again; same key in a new message
        [TimeWorkload("w0", "o1", 60_000, RATES[0], "verified", "sha256:t1")],  # conflict
        [FixedWorkload("w1", "o2", 5 * 10**17, "s3://b/a.txt", None)],
        [Update("w1", "verified", None, None, False)],  # no artifact: no credit
        [Update("w1", None, "sha256:x", None, False)],  # now creditable
        [Update("w1", "paid", None, None, False), Update("w1", "rejected", None, None, True)],
        [Adjustment("o3", 10**18), Adjustment("o3", -(10**17))],
        [Update("w9", "verified", None, None, False)],  # unknown workload: retried
        [Adjustment(UNKNOWN, 5)],  # unknown orchestrator: retried
    ]

    async def scenario(workdir: Path) -> Model:
        live = workdir / "live.db"
        shutil.copyfile(template_db, live)
        engine = make_engine(f"sqlite+aiosqlite:///{live}", writer=True)
        reader = make_engine(f"sqlite+aiosqlite:///{live}", writer=False)
        try:
            run = Run(make_sessionmaker(engine), make_sessionmaker(reader))
            for batch in batches:
                await run.step(batch)
            # The unknown orchestrator's adjustment, redelivered until it is dead-lettered.
            for _ in range(MAX_ATTEMPTS - 1):
                await run.step([Redeliver(len(run.sent) - 1)])
            return run.model
        finally:
            await engine.dispose()
            await reader.dispose()

    with tempfile.TemporaryDirectory(dir=template_db.parent) as workdir:
        model = asyncio.run(scenario(Path(workdir)))
    assert model.entries == {
        "workload:w0": ("o1", 16_060_788_000_000, "workload_time"),
        "workload:w1": ("o2", 5 * 10**17, "workload"),
        "adjustment:adjustment:o3:key:1": ("o3", 10**18, "adjustment"),
        "adjustment:adjustment:o3:key:2": ("o3", -(10**17), "correction"),
    }
    assert model.workloads["w1"]["status"] == "paid"  # the stale "rejected" did not apply
    assert model.dead == 1
    assert model.retried == 2 + MAX_ATTEMPTS - 2
