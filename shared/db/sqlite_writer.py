"""SQLite writer connections that run a transaction's statements on the event loop's thread.

aiosqlite runs every call on a thread of its own and hands each result back to the event loop.
Under SQLAlchemy one statement is about four such calls (cursor, execute, fetch, close), and
each hand-off (a queue, a thread wake-up, a callback into the loop, the GIL changing hands)
costs more than the statement itself: a heartbeat's update or a 512-row insert take
microseconds to a few milliseconds in SQLite. Profiled, the ledger worker spent about a
quarter of its main thread on hand-offs and waits for them (bench/README.md, session 6).

So a writer connection runs a call inline when it cannot wait for anyone: inside a write
transaction, which SQLite's writers open with BEGIN IMMEDIATE, so this connection already holds
the database's write lock. The calls that can wait still go to aiosqlite's thread, and the loop
goes on serving NATS (fetches, acks, the outbox relay) in the meantime:
- anything outside a transaction: BEGIN IMMEDIATE waits (up to busy_timeout) while another
  process writes; connecting and closing;
- COMMIT: with synchronous=FULL it waits for the disk.
Reader engines (the api's, the CLI's) keep plain aiosqlite connections: a long read must not
stall their loop, and readers gain little (they read, they do not batch writes).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import aiosqlite
from sqlalchemy.dialects.sqlite.aiosqlite import SQLiteDialect_aiosqlite
from sqlalchemy.engine import make_url

# aiosqlite.connect's default: rows a cursor's async iteration fetches per hand-off.
ITER_CHUNK_ROWS = 64


class LoopThreadWriter(aiosqlite.Connection):
    """An aiosqlite connection whose calls inside a write transaction run on the caller's thread.

    Only the event loop's coroutines call it (SQLAlchemy awaits each call before the next), so
    a call inline never overlaps one still running on aiosqlite's thread.
    """

    async def _execute(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        connection = self._connection
        if connection is not None and connection.in_transaction and fn != connection.commit:
            return fn(*args, **kwargs)
        return await super()._execute(fn, *args, **kwargs)  # type: ignore[no-untyped-call]


def writer_connector(url: str) -> Callable[[], Awaitable[aiosqlite.Connection]]:
    """`create_async_engine(async_creator=...)` for a writer engine on the database `url`."""
    # The arguments SQLAlchemy itself would open the file with (check_same_thread=False among
    # them: the connection is opened on aiosqlite's thread and used from the loop's too).
    args, kwargs = SQLiteDialect_aiosqlite().create_connect_args(make_url(url))

    async def connect() -> aiosqlite.Connection:
        connector = partial(sqlite3.connect, *args, **kwargs)
        connection = LoopThreadWriter(connector, ITER_CHUNK_ROWS)
        # As SQLAlchemy does for aiosqlite: a connection left open must not keep the process up.
        connection._thread.daemon = True
        return await connection

    return connect
