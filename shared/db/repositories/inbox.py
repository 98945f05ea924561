"""The processed-events inbox: which event keys a consumer has already applied."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncSession

from shared.db.engine import PreparedInsert, prepare_insert, run_insert, select_in
from shared.db.models import ProcessedEvent

_TABLE = ProcessedEvent.__table__  # type: ignore[attr-defined]


async def existing_keys(session: AsyncSession, consumer: str, keys: Iterable[str]) -> set[str]:
    wanted = list(dict.fromkeys(keys))
    rows = await select_in(
        session, _TABLE, ("event_key",), "event_key", wanted, equal={"consumer": consumer}
    )
    return {key for (key,) in rows}


# (event_key, stream, stream_seq, outcome) of one applied event.
InboxRow = tuple[str, str, int, dict[str, Any] | None]


def draft(dialect: Dialect, consumer: str, rows: Sequence[InboxRow]) -> PreparedInsert:
    """The INSERT of (event_key, stream, stream_seq, outcome) rows, built before the write lock;
    run in a transaction, the unique key rejects an event key that is there already."""
    return prepare_insert(
        dialect,
        _TABLE,
        [
            {
                "consumer": consumer,
                "event_key": key,
                "stream": stream,
                "stream_seq": seq,
                "outcome": outcome,
            }
            for key, stream, seq, outcome in rows
        ],
    )


async def record(session: AsyncSession, consumer: str, rows: Sequence[InboxRow]) -> None:
    """Insert (event_key, stream, stream_seq, outcome) rows; the unique key rejects a second one."""
    if rows:
        connection = await session.connection()
        await run_insert(session, draft(connection.dialect, consumer, rows))


async def outcome_of(session: AsyncSession, consumer: str, key: str) -> dict[str, Any] | None:
    """The stored outcome, or None while the event has not been applied."""
    row = await session.execute(
        select(_TABLE.c.outcome).where(_TABLE.c.consumer == consumer, _TABLE.c.event_key == key)
    )
    found = row.first()
    if found is None:
        return None
    return dict(found[0] or {"applied": True})
