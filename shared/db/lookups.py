"""Key lookups that each cost one hand-off to the database driver: the api's per-request reads.

Why: on SQLite a read through an AsyncSession makes about nine hand-offs between the event
loop and aiosqlite's thread (pool checkout, BEGIN, cursor, execute, fetch, close, ROLLBACK,
reset), about 1.7 ms of CPU on the development VM; `POST /api/workloads/time` makes one such
read per request to find a repeated or reused workload id, and that read alone held the route
to ~500 requests/s. The same lookup as a single `execute_fetchall` costs 65-116 µs.

How: on SQLite, one connection of the engine, taken at the first lookup, stays checked out
for the process's life, and its aiosqlite connection runs each lookup in one call.
shared.db.engine puts SQLite connections in autocommit, so a lookup is one statement,
consistent on its own, and holds no transaction between calls. On PostgreSQL a pooled
connection runs the same compiled statement. Statements and parameters are select_in's
(compiled once per shape, values through the columns' bind processors), so both paths read
the same rows.

Limits: one statement, raw values (select_in refuses columns that need result processing).
Reads that need several statements to agree use a session and its transaction.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Table
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from shared.db.engine import is_sqlite, select_in_on, select_in_with


class KeyLookups:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._sqlite = is_sqlite(str(engine.url))
        self._held: AsyncConnection | None = None
        self._driver: Any = None  # the aiosqlite connection on SQLite, from the first lookup
        self._connecting = asyncio.Lock()

    async def _sqlite_driver(self) -> Any:
        # Connected on first use, as the pool's connections are: the api starts even while
        # the database file is not there yet, and a lookup fails then as a session read would.
        async with self._connecting:
            if self._driver is None:
                held = await self.engine.connect()
                try:
                    raw = await held.get_raw_connection()
                except BaseException:
                    await held.close()
                    raise
                self._held, self._driver = held, raw.driver_connection
        return self._driver

    async def close(self) -> None:
        if self._held is not None:
            await self._held.close()
        self._held = self._driver = None

    async def select_in(
        self,
        table: Table,
        columns: tuple[str, ...],
        key: str,
        keys: Sequence[Any],
        equal: Mapping[str, Any] | None = None,
    ) -> list[tuple[Any, ...]]:
        """select_in's rows, read in one hand-off per statement."""
        if not keys:
            return []
        if self._sqlite:
            driver = await self._sqlite_driver()

            async def on_driver(sql: str, parameters: tuple[Any, ...]) -> Sequence[Any]:
                return list(await driver.execute_fetchall(sql, parameters))

            dialect = self.engine.dialect
            return await select_in_with(on_driver, dialect, table, columns, key, keys, equal)
        async with self.engine.connect() as connection:
            return await select_in_on(connection, table, columns, key, keys, equal)
