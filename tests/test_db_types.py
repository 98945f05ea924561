"""The fast bind paths store exactly what SQLAlchemy's typed paths store.

- `UtcDateTime` on SQLite formats straight to DATETIME's text: compared with SQLAlchemy's own
  two-step processing over random aware datetimes (any offset).
- `insert_rows` (driver-level executemany) against `session.execute(insert(table), rows)`: the
  raw stored values of every column, on each configured backend.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import DateTime, delete, insert, select
from sqlalchemy.dialects import sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from contracts.events import LedgerEntryV1
from shared.db.engine import insert_rows, inserted_ids, make_engine, make_sessionmaker, select_in
from shared.db.lookups import KeyLookups
from shared.db.models import DeadLetter, LedgerEntry, OutboxMessage, ProcessedEvent, Workload
from shared.db.repositories import outbox
from shared.db.repositories.ledger import NewEntry, post_entries
from shared.db.types import UtcDateTime
from tests.harness import Database

SQLITE = sqlite.dialect()
FAST = UtcDateTime()._cached_bind_processor(SQLITE)


def typed_sqlite_text(value: datetime | None) -> Any:
    """SQLAlchemy's generic path: process_bind_param, then SQLite DATETIME's processor."""
    stepped = UtcDateTime().process_bind_param(value, SQLITE)
    processor = DateTime(timezone=False).dialect_impl(SQLITE).bind_processor(SQLITE)
    assert processor is not None
    return processor(stepped)


offsets = st.integers(min_value=-(24 * 60 - 1), max_value=24 * 60 - 1).map(
    lambda minutes: timezone(timedelta(minutes=minutes))
)
aware = st.datetimes(
    min_value=datetime(2, 1, 1), max_value=datetime(9998, 12, 30), timezones=offsets
)


@given(aware)
def test_sqlite_datetime_text_matches_sqlalchemy(value: datetime) -> None:
    assert FAST is not None
    assert FAST(value) == typed_sqlite_text(value)


def test_sqlite_datetime_edges() -> None:
    assert FAST is not None
    assert FAST(None) is None
    early = datetime(7, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert FAST(early) == "0007-01-02 03:04:05.000000" == typed_sqlite_text(early)
    with pytest.raises(ValueError, match="naive"):
        FAST(datetime(2024, 1, 1))
    # One instant in any offset is one text; naive is refused, before and after.
    moment = datetime(2024, 1, 1, tzinfo=UTC)
    plus_two = moment.astimezone(timezone(timedelta(hours=2)))
    assert FAST(moment) == FAST(plus_two) == FAST(moment) == "2024-01-01 00:00:00.000000"
    with pytest.raises(ValueError, match="naive"):
        FAST(datetime(2024, 1, 1))
    with pytest.raises(ValueError, match="naive"):
        typed_sqlite_text(datetime(2024, 1, 1))


WHEN = datetime(2024, 2, 29, 23, 59, 58, 123456, tzinfo=timezone(timedelta(hours=-7)))
ROWS: dict[Any, list[dict[str, Any]]] = {
    LedgerEntry.__table__: [  # type: ignore[attr-defined]
        {
            "entry_key": f"k{i}",
            "orchestrator_id": "orch-ü",
            "amount_wei": amount,
            "balance_after_wei": -amount,
            "reason": "workload_time",
            "source_stream": "WORKLOADS",
            "source_seq": 2**40 + i,
            "source_key": f"src{i}",
            "metadata": metadata,
            "occurred_at": WHEN + timedelta(microseconds=i),
            "corrects_entry_id": corrects,
        }
        for i, (amount, metadata, corrects) in enumerate(
            [
                (2**200, {"a": 1, "nested": {"x": [1, None, "é"]}}, None),
                (-5, {}, 7),
                (0, {"big": 2**70, "f": 1.5}, None),
            ]
        )
    ],
    Workload.__table__: [  # type: ignore[attr-defined]
        {
            "workload_id": f"w{i}",
            "orchestrator_id": "orch-1",
            "kind": "time",
            "status": "verified",
            "plan_id": None,
            "run_id": "r",
            "artifact_hash": None,
            "artifact_uri": "/out.webm",
            "notes": "n",
            "tx_hash": None,
            "job_id": "j",
            "payout_amount_wei": 10**30 + i,
            "duration_ms": 180_000,
            "credit_eth_per_minute": "0.000005353596",
            "body_sha256": "0" * 64,
            "submitted_at": WHEN,
            "updated_at": WHEN.astimezone(UTC),
            "credited": credited,
            "credited_at": WHEN if credited else None,
        }
        for i, credited in enumerate([True, False])
    ],
    ProcessedEvent.__table__: [  # type: ignore[attr-defined]
        {
            "consumer": "c",
            "event_key": f"e{i}",
            "stream": "WORKLOADS",
            "stream_seq": i,
            "outcome": outcome,
        }
        for i, outcome in enumerate([None, {"credited": True}, {"duplicate": False, "z": "ß"}])
    ],
    OutboxMessage.__table__: [  # type: ignore[attr-defined]
        {
            "stream": "LEDGER",
            "subject": "ledger.entries.orch-1",
            "event_key": f"ledger:k{i}",
            "schema_name": "ledger.entry.v1",
            "body": body,
            "created_at": WHEN,
        }
        for i, body in enumerate([b'{"a": 1}', b"\x00\xff"])
    ],
}


# The unique column of each table: the second copy of the rows gets a prefix there.
UNIQUE = {"ledger_entries": "entry_key", "workloads": "workload_id"}
UNIQUE |= {"processed_events": "event_key", "outbox": "event_key"}


async def test_insert_rows_stores_what_typed_insert_stores(database: Database) -> None:
    engine = make_engine(database.url)
    sessions = make_sessionmaker(engine)
    try:
        for table, rows in ROWS.items():
            unique = UNIQUE[table.name]
            copies = [{**row, unique: f"fast-{row[unique]}"} for row in rows]
            async with sessions() as session, session.begin():
                await session.execute(insert(table), rows)
                await insert_rows(session, table, copies)
            async with sessions() as session:
                typed, fast = await stored_rows(session, table, unique)
            assert fast == typed, table.name
            assert len(fast) == len(rows)
    finally:
        await engine.dispose()


async def stored_rows(
    session: AsyncSession, table: Any, unique: str
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """The rows as the driver returns them (no type processing), without the generated id:
    the originals and the prefixed copies, each by their unique column."""
    names = [c.name for c in table.columns if c.name != "id"]
    connection = await session.connection()
    result = await connection.exec_driver_sql(f"SELECT {', '.join(names)} FROM {table.name}")
    at = names.index(unique)
    typed: list[tuple[Any, ...]] = []
    fast: list[tuple[Any, ...]] = []
    for row in result.all():
        values = list(row)
        copy = values[at].startswith("fast-")
        values[at] = values[at].removeprefix("fast-")
        (fast if copy else typed).append(tuple(values))
    return sorted(typed, key=repr), sorted(fast, key=repr)


async def test_insert_rows_refuses_to_skip_a_default(database: Database) -> None:
    engine = make_engine(database.url)
    sessions = make_sessionmaker(engine)
    row = {
        "consumer": "c",
        "stream": "S",
        "subject": "s",
        "stream_seq": 1,
        "event_key": "k",
        "error": "e",
        "body": b"",
        "headers": {},
        "deliveries": 1,
        "created_at": WHEN,
    }  # no "status": SQLAlchemy would fill in its default
    try:
        async with sessions() as session, session.begin():
            with pytest.raises(ValueError, match="needs values"):
                await insert_rows(session, DeadLetter.__table__, [row])  # type: ignore[attr-defined]
    finally:
        await engine.dispose()


async def test_select_in_finds_keys_in_chunks(database: Database) -> None:
    engine = make_engine(database.url)
    sessions = make_sessionmaker(engine)
    table = ProcessedEvent.__table__  # type: ignore[attr-defined]
    rows = [
        {
            "consumer": consumer,
            "event_key": f"e{i}",
            "stream": "S",
            "stream_seq": i,
            "outcome": None,
        }
        for consumer in ("a", "b")
        for i in range(0, 1300, 2)
    ]
    try:
        async with sessions() as session, session.begin():
            await insert_rows(session, table, rows)
        wanted = [f"e{i}" for i in range(1300)] + ["e4", "missing"]
        async with sessions() as session:
            found = await select_in(
                session, table, ("event_key", "stream_seq"), "event_key", wanted, {"consumer": "a"}
            )
            assert set(found) == {(f"e{i}", i) for i in range(0, 1300, 2)}
            assert await select_in(session, table, ("event_key",), "event_key", []) == []
            one = await select_in(
                session, table, ("event_key",), "event_key", ["e2"], {"consumer": "b"}
            )
            assert one == [("e2",)]
            # A UTC datetime is read back through its type on every backend: not raw.
            entries = LedgerEntry.__table__  # type: ignore[attr-defined]
            with pytest.raises(ValueError, match="processing"):
                await select_in(session, entries, ("occurred_at",), "entry_key", ["k1"])
    finally:
        await engine.dispose()


async def test_key_lookups_read_what_select_in_reads_and_see_later_writes(
    database: Database,
) -> None:
    writer = make_engine(database.url)
    reader = make_engine(database.url, writer=False)
    sessions = make_sessionmaker(writer)
    lookups = KeyLookups(reader)
    table = ProcessedEvent.__table__  # type: ignore[attr-defined]

    def row(key: str, seq: int) -> dict[str, Any]:
        return {
            "consumer": "a",
            "event_key": key,
            "stream": "S",
            "stream_seq": seq,
            "outcome": None,
        }

    try:
        async with sessions() as session, session.begin():
            await insert_rows(session, table, [row(f"e{i}", i) for i in range(0, 700, 2)])

        wanted = [f"e{i}" for i in range(700)]
        async with sessions() as session:
            expected = await select_in(
                session, table, ("event_key", "stream_seq"), "event_key", wanted, {"consumer": "a"}
            )
        found = await lookups.select_in(
            table, ("event_key", "stream_seq"), "event_key", wanted, {"consumer": "a"}
        )
        assert sorted(found) == sorted(expected) and len(found) == 350
        assert await lookups.select_in(table, ("event_key",), "event_key", ["e1"]) == []
        # The held connection keeps no snapshot between lookups: a later commit is visible.
        async with sessions() as session, session.begin():
            await insert_rows(session, table, [row("e1", 1)])
        assert await lookups.select_in(table, ("event_key",), "event_key", ["e1"]) == [("e1",)]
    finally:
        await lookups.close()
        await reader.dispose()
        await writer.dispose()


OUTBOX_ROW = {
    "stream": "S",
    "subject": "s.x",
    "event_key": "between",
    "schema_name": "x.v1",
    "body": b"{}",
    "created_at": datetime(2026, 1, 1, tzinfo=UTC),
}


async def test_inserted_ids_are_the_ids_the_rows_got(database: Database) -> None:
    """The ids of an executemany's rows, by the consecutive-rowid rule on SQLite (also after
    deleted rows left gaps below them) and by key on PostgreSQL: the same as a lookup."""
    engine = make_engine(database.url)
    sessions = make_sessionmaker(engine)
    table = ProcessedEvent.__table__  # type: ignore[attr-defined]

    def rows(prefix: str, count: int) -> list[dict[str, Any]]:
        return [
            {"consumer": "c", "event_key": f"{prefix}{i}", "stream": "S", "stream_seq": i}
            | {"outcome": None}
            for i in range(count)
        ]

    try:
        got: dict[str, list[int]] = {}
        for prefix, count in (("a", 5), ("b", 1), ("c", 700)):
            async with sessions() as session, session.begin():
                await insert_rows(session, table, rows(prefix, count))
                keys = [f"{prefix}{i}" for i in range(count)]
                got[prefix] = await inserted_ids(session, table, "event_key", keys)
                if prefix == "a":  # a gap below the next rows
                    await session.execute(delete(table).where(table.c.event_key == "a2"))
        async with sessions() as session, session.begin():
            # Another table's INSERT in between: last_insert_rowid() is its row's, the check
            # finds other keys at those ids, and the ids are looked up instead.
            await insert_rows(session, table, rows("d", 3))
            await session.execute(insert(OutboxMessage.__table__), [OUTBOX_ROW])  # type: ignore[attr-defined]
            got["d"] = await inserted_ids(session, table, "event_key", ["d0", "d1", "d2"])
        async with sessions() as session:
            stored = dict(
                (await session.execute(select(table.c.event_key, table.c.id))).tuples().all()
            )
        assert "a2" not in stored
        stored["a2"] = got["a"][2]  # deleted since
        for prefix, ids in got.items():
            assert ids == [stored[f"{prefix}{i}"] for i in range(len(ids))]
        assert len(set(got["a"] + got["b"] + got["c"] + got["d"])) == 709
    finally:
        await engine.dispose()


ENTRY_METADATA: list[dict[str, Any]] = [
    {},
    {"workload_id": "w-1", "duration_ms": "180000", "artifact_uri": None},
    {"notes": "naïve café ✓", "nested": {"list": [1, 2.5, None, True], "big": 10**40}},
]


async def test_ledger_messages_are_the_models_own_json(database: Database) -> None:
    """The LEDGER bodies post_entries queues, written without the model, are byte for byte
    what LedgerEntryV1.model_dump_json gives for the stored entry."""
    engine = make_engine(database.url)
    sessions = make_sessionmaker(engine)
    occurred = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    entries = [
        NewEntry(
            entry_key=f"k{i}",
            orchestrator_id="o-json",
            amount_wei=amount,
            reason="workload_time",
            source_stream="WORKLOADS",
            source_seq=i + 1,
            source_key=f"s{i}",
            occurred_at=occurred + timedelta(seconds=i) if i else occurred.replace(microsecond=0),
            metadata=ENTRY_METADATA[i % len(ENTRY_METADATA)],
        )
        for i, amount in enumerate([1, 10**30, -(10**20), 0, 5 * 10**18])
    ]
    try:
        async with sessions() as session, session.begin():
            posted = await post_entries(session, entries)
            queued = outbox.pending_of(session)
        assert len(queued) == len(entries)
        for item, message in zip(posted, queued, strict=True):
            model = LedgerEntryV1(
                entry_id=item.entry_id,
                entry_key=item.entry.entry_key,
                orchestrator_id=item.entry.orchestrator_id,
                amount_wei=item.entry.amount_wei,
                balance_after_wei=item.balance_after_wei,
                reason=item.entry.reason,
                source_stream=item.entry.source_stream,
                source_seq=item.entry.source_seq,
                source_key=item.entry.source_key,
                metadata=item.entry.metadata,
                occurred_at=item.entry.occurred_at,
            )
            assert message.body == model.model_dump_json().encode()
            assert message.schema_name == LedgerEntryV1.SCHEMA
            assert message.event_key == f"ledger:{item.entry.entry_key}"
    finally:
        await engine.dispose()
