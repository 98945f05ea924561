"""Operator actions on dead letters: list them, and publish them again to their subjects.

A retried message keeps its event key (header Payments-Event-Key), so if the original was
applied meanwhile the worker only acks it; its Nats-Msg-Id gets a `#retry-<id>` suffix so the
stream's duplicate window does not swallow it.
"""

from __future__ import annotations

from collections.abc import Sequence

from contracts.events import EVENT_KEY_HEADER, MSG_ID_HEADER
from shared.db.engine import make_engine, make_sessionmaker
from shared.db.models import DeadLetter
from shared.db.repositories import dead_letters
from shared.nats_client import connect
from shared.publishing import PUBLISH_TIMEOUT_S
from shared.settings import Settings


def describe(letter: DeadLetter) -> str:
    return (
        f"{letter.id}\t{letter.status}\t{letter.consumer}\t{letter.stream}#{letter.stream_seq}\t"
        f"{letter.subject}\tdeliveries={letter.deliveries}\t{letter.error}"
    )


async def list_dead_letters(settings: Settings, include_retried: bool, limit: int) -> list[str]:
    engine = make_engine(settings.resolved_database_url, writer=False)
    try:
        async with make_sessionmaker(engine)() as session:
            letters = await dead_letters.list_letters(
                session, status=None if include_retried else "dead", limit=limit
            )
    finally:
        await engine.dispose()
    return [describe(letter) for letter in letters] or ["no dead letters"]


async def retry_dead_letters(settings: Settings, ids: Sequence[int], retry_all: bool) -> list[str]:
    engine = make_engine(settings.resolved_database_url)
    sessions = make_sessionmaker(engine)
    nc = await connect(settings, "ops", "payments-dlq")
    lines = []
    try:
        async with sessions() as session:
            if retry_all:
                letters = await dead_letters.list_letters(session, status="dead", limit=10_000)
            else:
                found = [await dead_letters.get_letter(session, i) for i in ids]
                letters = [letter for letter in found if letter is not None]
        for letter in letters:
            assert letter.id is not None
            headers = dict(letter.headers or {})
            key = letter.event_key or f"dead-letter:{letter.id}"
            headers[EVENT_KEY_HEADER] = key
            headers[MSG_ID_HEADER] = f"{key}#retry-{letter.id}"
            ack = await nc.jetstream().publish(
                letter.subject,
                letter.body,
                stream=letter.stream,
                headers=headers,
                timeout=PUBLISH_TIMEOUT_S,
            )
            async with sessions() as session, session.begin():
                await dead_letters.mark_retried(session, letter.id)
            if ack.duplicate:
                # Retried moments ago: the stream's duplicate window kept the earlier copy.
                lines.append(f"{letter.id}\talready retried as {letter.stream}#{ack.seq}")
            else:
                lines.append(f"{letter.id}\tretried as {letter.stream}#{ack.seq}")
    finally:
        await nc.close()
        await engine.dispose()
    return lines or ["nothing to retry"]
