"""Sessions and activity leases: lookups for the sessions worker, reads for the api."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlparse

from sqlalchemy import Table, bindparam, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from shared.db.engine import insert_rows
from shared.db.models import ActivityLease, Orchestrator, Session

IN_CHUNK = 500

_SESSIONS: Table = Session.__table__  # type: ignore[attr-defined]
_LEASES: Table = ActivityLease.__table__  # type: ignore[attr-defined]


# -- the sessions worker's rows ---------------------------------------------------------------
#
# Sessions and leases as plain data, read and written with Core statements: the worker's hot
# path used ORM objects, and loading, tracking and flushing them cost more than the rest of a
# batch together (bench/README.md, session 6). The worker keeps one row per key for its batch
# and saves what changed (`save_session_rows`, `save_lease_rows`) before any query that must
# see it and at the end, as the ORM's autoflush did.


@dataclass(slots=True)
class SessionRow:
    """A sessions row (shared.db.models.Session's columns) as plain data."""

    session_id: str
    partition: int
    upstream_addr: str
    upstream_port: int
    last_event: str
    orchestrator_id: str | None = None
    edge_id: str | None = None
    run: int = 0
    started_at: datetime | None = None
    last_seen_at: datetime | None = None
    ended_at: datetime | None = None
    end_trigger: str | None = None
    updated_at: datetime | None = None
    last_billed_at: datetime | None = None
    billed_ms: int = 0
    billed_wei: int = 0
    last_credited_wei: int = 0
    metered_ms: int = 0
    segment_index: int = 0
    heartbeat_count: int = 0
    segments: list[dict[str, Any]] | None = None
    last_credit_proof: str | None = None
    credit_eth_per_minute: str = "0"
    segment_seconds: int = 2400
    idle_timeout_seconds: float = 120.0
    is_new: bool = field(default=False, compare=False)
    changed: bool = field(default=False, compare=False)


@dataclass(slots=True)
class LeaseRow:
    """An activity_leases row (shared.db.models.ActivityLease) as plain data."""

    lease_id: str
    partition: int
    orchestrator_id: str
    kind: str
    lease_seconds: int
    issued_at: datetime
    last_seen_at: datetime
    expires_at: datetime
    upstream_addr: str | None = None
    lease_metadata: dict[str, Any] | None = None
    last_seen_ip: str | None = None
    revoked_at: datetime | None = None
    expired_at: datetime | None = None
    is_new: bool = field(default=False, compare=False)
    changed: bool = field(default=False, compare=False)


_BOOKKEEPING = ("is_new", "changed")
_SESSION_FIELDS = tuple(f.name for f in fields(SessionRow) if f.name not in _BOOKKEEPING)
_LEASE_FIELDS = tuple(f.name for f in fields(LeaseRow) if f.name not in _BOOKKEEPING)
# The lease's JSON column is called `metadata` (a reserved name on the ORM model).
_LEASE_COLUMN = {name: "metadata" if name == "lease_metadata" else name for name in _LEASE_FIELDS}


# Built once: constructing these statements (and their cache keys) every batch was a large part
# of a small batch's time.
_SESSIONS_BY_ID = select(*_SESSIONS.columns).where(
    _SESSIONS.c.session_id.in_(bindparam("ids", expanding=True))
)
_LIVE_SESSIONS = select(*_SESSIONS.columns).where(
    _SESSIONS.c.partition == bindparam("partition"), _SESSIONS.c.ended_at.is_(None)
)
_LEASES_BY_ID = select(*_LEASES.columns).where(
    _LEASES.c.lease_id.in_(bindparam("ids", expanding=True))
)
_UPDATES: dict[tuple[str, tuple[str, ...]], Any] = {}


def _update_by_key(table: Table, key: str, columns: tuple[str, ...]) -> Any:
    """`UPDATE table SET columns WHERE key = :key_<key>`, built once per shape."""
    statement = _UPDATES.get((table.name, columns))
    if statement is None:
        statement = (
            update(table)
            .where(table.c[key] == bindparam(f"key_{key}"))
            .values({name: bindparam(name) for name in columns})
        )
        _UPDATES[(table.name, columns)] = statement
    return statement


def _session_values(row: SessionRow) -> dict[str, Any]:
    return {name: getattr(row, name) for name in _SESSION_FIELDS}


def _lease_values(row: LeaseRow) -> dict[str, Any]:
    return {_LEASE_COLUMN[name]: getattr(row, name) for name in _LEASE_FIELDS}


async def session_rows(session: AsyncSession, ids: Iterable[str]) -> dict[str, SessionRow]:
    wanted = list(dict.fromkeys(ids))
    found: dict[str, SessionRow] = {}
    for start in range(0, len(wanted), IN_CHUNK):
        ids = {"ids": wanted[start : start + IN_CHUNK]}
        for row in (await session.execute(_SESSIONS_BY_ID, ids)).mappings():
            found[row["session_id"]] = SessionRow(**row)
    return found


async def live_session_rows(session: AsyncSession, partition: int) -> list[SessionRow]:
    rows = await session.execute(_LIVE_SESSIONS, {"partition": partition})
    return [SessionRow(**row) for row in rows.mappings()]


async def lease_rows(session: AsyncSession, ids: Iterable[str]) -> dict[str, LeaseRow]:
    wanted = list(dict.fromkeys(ids))
    found: dict[str, LeaseRow] = {}
    for start in range(0, len(wanted), IN_CHUNK):
        ids = {"ids": wanted[start : start + IN_CHUNK]}
        for row in (await session.execute(_LEASES_BY_ID, ids)).mappings():
            values = {name: row[column] for name, column in _LEASE_COLUMN.items()}
            found[row["lease_id"]] = LeaseRow(**values)
    return found


async def save_session_rows(session: AsyncSession, rows: Iterable[SessionRow]) -> None:
    """Insert the new rows and update the changed ones (one statement each); they are then
    stored, and marked so."""
    await _save(session, _SESSIONS, "session_id", list(rows), _session_values)


async def save_lease_rows(session: AsyncSession, rows: Iterable[LeaseRow]) -> None:
    await _save(session, _LEASES, "lease_id", list(rows), _lease_values)


async def _save(
    session: AsyncSession, table: Table, key: str, rows: Sequence[Any], values: Any
) -> None:
    new = [values(row) for row in rows if row.is_new]
    changed = [values(row) for row in rows if row.changed and not row.is_new]
    if new:
        await insert_rows(session, table, new)
    if changed:
        columns = tuple(name for name in changed[0] if name != key)
        await session.execute(
            _update_by_key(table, key, columns),
            [{f"key_{key}": row[key], **{name: row[name] for name in columns}} for row in changed],
        )
    for row in rows:
        row.is_new = row.changed = False


async def get_sessions(session: AsyncSession, ids: Iterable[str]) -> dict[str, Session]:
    wanted = list(dict.fromkeys(ids))
    found: dict[str, Session] = {}
    for start in range(0, len(wanted), IN_CHUNK):
        query = select(Session).where(col(Session.session_id).in_(wanted[start : start + IN_CHUNK]))
        found.update({row.session_id: row for row in (await session.execute(query)).scalars()})
    return found


async def live_sessions_in_partition(session: AsyncSession, partition: int) -> list[Session]:
    query = select(Session).where(
        col(Session.partition) == partition, col(Session.ended_at).is_(None)
    )
    return list((await session.execute(query)).scalars())


async def get_leases(session: AsyncSession, ids: Iterable[str]) -> dict[str, ActivityLease]:
    wanted = list(dict.fromkeys(ids))
    if not wanted:
        return {}
    query = select(ActivityLease).where(col(ActivityLease.lease_id).in_(wanted))
    return {row.lease_id: row for row in (await session.execute(query)).scalars()}


def lease_expires_by(lease: LeaseRow, at: datetime) -> bool:
    """What `expire_leases` expires: a lease neither revoked nor expired, due by `at`."""
    return (
        lease.revoked_at is None
        and lease.expired_at is None
        and lease.expires_at is not None
        and lease.expires_at <= at
    )


async def expire_leases(session: AsyncSession, partition: int, at: datetime) -> int:
    result = await session.execute(
        update(ActivityLease)
        .where(
            col(ActivityLease.partition) == partition,
            col(ActivityLease.revoked_at).is_(None),
            col(ActivityLease.expired_at).is_(None),
            col(ActivityLease.expires_at) <= at,
        )
        .values(expired_at=at)
    )
    return int(getattr(result, "rowcount", 0) or 0)


def _health_host(url: str | None) -> str | None:
    if not url:
        return None
    try:
        return urlparse(url).hostname
    except ValueError:
        return None


def _matches(record: Orchestrator, address: str) -> bool:
    forwarded = (record.forwarder_health_data or {}).get("ip")
    return address in (
        record.host_public_ip,
        record.last_seen_ip,
        record.last_session_upstream_addr,
        _health_host(record.health_url),
        forwarded,
    )


async def attribute(session: AsyncSession, address: str) -> str | None:
    """The orchestrator an upstream address belongs to, as the original decided it.

    The first registry record (in registration order) whose host IP, last seen IP, last session
    address, health_url host or forwarder-reported IP equals the address; else the orchestrator
    of the most recent session from that address, if still registered.
    """
    records = (
        await session.execute(select(Orchestrator).order_by(col(Orchestrator.registration_order)))
    ).scalars()
    for record in records:
        if _matches(record, address):
            return record.orchestrator_id
    previous = await session.execute(
        select(col(Session.orchestrator_id))
        .where(col(Session.upstream_addr) == address, col(Session.orchestrator_id).is_not(None))
        .order_by(col(Session.last_seen_at).desc())
        .limit(1)
    )
    candidate = previous.scalar_one_or_none()
    if candidate and await session.get(Orchestrator, candidate) is not None:
        return str(candidate)
    return None


async def search_sessions(
    session: AsyncSession,
    *,
    orchestrator_id: str | None,
    active_since: datetime | None,
    limit: int,
) -> list[Session]:
    query = select(Session).order_by(col(Session.started_at).desc()).limit(limit)
    if orchestrator_id is not None:
        query = query.where(col(Session.orchestrator_id) == orchestrator_id)
    if active_since is not None:
        query = query.where(
            col(Session.ended_at).is_(None), col(Session.last_seen_at) >= active_since
        )
    return list((await session.execute(query)).scalars())


async def search_leases(
    session: AsyncSession, *, orchestrator_id: str | None, active_at: datetime | None, limit: int
) -> list[ActivityLease]:
    query = select(ActivityLease).order_by(col(ActivityLease.last_seen_at).desc()).limit(limit)
    if orchestrator_id is not None:
        query = query.where(col(ActivityLease.orchestrator_id) == orchestrator_id)
    if active_at is not None:
        query = query.where(*lease_active_conditions(active_at))
    return list((await session.execute(query)).scalars())


def lease_active_conditions(at: datetime) -> list[Any]:
    return [
        col(ActivityLease.revoked_at).is_(None),
        col(ActivityLease.expired_at).is_(None),
        col(ActivityLease.expires_at) > at,
    ]


async def activity_counts(
    session: AsyncSession, now: datetime, idle_timeout_s: float
) -> tuple[dict[str, int], dict[str, int]]:
    """Active sessions and active leases per orchestrator, as the registry view shows them."""
    since = now - timedelta(seconds=idle_timeout_s)
    sessions_rows = await session.execute(
        select(col(Session.orchestrator_id), func.count())
        .where(
            col(Session.orchestrator_id).is_not(None),
            col(Session.ended_at).is_(None),
            col(Session.last_seen_at) >= since,
        )
        .group_by(col(Session.orchestrator_id))
    )
    lease_rows = await session.execute(
        select(col(ActivityLease.orchestrator_id), func.count())
        .where(*lease_active_conditions(now))
        .group_by(col(ActivityLease.orchestrator_id))
    )
    return (
        {str(oid): int(n) for oid, n in sessions_rows.all()},
        {str(oid): int(n) for oid, n in lease_rows.all()},
    )
