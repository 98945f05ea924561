"""Ledger reads and writes: append-only entries and the balances they sum to.

`post_entries` is the only way money moves. In one transaction it writes the entries, moves
each balance by exactly their sum, and queues each entry for the LEDGER stream (outbox). The
unique `entry_key` makes a second entry for the same source impossible in the database.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import Any

from pydantic_core import to_json
from sqlalchemy import bindparam, func, select, update
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from contracts import subjects
from contracts.events import LedgerEntryV1
from contracts.streams import LEDGER
from shared.db.engine import (
    PreparedInsert,
    dialect_name,
    insert_for,
    inserted_ids,
    prepare_insert,
    run_insert,
    select_in,
)
from shared.db.models import Balance, LedgerEntry
from shared.db.repositories import outbox

_ENTRIES = LedgerEntry.__table__  # type: ignore[attr-defined]
_BALANCES = Balance.__table__  # type: ignore[attr-defined]
# Each entry's LEDGER subject; a pure function of the orchestrator id, worked out once per id.
_ledger_subject = lru_cache(maxsize=4096)(subjects.ledger_entry)


@dataclass(frozen=True)
class NewEntry:
    entry_key: str
    orchestrator_id: str
    amount_wei: int
    reason: str
    source_stream: str
    source_seq: int
    source_key: str
    occurred_at: datetime
    metadata: dict[str, Any] = field(default_factory=dict)
    corrects_entry_id: int | None = None


@dataclass(frozen=True)
class PostedEntry:
    entry_id: int
    entry: NewEntry
    balance_after_wei: int


async def existing_entry_keys(session: AsyncSession, keys: Sequence[str]) -> set[str]:
    unique = list(dict.fromkeys(keys))
    return {
        key for (key,) in await select_in(session, _ENTRIES, ("entry_key",), "entry_key", unique)
    }


async def _lock_balances(session: AsyncSession, ids: list[str]) -> dict[str, int]:
    """Current balances of `ids`, rows created at zero when missing and locked until commit.

    PostgreSQL locks the rows (sorted, so two workers never deadlock); SQLite's writer already
    holds the database write lock (BEGIN IMMEDIATE).
    """
    await session.execute(
        insert_for(session)(_BALANCES).on_conflict_do_nothing(index_elements=["orchestrator_id"]),
        [{"orchestrator_id": oid, "balance_wei": 0, "entry_count": 0} for oid in ids],
    )
    query = (
        select(_BALANCES.c.orchestrator_id, _BALANCES.c.balance_wei)
        .where(_BALANCES.c.orchestrator_id.in_(ids))
        .order_by(_BALANCES.c.orchestrator_id)
    )
    if dialect_name(session) == "postgresql":
        query = query.with_for_update()
    rows = await session.execute(query)
    return {oid: int(value) for oid, value in rows.all()}


@dataclass(frozen=True)
class EntryDrafts:
    """Entries with their INSERT values built, all but each balance after (known only once the
    balances are locked). Building them needs no database, so a consumer can do it before it
    takes the write lock."""

    entries: list[NewEntry]
    insert: PreparedInsert
    balance_position: int
    balance_processor: Callable[[Any], Any] | None


def draft_entries(dialect: Dialect, entries: Sequence[NewEntry]) -> EntryDrafts:
    rows = [_entry_row(entry, 0) for entry in entries]
    prepared = prepare_insert(dialect, _ENTRIES, rows)
    wei_type = _ENTRIES.c.balance_after_wei.type.dialect_impl(dialect)
    return EntryDrafts(
        list(entries),
        prepared,
        prepared.columns.index("balance_after_wei") if rows else -1,
        wei_type.bind_processor(dialect),
    )


async def post_entries(session: AsyncSession, entries: Sequence[NewEntry]) -> list[PostedEntry]:
    """Append entries and move balances; entries whose key already exists are skipped."""
    if not entries:
        return []
    known = await existing_entry_keys(session, [e.entry_key for e in entries])
    fresh: list[NewEntry] = []
    for entry in entries:
        if entry.entry_key not in known:
            known.add(entry.entry_key)
            fresh.append(entry)
    if not fresh:
        return []
    connection = await session.connection()
    return await post_drafts(session, draft_entries(connection.dialect, fresh))


async def post_drafts(session: AsyncSession, drafts: EntryDrafts) -> list[PostedEntry]:
    """Append drafted entries and move balances. An entry whose key exists already is not
    skipped: its INSERT fails on the unique key (IntegrityError) and rolls the batch back."""
    fresh = drafts.entries
    if not fresh:
        return []
    balances = await _lock_balances(session, sorted({e.orchestrator_id for e in fresh}))
    position, processor = drafts.balance_position, drafts.balance_processor
    parameters, after = [], []
    for entry, values in zip(fresh, drafts.insert.parameters, strict=True):
        balance = balances[entry.orchestrator_id] + entry.amount_wei
        balances[entry.orchestrator_id] = balance
        after.append(balance)
        row = list(values)
        row[position] = processor(balance) if processor is not None else balance
        parameters.append(tuple(row))
    # A plain executemany, then the ids by key: INSERT ... RETURNING with parameter order
    # makes SQLite run one statement per row, which cost most of a batch's time.
    await run_insert(session, PreparedInsert(drafts.insert.sql, drafts.insert.columns, parameters))
    ids = await inserted_ids(session, _ENTRIES, "entry_key", [e.entry_key for e in fresh])
    posted = [PostedEntry(i, e, b) for i, e, b in zip(ids, fresh, after, strict=True)]
    await _move_balances(session, posted)
    await outbox.add_bodies(session, [_ledger_message(p) for p in posted])
    return posted


def _entry_row(entry: NewEntry, balance_after_wei: int) -> dict[str, Any]:
    return {
        "entry_key": entry.entry_key,
        "orchestrator_id": entry.orchestrator_id,
        "amount_wei": entry.amount_wei,
        "balance_after_wei": balance_after_wei,
        "reason": entry.reason,
        "source_stream": entry.source_stream,
        "source_seq": entry.source_seq,
        "source_key": entry.source_key,
        "metadata": entry.metadata,
        "occurred_at": entry.occurred_at,
        "corrects_entry_id": entry.corrects_entry_id,
    }


async def _move_balances(session: AsyncSession, posted: Sequence[PostedEntry]) -> None:
    last: dict[str, PostedEntry] = {}
    counts: dict[str, int] = {}
    for item in posted:
        last[item.entry.orchestrator_id] = item
        counts[item.entry.orchestrator_id] = counts.get(item.entry.orchestrator_id, 0) + 1
    await session.execute(
        update(_BALANCES)
        .where(_BALANCES.c.orchestrator_id == bindparam("oid"))
        .values(
            balance_wei=bindparam("new_balance"),
            entry_count=_BALANCES.c.entry_count + bindparam("added"),
            last_entry_id=bindparam("last_id"),
        ),
        [
            {
                "oid": oid,
                "new_balance": item.balance_after_wei,
                "added": counts[oid],
                "last_id": item.entry_id,
            }
            for oid, item in last.items()
        ],
    )


def _ledger_message(posted: PostedEntry) -> outbox.OutboxDraft:
    """The entry's LEDGER message: LedgerEntryV1's JSON, written directly.

    Built under the write lock once per entry, where constructing and dumping the model cost
    three times as much; tests/test_db_types.py checks that the bytes are the model's own.
    """
    entry = posted.entry
    body = to_json(
        {
            "entry_id": posted.entry_id,
            "entry_key": entry.entry_key,
            "orchestrator_id": entry.orchestrator_id,
            "amount_wei": entry.amount_wei,
            "balance_after_wei": posted.balance_after_wei,
            "reason": entry.reason,
            "source_stream": entry.source_stream,
            "source_seq": entry.source_seq,
            "source_key": entry.source_key,
            "metadata": entry.metadata,
            "occurred_at": entry.occurred_at,
        }
    )
    return outbox.OutboxDraft(
        LEDGER.name,
        _ledger_subject(entry.orchestrator_id),
        f"ledger:{entry.entry_key}",
        LedgerEntryV1.SCHEMA,
        body,
    )


# -- reads ------------------------------------------------------------------------------------


async def balance_wei(session: AsyncSession, orchestrator_id: str) -> int:
    row = await session.execute(
        select(_BALANCES.c.balance_wei).where(_BALANCES.c.orchestrator_id == orchestrator_id)
    )
    value = row.scalar_one_or_none()
    return int(value) if value is not None else 0


async def balances_wei(session: AsyncSession, ids: list[str] | None = None) -> dict[str, int]:
    query = select(_BALANCES.c.orchestrator_id, _BALANCES.c.balance_wei)
    if ids is not None:
        if not ids:
            return {}
        query = query.where(_BALANCES.c.orchestrator_id.in_(ids))
    rows = await session.execute(query)
    return {orchestrator_id: int(value) for orchestrator_id, value in rows.all()}


async def entry_sums_wei(session: AsyncSession) -> dict[str, int]:
    """Sum of entries per orchestrator, computed in Python (SQLite stores wei as text)."""
    sums: dict[str, int] = {}
    rows = await session.stream(select(_ENTRIES.c.orchestrator_id, _ENTRIES.c.amount_wei))
    async for orchestrator_id, amount in rows:
        sums[orchestrator_id] = sums.get(orchestrator_id, 0) + int(amount)
    return sums


async def recent_entries(
    session: AsyncSession, orchestrator_id: str | None, limit: int
) -> list[LedgerEntry]:
    query = select(LedgerEntry).order_by(col(LedgerEntry.id).desc()).limit(limit)
    if orchestrator_id is not None:
        query = query.where(col(LedgerEntry.orchestrator_id) == orchestrator_id)
    return list((await session.execute(query)).scalars())


async def entries_since(
    session: AsyncSession, orchestrator_id: str, since: datetime
) -> list[LedgerEntry]:
    query = (
        select(LedgerEntry)
        .where(
            col(LedgerEntry.orchestrator_id) == orchestrator_id,
            col(LedgerEntry.occurred_at) >= since,
        )
        .order_by(col(LedgerEntry.id))
    )
    return list((await session.execute(query)).scalars())


async def entry_count(session: AsyncSession) -> int:
    return int((await session.execute(select(func.count()).select_from(_ENTRIES))).scalar_one())
