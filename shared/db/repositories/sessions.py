"""Sessions and activity leases: lookups for the sessions worker, reads for the api."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlparse

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from shared.db.models import ActivityLease, Orchestrator, Session

IN_CHUNK = 500


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
