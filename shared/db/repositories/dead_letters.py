"""Dead letters: messages a worker terminated, kept with their subject, sequence, error and body."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from shared.db.engine import insert_for
from shared.db.models import DeadLetter

_TABLE = DeadLetter.__table__  # type: ignore[attr-defined]
MAX_ERROR_CHARS = 2000


@dataclass(frozen=True)
class NewDeadLetter:
    consumer: str
    stream: str
    subject: str
    stream_seq: int
    event_key: str | None
    error: str
    body: bytes
    headers: dict[str, str]
    deliveries: int


async def record(session: AsyncSession, letters: Sequence[NewDeadLetter]) -> None:
    """Insert dead letters; a message dead-lettered twice (a redelivery) keeps its first row."""
    if not letters:
        return
    now = datetime.now(UTC)
    statement = insert_for(session)(_TABLE).on_conflict_do_nothing(
        index_elements=["consumer", "stream", "stream_seq"]
    )
    await session.execute(
        statement,
        [
            {
                "consumer": letter.consumer,
                "stream": letter.stream,
                "subject": letter.subject,
                "stream_seq": letter.stream_seq,
                "event_key": letter.event_key,
                "error": letter.error[:MAX_ERROR_CHARS],
                "body": letter.body,
                "headers": letter.headers,
                "deliveries": letter.deliveries,
                "status": "dead",
                "created_at": now,
            }
            for letter in letters
        ],
    )


async def list_letters(
    session: AsyncSession, status: str | None = "dead", limit: int = 100
) -> list[DeadLetter]:
    query = select(DeadLetter).order_by(col(DeadLetter.id).desc()).limit(limit)
    if status:
        query = query.where(col(DeadLetter.status) == status)
    return list((await session.execute(query)).scalars())


async def get_letter(session: AsyncSession, letter_id: int) -> DeadLetter | None:
    return await session.get(DeadLetter, letter_id)


async def mark_retried(session: AsyncSession, letter_id: int) -> None:
    await session.execute(
        update(_TABLE)
        .where(_TABLE.c.id == letter_id)
        .values(status="retried", retried_at=datetime.now(UTC))
    )
