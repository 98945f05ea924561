"""SQLite writer connections: a transaction's statements on the loop's thread, waits off it.

shared.db.sqlite_writer runs the statements inside a write transaction inline (they cannot wait
for anyone) and sends BEGIN (which waits for another process's write lock) and COMMIT (which
waits for the disk) to aiosqlite's thread. Checked here by the thread SQLite reports each
statement on, and by the event loop still running while another connection holds the lock.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path

from sqlalchemy import text

from shared.db.engine import make_engine, make_sessionmaker

LOCK_HELD_S = 0.5
TICK_S = 0.01


def sqlite_url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


def create_table(path: Path) -> None:
    with sqlite3.connect(path) as connection:
        # WAL as the writer engines set it: switching needs the lock the last test holds.
        connection.execute("pragma journal_mode=wal")
        connection.execute("create table notes (body text not null)")


async def traced_statements(url: str, writer: bool) -> list[tuple[str, bool]]:
    """Each statement of one small write transaction, and whether it ran on the loop's thread."""
    loop_thread = threading.get_ident()
    seen: list[tuple[str, bool]] = []
    engine = make_engine(url, writer=writer)
    try:
        async with engine.connect() as connection:
            raw = await connection.get_raw_connection()

            def trace(sql: str) -> None:
                seen.append((sql.split()[0].upper(), threading.get_ident() == loop_thread))

            await raw.driver_connection.set_trace_callback(trace)
            async with connection.begin():
                await connection.execute(text("insert into notes (body) values ('a')"))
                await connection.execute(text("select count(*) from notes"))
    finally:
        await engine.dispose()
    return seen


async def test_a_writer_runs_statements_inline_and_begin_and_commit_off_the_loop(
    tmp_path: Path,
) -> None:
    path = tmp_path / "writer.db"
    create_table(path)
    seen = await traced_statements(sqlite_url(path), writer=True)
    assert seen == [("BEGIN", False), ("INSERT", True), ("SELECT", True), ("COMMIT", False)]


async def test_a_reader_engine_keeps_every_call_on_aiosqlites_thread(tmp_path: Path) -> None:
    path = tmp_path / "reader.db"
    create_table(path)
    seen = await traced_statements(sqlite_url(path), writer=False)
    assert [statement for statement, _ in seen] == ["BEGIN", "INSERT", "SELECT", "COMMIT"]
    assert not any(inline for _, inline in seen)


async def test_waiting_for_another_writers_lock_leaves_the_loop_running(tmp_path: Path) -> None:
    path = tmp_path / "locked.db"
    create_table(path)
    holding = threading.Event()

    def hold_the_write_lock() -> None:
        with sqlite3.connect(path, isolation_level=None) as other:
            other.execute("begin immediate")
            other.execute("insert into notes (body) values ('other')")
            holding.set()
            time.sleep(LOCK_HELD_S)
            other.execute("commit")

    holder = threading.Thread(target=hold_the_write_lock)
    holder.start()
    await asyncio.to_thread(holding.wait)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(TICK_S)
            ticks += 1

    ticker = asyncio.create_task(tick())
    engine = make_engine(sqlite_url(path))
    started = time.monotonic()
    try:
        async with make_sessionmaker(engine)() as session, session.begin():
            await session.execute(text("insert into notes (body) values ('ours')"))
        waited = time.monotonic() - started
        async with make_sessionmaker(engine)() as session:
            bodies = (await session.execute(text("select body from notes order by rowid"))).all()
    finally:
        ticker.cancel()
        await engine.dispose()
        holder.join()
    assert waited >= LOCK_HELD_S * 0.5  # it did wait for the other writer
    # The loop kept running meanwhile: a blocked loop would have ticked at most once.
    assert ticks >= (LOCK_HELD_S * 0.5) / TICK_S / 2
    assert [body for (body,) in bodies] == ["other", "ours"]
