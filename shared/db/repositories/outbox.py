"""The transactional outbox: messages written with their effect, published after the commit."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from contracts.events import EventModel
from shared.db.engine import insert_rows, inserted_ids
from shared.db.models import OutboxMessage

_TABLE = OutboxMessage.__table__  # type: ignore[attr-defined]
# Where the rows written in the current transaction are collected for the relay.
SESSION_OUTBOX = "outbox_pending"


@dataclass(frozen=True)
class PendingOutbox:
    """A row the current transaction wrote, kept in memory so the relay publishes it after the
    commit without reading it back (the sweeper reads the table for anything left behind)."""

    id: int
    stream: str
    subject: str
    event_key: str
    schema_name: str
    body: bytes


def pending_of(session: AsyncSession) -> list[PendingOutbox]:
    """Take the rows the session's transaction wrote (call after the commit)."""
    return list(session.info.pop(SESSION_OUTBOX, []))


async def add(
    session: AsyncSession, *, stream: str, subject: str, event: EventModel, key: str
) -> int:
    body = event.model_dump_json().encode("utf-8")
    result = await session.execute(
        insert(_TABLE)
        .values(
            stream=stream,
            subject=subject,
            event_key=key,
            schema_name=event.SCHEMA,
            body=body,
            created_at=datetime.now(UTC),
        )
        .returning(_TABLE.c.id)
    )
    new_id = int(result.scalar_one())
    pending = PendingOutbox(new_id, stream, subject, key, event.SCHEMA, body)
    session.info.setdefault(SESSION_OUTBOX, []).append(pending)
    return new_id


async def load(session: AsyncSession, ids: Sequence[int]) -> list[OutboxMessage]:
    if not ids:
        return []
    rows = await session.execute(
        select(OutboxMessage)
        .where(col(OutboxMessage.id).in_(list(ids)), col(OutboxMessage.published_at).is_(None))
        .order_by(col(OutboxMessage.id))
    )
    return list(rows.scalars())


async def stale(session: AsyncSession, older_than_s: float, limit: int) -> list[OutboxMessage]:
    cutoff = datetime.now(UTC) - timedelta(seconds=older_than_s)
    rows = await session.execute(
        select(OutboxMessage)
        .where(col(OutboxMessage.published_at).is_(None), col(OutboxMessage.created_at) < cutoff)
        .order_by(col(OutboxMessage.id))
        .limit(limit)
    )
    return list(rows.scalars())


async def mark_published(session: AsyncSession, ids: Sequence[int]) -> None:
    if ids:
        await session.execute(
            update(_TABLE).where(_TABLE.c.id.in_(list(ids))).values(published_at=datetime.now(UTC))
        )


async def pending_count(session: AsyncSession) -> int:
    rows = await session.execute(select(_TABLE.c.id).where(_TABLE.c.published_at.is_(None)))
    return len(rows.all())


class OutboxDraft(NamedTuple):
    """A message to queue, its body already serialized."""

    stream: str
    subject: str
    event_key: str
    schema_name: str
    body: bytes


async def add_many(
    session: AsyncSession, rows: Sequence[tuple[str, str, EventModel, str]]
) -> list[int]:
    """Insert (stream, subject, event, key) rows in one statement; returns their ids in order."""
    return await add_bodies(
        session,
        [
            OutboxDraft(stream, subject, key, event.SCHEMA, event.model_dump_json().encode("utf-8"))
            for stream, subject, event, key in rows
        ],
    )


async def add_bodies(session: AsyncSession, drafts: Sequence[OutboxDraft]) -> list[int]:
    """Insert messages whose bodies are serialized already; returns their ids in order."""
    if not drafts:
        return []
    now = datetime.now(UTC)
    await insert_rows(
        session,
        _TABLE,
        [
            {
                "stream": stream,
                "subject": subject,
                "event_key": key,
                "schema_name": schema,
                "body": body,
                "created_at": now,
            }
            for stream, subject, key, schema, body in drafts
        ],
    )
    # Ids after the insert rather than RETURNING: see ledger.post_entries.
    ids = await inserted_ids(session, _TABLE, "event_key", [draft.event_key for draft in drafts])
    pending = [PendingOutbox(row_id, *draft) for row_id, draft in zip(ids, drafts, strict=True)]
    session.info.setdefault(SESSION_OUTBOX, []).extend(pending)
    return [row.id for row in pending]
