"""Async engines. SQLite is tuned for one writer at a time across processes; PostgreSQL as is."""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

from sqlalchemy import Table, bindparam, event, insert, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from shared.db import json_text
from shared.db.sqlite_writer import writer_connector

# How long a SQLite writer waits for another process's write lock before failing.
SQLITE_BUSY_TIMEOUT_MS = 30_000
POSTGRES_POOL_SIZE = 10


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


# SQLite writer engines, whose write transactions take turns in-process (see write_turn).
_SQLITE_WRITERS: weakref.WeakSet[Any] = weakref.WeakSet()
_WRITE_TURNS: weakref.WeakKeyDictionary[Any, tuple[asyncio.AbstractEventLoop, asyncio.Lock]]
_WRITE_TURNS = weakref.WeakKeyDictionary()


def _configure_sqlite(engine: AsyncEngine, writer: bool) -> None:
    if writer:
        _SQLITE_WRITERS.add(engine.sync_engine)

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event decide how transactions start (see below).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk before we ack the message that caused it.
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Any) -> None:
        # A writer takes the write lock up front: a deferred transaction that reads and then
        # writes can fail at once with SQLITE_BUSY instead of waiting for busy_timeout.
        connection.exec_driver_sql("BEGIN IMMEDIATE" if writer else "BEGIN")


def make_engine(url: str, *, writer: bool = True) -> AsyncEngine:
    if is_sqlite(url):
        # Writers run their transactions' statements on the loop's thread (see sqlite_writer).
        creator = {"async_creator": writer_connector(url)} if writer else {}
        engine = create_async_engine(url, json_serializer=json_text.dumps, **creator)
        _configure_sqlite(engine, writer)
        return engine
    return create_async_engine(
        url, json_serializer=json_text.dumps, pool_size=POSTGRES_POOL_SIZE, pool_pre_ping=True
    )


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


@contextlib.asynccontextmanager
async def write_turn(sessionmaker: async_sessionmaker[AsyncSession]) -> AsyncIterator[None]:
    """Wrap a SQLite write transaction so this process's writers take turns in the event loop.

    Two transactions of one process (a consumer's batch, the outbox relay's bookkeeping) would
    otherwise meet at SQLite's write lock, where the loser sleeps in SQLite's busy handler
    (up to 100 ms a try) past the moment the lock is free; profiled, the ledger worker's
    connections spent most of their time in that sleep. Here the next writer starts as soon
    as the previous one ends.
    Other processes still meet at the lock and wait through busy_timeout, as before. A no-op
    for PostgreSQL and read-only SQLite engines. Not reentrant: never nest two turns.
    """
    bind = sessionmaker.kw.get("bind")
    engine = getattr(bind, "sync_engine", None)
    if engine is None or engine not in _SQLITE_WRITERS:
        yield
        return
    loop = asyncio.get_running_loop()
    turn = _WRITE_TURNS.get(engine)
    if turn is None or turn[0] is not loop:
        turn = (loop, asyncio.Lock())
        _WRITE_TURNS[engine] = turn
    async with turn[1]:
        yield


def dialect_name(session: AsyncSession) -> str:
    return session.bind.dialect.name if session.bind is not None else "sqlite"


def insert_for(session: AsyncSession) -> Any:
    """The dialect's INSERT (with ON CONFLICT) for the session's database."""
    return pg_insert if dialect_name(session) == "postgresql" else sqlite_insert


# -- bulk inserts -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _InsertPlan:
    sql: str
    columns: tuple[str, ...]  # in the statement's order
    take: Callable[[Mapping[str, Any]], Any]  # a row's values in the statement's order
    processors: tuple[tuple[int, Callable[[Any], Any]], ...]  # (position, bind processor)


_INSERT_PLANS: weakref.WeakKeyDictionary[Dialect, dict[tuple[Table, tuple[str, ...]], _InsertPlan]]
_INSERT_PLANS = weakref.WeakKeyDictionary()


def _insert_plan(dialect: Dialect, table: Table, columns: tuple[str, ...]) -> _InsertPlan:
    plans = _INSERT_PLANS.setdefault(dialect, {})
    plan = plans.get((table, columns))
    if plan is not None:
        return plan
    compiled: Any = insert(table).compile(
        dialect=dialect, column_keys=list(columns), for_executemany=True
    )
    names = tuple(compiled.positiontup or ())
    if set(names) != set(columns):
        # A column the rows leave out would get its client-side default from SQLAlchemy.
        raise ValueError(f"insert_rows into {table.name} needs values for {sorted(names)}")
    processors = []
    for position, name in enumerate(names):
        processor = compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect)
        if processor is not None:
            processors.append((position, processor))
    take = itemgetter(*names) if len(names) > 1 else (lambda row: (row[names[0]],))
    plan = _InsertPlan(compiled.string, names, take, tuple(processors))
    plans[(table, columns)] = plan
    return plan


@dataclass(frozen=True)
class PreparedInsert:
    """An executemany ready to run: the compiled INSERT and each row's processed values."""

    sql: str
    columns: tuple[str, ...]  # the columns of each parameter tuple, in order
    parameters: list[tuple[Any, ...]]


def prepare_insert(
    dialect: Dialect,
    table: Table,
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str] | None = None,
) -> PreparedInsert:
    """The INSERT of `rows` into `table`, values processed as the typed executemany would.

    Pure computation, so a consumer can do it before it takes the write lock. The INSERT names
    `columns`, or else the first row's keys; those must be all of the table's columns that
    have a client-side default, and every row must have them (rows may hold other keys too).
    """
    if not rows:
        return PreparedInsert("", (), [])
    plan = _insert_plan(dialect, table, tuple(columns if columns is not None else rows[0]))
    # Column by column, not row by row: itemgetter, map and zip run in C, so a processor costs
    # one call per value and nothing else.
    by_column = list(zip(*map(plan.take, rows), strict=True))
    for position, processor in plan.processors:
        by_column[position] = tuple(map(processor, by_column[position]))
    return PreparedInsert(plan.sql, plan.columns, list(zip(*by_column, strict=True)))


async def run_insert(session: AsyncSession, prepared: PreparedInsert) -> None:
    """Execute a prepared INSERT in the session's transaction (nothing when it has no rows)."""
    if prepared.parameters:
        connection = await session.connection()
        await connection.exec_driver_sql(prepared.sql, prepared.parameters)


async def insert_rows(
    session: AsyncSession, table: Table, rows: Sequence[Mapping[str, Any]]
) -> None:
    """`session.execute(insert(table), rows)` for many rows, without SQLAlchemy's per-row work.

    The statement is compiled once per dialect and the values go through the columns' own bind
    processors, so the driver receives the values the typed executemany would send; only the
    per-row parameter bookkeeping (the bulk of a large insert's CPU) is skipped.
    """
    if rows:
        connection = await session.connection()
        await run_insert(session, prepare_insert(connection.dialect, table, rows))


async def inserted_ids(
    session: AsyncSession, table: Table, key: str, keys: Sequence[Any]
) -> list[int]:
    """The ids of the rows the session's last INSERT executemany just wrote, one per key and
    in the same order (`key` is a unique column whose values need no bind processing).

    On SQLite every new row of a write transaction gets the next rowid (one above the largest,
    or above the AUTOINCREMENT sequence), so one executemany's rows have consecutive ids ending
    at last_insert_rowid(). That is checked: if the rows at both ends are not the first and last
    key, or on PostgreSQL, the ids are looked up by key.
    """
    if not keys:
        return []
    connection = await session.connection()
    if connection.dialect.name == "sqlite":
        last = int((await connection.exec_driver_sql("SELECT last_insert_rowid()")).scalar_one())
        first = last - len(keys) + 1
        ends = await connection.exec_driver_sql(
            f"SELECT id, {key} FROM {table.name} WHERE id IN (?, ?)", (first, last)
        )
        rows: Sequence[Any] = ends.all()
        if {row[0]: row[1] for row in rows} == {first: keys[0], last: keys[-1]}:
            return list(range(first, last + 1))
    found = {row[0]: int(row[1]) for row in await select_in(session, table, (key, "id"), key, keys)}
    return [found[value] for value in keys]


# -- key lookups --------------------------------------------------------------------------------

# Keys per IN (...) list: SQLite allows 32766 bound parameters; stay far below it.
LOOKUP_CHUNK = 512


@dataclass(frozen=True)
class _LookupPlan:
    sql: str
    processors: tuple[Callable[[Any], Any] | None, ...]  # per bound parameter, in order


_LOOKUP_PLANS: weakref.WeakKeyDictionary[Dialect, dict[tuple[Any, ...], _LookupPlan]]
_LOOKUP_PLANS = weakref.WeakKeyDictionary()


def _lookup_plan(
    dialect: Dialect,
    table: Table,
    columns: tuple[str, ...],
    key: str,
    equal: tuple[str, ...],
    n: int,
) -> _LookupPlan:
    plans = _LOOKUP_PLANS.setdefault(dialect, {})
    shape = (table, columns, key, equal, n)
    plan = plans.get(shape)
    if plan is not None:
        return plan
    for name in columns:
        column_type = table.c[name].type.dialect_impl(dialect)
        if column_type.result_processor(dialect, None) is not None:
            raise ValueError(f"select_in returns raw values; {table.name}.{name} needs processing")
    query = select(*(table.c[name] for name in columns)).where(
        *(table.c[name] == bindparam(f"eq_{name}") for name in equal),
        table.c[key].in_([bindparam(f"in_{i}", type_=table.c[key].type) for i in range(n)]),
    )
    compiled: Any = query.compile(dialect=dialect)
    processors = tuple(
        compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect)
        for name in compiled.positiontup or ()
    )
    expected = [f"eq_{name}" for name in equal] + [f"in_{i}" for i in range(n)]
    if list(compiled.positiontup or ()) != expected:
        raise ValueError(f"unexpected parameter order for a lookup in {table.name}")
    plan = _LookupPlan(compiled.string, processors)
    plans[shape] = plan
    return plan


async def select_in(
    session: AsyncSession,
    table: Table,
    columns: tuple[str, ...],
    key: str,
    keys: Sequence[Any],
    equal: Mapping[str, Any] | None = None,
) -> list[tuple[Any, ...]]:
    """`SELECT columns FROM table WHERE <name> = <value> ... AND key IN (keys)`, in chunks.

    For hot-path lookups by key: the statement is compiled once per shape and list length
    (padded to a power of two by repeating a key, which IN ignores) and the parameters go
    through the columns' bind processors, as the typed path does; the per-execution expanding
    of the IN list is skipped. The selected columns must need no result processing (checked).
    """
    if not keys:
        return []
    return await select_in_on(await session.connection(), table, columns, key, keys, equal)


async def select_in_on(
    connection: AsyncConnection,
    table: Table,
    columns: tuple[str, ...],
    key: str,
    keys: Sequence[Any],
    equal: Mapping[str, Any] | None = None,
) -> list[tuple[Any, ...]]:
    """select_in on `connection`: a session's, or one taken from the pool."""

    async def run(sql: str, parameters: tuple[Any, ...]) -> Sequence[Sequence[Any]]:
        return (await connection.exec_driver_sql(sql, parameters)).all()

    return await select_in_with(run, connection.dialect, table, columns, key, keys, equal)


# Runs one compiled lookup (SQL in the dialect's parameter style) and returns its rows.
RunLookup = Callable[[str, tuple[Any, ...]], Awaitable[Sequence[Sequence[Any]]]]


async def select_in_with(
    run: RunLookup,
    dialect: Dialect,
    table: Table,
    columns: tuple[str, ...],
    key: str,
    keys: Sequence[Any],
    equal: Mapping[str, Any] | None = None,
) -> list[tuple[Any, ...]]:
    """select_in's statements, executed by `run` (a session's connection, or a driver's)."""
    equal = dict(equal or {})
    found: list[tuple[Any, ...]] = []
    for start in range(0, len(keys), LOOKUP_CHUNK):
        chunk = list(keys[start : start + LOOKUP_CHUNK])
        size = 1 << (len(chunk) - 1).bit_length()
        chunk += [chunk[-1]] * (size - len(chunk))
        plan = _lookup_plan(dialect, table, columns, key, tuple(equal), size)
        values = [*equal.values(), *chunk]
        parameters = tuple(
            value if processor is None else processor(value)
            for value, processor in zip(values, plan.processors, strict=True)
        )
        found.extend(tuple(row) for row in await run(plan.sql, parameters))
    return found
