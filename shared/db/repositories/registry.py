"""Orchestrator registry projection: registrations and health snapshots."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import String, bindparam, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from contracts.events import HealthReportV1, OrchestratorRegisteredV1
from shared.db.engine import select_in
from shared.db.models import Orchestrator
from shared.registry_rules import (
    HEALTH_URL_SOURCE,
    HealthRules,
    assess_report,
    cooldown_active,
    eligible_for_payments,
    services_up,
)

_TABLE = Orchestrator.__table__  # type: ignore[attr-defined]


async def get(session: AsyncSession, orchestrator_id: str) -> Orchestrator | None:
    return await session.get(Orchestrator, orchestrator_id)


async def by_address(session: AsyncSession, address: str) -> Orchestrator | None:
    rows = await session.execute(select(Orchestrator).where(col(Orchestrator.address) == address))
    return rows.scalars().first()


async def get_many(
    session: AsyncSession, ids: Iterable[str], *, for_update: bool = False
) -> dict[str, Orchestrator]:
    """`for_update` locks the rows on PostgreSQL (sorted, so workers cannot deadlock); SQLite's
    writer already holds the database lock."""
    wanted = sorted(set(ids))
    if not wanted:
        return {}
    query = (
        select(Orchestrator)
        .where(col(Orchestrator.orchestrator_id).in_(wanted))
        .order_by(col(Orchestrator.orchestrator_id))
    )
    if for_update:
        query = query.with_for_update()
    rows = await session.execute(query)
    return {row.orchestrator_id: row for row in rows.scalars()}


async def known_ids(session: AsyncSession, ids: Iterable[str]) -> set[str]:
    """Which of `ids` are registered (orchestrators are never deleted)."""
    wanted = sorted(set(ids))
    rows = await select_in(session, _TABLE, ("orchestrator_id",), "orchestrator_id", wanted)
    return {orchestrator_id for (orchestrator_id,) in rows}


async def list_all(session: AsyncSession) -> list[Orchestrator]:
    rows = await session.execute(
        select(Orchestrator).order_by(col(Orchestrator.registration_order))
    )
    return list(rows.scalars())


def _later(current: datetime | None, candidate: datetime) -> datetime:
    return candidate if current is None or candidate > current else current


def _reject(status: int, detail: str) -> dict[str, Any]:
    return {"status": status, "body": {"detail": detail}}


async def apply_registration(
    session: AsyncSession,
    event: OrchestratorRegisteredV1,
    stream_seq: int,
    denylist: frozenset[str],
) -> dict[str, Any]:
    """Apply one registration decision; returns the command's answer (status and body).

    Called strictly in stream order, so conflicts resolve the same way on every replay.
    """
    existing = await get(session, event.orchestrator_id)
    if event.address in denylist:
        if existing is not None:
            existing.denylisted = True
            existing.eligible_for_payments = False
        return _reject(403, "Address is denylisted and cannot register")
    owner = await by_address(session, event.address)
    if owner is not None and owner.orchestrator_id != event.orchestrator_id:
        return _reject(409, "Address already registered to a different orchestrator")
    if existing is not None and existing.address != event.address:
        return _reject(
            409, "Existing orchestrator attempted to change address; this is not allowed"
        )
    first_registration = existing is None
    record = existing or Orchestrator(
        orchestrator_id=event.orchestrator_id,
        address=event.address,
        registration_order=stream_seq,
        first_seen=event.registered_at,
    )
    _apply_metadata(record, event)
    record.registration_count += 1
    record.last_seen = _later(record.last_seen, event.registered_at)
    record.last_seen_ip = event.request_ip or event.metadata.host_public_ip or record.last_seen_ip
    record.last_contact_source = "registration"
    if event.is_top_100 is not None:
        record.is_top_100 = event.is_top_100
    if record.cooldown_expires_at is not None and not cooldown_active(record, event.registered_at):
        record.cooldown_expires_at = None
    record.denylisted = False
    record.eligible_for_payments = eligible_for_payments(record, event.registered_at)
    if event.metadata.services_healthy:
        record.last_healthy_at = _later(record.last_healthy_at, event.registered_at)
    session.add(record)
    await session.flush()
    message = "Registered orchestrator" if first_registration else "Registration refreshed"
    if cooldown_active(record, event.registered_at):
        message += " (cooldown active)"
    return {
        "status": 200,
        "first_registration": first_registration,
        "body": {
            "orchestrator_id": record.orchestrator_id,
            "address": record.address,
            "eligible_for_payments": record.eligible_for_payments,
            "is_top_100": record.is_top_100,
            "denylisted": record.denylisted,
            "registration_count": record.registration_count,
            "cooldown_expires_at": record.cooldown_expires_at.isoformat()
            if record.cooldown_expires_at
            else None,
            "message": message,
        },
    }


def _apply_metadata(record: Orchestrator, event: OrchestratorRegisteredV1) -> None:
    """Non-empty metadata overrides stored values, as in the original."""
    for name, value in event.metadata.model_dump(exclude_none=True).items():
        if name == "services_healthy":
            continue
        if value in ("", []):
            continue
        setattr(record, name, value)


def apply_health_verdict(
    record: Orchestrator, report: HealthReportV1, rules: HealthRules
) -> str | None:
    """Count misses and start or clear a cooldown, by report time; returns `cooldown_started`,
    `cooldown_cleared` or None. A report not newer than the last one counted changes nothing,
    so redelivery and replay reach the same state."""
    at = report.received_at
    if record.health_checked_at is not None and at <= record.health_checked_at:
        return None
    record.health_checked_at = at
    min_uptime = record.min_service_uptime
    verdict = assess_report(
        report.data, rules.default_min_uptime if min_uptime is None else min_uptime
    )
    if verdict == "miss":
        record.consecutive_misses += 1
        record.last_missed_all_services = at
        if record.consecutive_misses < rules.miss_threshold:
            return None
        record.consecutive_misses = 0
        record.cooldown_expires_at = at + timedelta(seconds=rules.cooldown_s)
        record.last_cooldown_started_at = at
        record.eligible_for_payments = eligible_for_payments(record, at)
        return "cooldown_started"
    if verdict != "healthy":
        return None
    record.consecutive_misses = 0
    record.last_healthy_at = at
    if record.cooldown_expires_at is None or record.cooldown_expires_at > at:
        return None
    record.cooldown_expires_at = None
    record.last_cooldown_cleared_at = at
    record.eligible_for_payments = eligible_for_payments(record, at)
    return "cooldown_cleared"


def apply_health_report(record: Orchestrator, report: HealthReportV1) -> bool:
    """Store the snapshot if it is newer than the one held; returns whether anything changed.

    Reports are applied newest-wins by their receive time, so redelivery or a replay in a
    different order ends in the same state. A poll of the orchestrator's own `health_url` is a
    contact, not a forwarder snapshot: it never makes the orchestrator look forwarder-fresh
    (which would stop the polling).
    """
    if report.source == HEALTH_URL_SOURCE:
        if services_up(report.data):
            record.last_seen = _later(record.last_seen, report.received_at)
            record.last_contact_source = HEALTH_URL_SOURCE
            return True
        return False
    current = record.forwarder_health_reported_at
    if current is not None and report.received_at <= current:
        return False
    record.forwarder_health_source = report.source
    record.forwarder_health_reported_at = report.received_at
    record.forwarder_health_data = report.data
    up = services_up(report.data)
    if up is not None and up > 0:
        record.last_seen = _later(record.last_seen, report.received_at)
        reported_ip = report.data.get("ip")
        if isinstance(reported_ip, str) and reported_ip:
            record.last_seen_ip = reported_ip[:64]
        record.last_contact_source = report.source
    return True


@dataclass
class Contact:
    """The latest contact an orchestrator made in one batch, and its latest session event."""

    at: datetime
    source: str
    ip: str | None
    session_at: datetime | None = None
    session_addr: str | None = None
    session_edge_id: str | None = None


async def record_contacts(session: AsyncSession, contacts: dict[str, Contact]) -> None:
    """Move `last_seen` (and the last session fields) forward, never back.

    Conditional UPDATEs rather than read-modify-write: concurrent workers on PostgreSQL cannot
    lose each other's newer contact, and no orchestrator row is loaded for it. One executemany
    per statement for the whole batch, in orchestrator order (row locks taken in that order).
    """
    ordered = [(oid, contacts[oid]) for oid in sorted(contacts)]
    seen = [
        {"oid": oid, "at": c.at, "source": c.source, "ip": c.ip[:64] if c.ip else None}
        for oid, c in ordered
    ]
    sessions = [
        {
            "oid": oid,
            "at": c.session_at,
            "addr": c.session_addr,
            "edge_id": c.session_edge_id,
        }
        for oid, c in ordered
        if c.session_at is not None
    ]
    for statement, rows in ((_CONTACT, seen), (_SESSION_CONTACT, sessions)):
        if rows:
            await session.execute(statement, rows)


# Built once (building them for every batch was much of a small batch's time). A contact
# without an IP keeps the one stored.
_CONTACT = (
    update(_TABLE)
    .where(
        _TABLE.c.orchestrator_id == bindparam("oid"),
        or_(_TABLE.c.last_seen.is_(None), _TABLE.c.last_seen <= bindparam("at")),
    )
    .values(
        last_seen=bindparam("at"),
        last_contact_source=bindparam("source"),
        last_seen_ip=func.coalesce(bindparam("ip", type_=String()), _TABLE.c.last_seen_ip),
    )
)
_SESSION_CONTACT = (
    update(_TABLE)
    .where(
        _TABLE.c.orchestrator_id == bindparam("oid"),
        or_(
            _TABLE.c.last_session_seen_at.is_(None),
            _TABLE.c.last_session_seen_at <= bindparam("at"),
        ),
    )
    .values(
        last_session_seen_at=bindparam("at"),
        last_session_upstream_addr=bindparam("addr"),
        last_session_edge_id=bindparam("edge_id"),
    )
)
