"""Session events from edges, the session list, and activity leases."""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from api.context import context
from api.errors import NotFound
from api.outcomes import preferred_wait_s, wait_applied
from api.parsing import idempotency_key, int_query, parse_body
from contracts import subjects
from contracts.events import ActivityLeaseCommandV1, SessionEventV1
from contracts.http import ActivityLeaseHeartbeatRequest, ActivityLeaseRequest, SessionEventRequest
from contracts.streams import SESSIONS
from shared.db.models import ActivityLease, Session
from shared.db.repositories import registry, sessions
from shared.money import wei_to_eth

CONSUMER = "sessions"
MIN_LEASE_S = 30
# Lease commands wait this long for the sessions worker, so the answer carries the lease.
LEASE_WAIT_S = 5.0


def utc_now() -> datetime:
    return datetime.now(UTC)


def flag(request: web.Request, name: str, default: bool) -> bool:
    raw = request.query.get(name)
    if raw is None:
        return default
    return raw.strip().lower() in ("1", "true", "yes", "on")


async def post_session_event(request: web.Request) -> web.Response:
    """202 once stored. The key: Idempotency-Key or event_id, else the event and its second."""
    ctx = context(request)
    ctx.auth.require_session_reporter(request)
    client_key = idempotency_key(request)
    body = await parse_body(request, SessionEventRequest)
    settings = ctx.settings
    event = SessionEventV1(
        session_id=body.session_id,
        upstream_addr=body.upstream_addr,
        upstream_port=body.upstream_port,
        edge_id=body.edge_id,
        event=body.event,
        received_at=utc_now(),
        credit_eth_per_minute=str(settings.session_credit_eth_per_minute),
        segment_seconds=settings.session_segment_seconds,
        idle_timeout_seconds=settings.session_idle_timeout_seconds,
        lease_seconds=settings.activity_lease_seconds,
    )
    supplied = client_key or body.event_id
    if supplied is not None:
        key = f"session:{body.session_id}:key:{supplied}"
    else:
        second = event.received_at.replace(microsecond=0).isoformat()
        key = f"session:{body.session_id}:{body.event}:{body.edge_id or ''}:{second}"
    ack = await ctx.events.publish(
        stream=SESSIONS.name, subject=subjects.session_event(body.session_id), event=event, key=key
    )
    return web.json_response(
        {
            "ok": True,
            "session_id": body.session_id,
            "event": body.event,
            "received_at": event.received_at.isoformat(),
            "event_key": key,
            "duplicate": bool(ack.duplicate),
        },
        status=202,
    )


def session_view(row: Session) -> dict[str, Any]:
    return {
        "session_id": row.session_id,
        "orchestrator_id": row.orchestrator_id,
        "upstream_addr": row.upstream_addr,
        "upstream_port": row.upstream_port,
        "edge_id": row.edge_id,
        "started_at": row.started_at.isoformat() if row.started_at else None,
        "last_seen_at": row.last_seen_at.isoformat() if row.last_seen_at else None,
        "ended_at": row.ended_at.isoformat() if row.ended_at else None,
        "end_trigger": row.end_trigger,
        "last_billed_at": row.last_billed_at.isoformat() if row.last_billed_at else None,
        "billed_ms": row.billed_ms,
        "billed_eth": wei_to_eth(row.billed_wei),
        "last_credited_eth": wei_to_eth(row.last_credited_wei),
        "metered_ms": row.metered_ms,
        "segment_index": row.segment_index,
        "heartbeat_count": row.heartbeat_count,
        "last_event": row.last_event,
        "updated_at": row.updated_at.isoformat() if row.updated_at else None,
        "last_credit_proof": row.last_credit_proof,
    }


async def list_sessions(request: web.Request) -> web.Response:
    ctx = context(request)
    ctx.auth.require_viewer(request)
    limit = int_query(request, "limit", 200, 1, 2000)
    active_since = None
    if flag(request, "active_only", False):
        active_since = utc_now() - timedelta(seconds=ctx.settings.session_idle_timeout_seconds)
    async with ctx.sessions() as db:
        rows = await sessions.search_sessions(
            db,
            orchestrator_id=request.query.get("orchestrator_id"),
            active_since=active_since,
            limit=limit,
        )
    return web.json_response({"sessions": [session_view(row) for row in rows]})


def lease_view(row: ActivityLease, now: datetime) -> dict[str, Any]:
    active = (
        row.revoked_at is None
        and row.expired_at is None
        and row.expires_at is not None
        and row.expires_at > now
    )
    return {
        "lease_id": row.lease_id,
        "orchestrator_id": row.orchestrator_id,
        "upstream_addr": row.upstream_addr,
        "kind": row.kind,
        "metadata": row.lease_metadata or {},
        "lease_seconds": row.lease_seconds,
        "issued_at": row.issued_at.isoformat() if row.issued_at else None,
        "last_seen_at": row.last_seen_at.isoformat() if row.last_seen_at else None,
        "last_seen_ip": row.last_seen_ip,
        "expires_at": row.expires_at.isoformat() if row.expires_at else None,
        "revoked_at": row.revoked_at.isoformat() if row.revoked_at else None,
        "expired_at": row.expired_at.isoformat() if row.expired_at else None,
        "active": active,
    }


def clamp_lease(requested: int | None, default_s: int, max_s: int) -> tuple[int, dict[str, Any]]:
    """The effective length, and what the answer says about a clamp (never silent)."""
    wanted = requested if requested is not None else default_s
    effective = min(max(wanted, MIN_LEASE_S), max_s)
    report: dict[str, Any] = {"requested_lease_seconds": requested, "clamped": effective != wanted}
    if effective != wanted:
        report["clamp_reason"] = f"lease_seconds is limited to [{MIN_LEASE_S}, {max_s}]"
    return effective, report


async def _lease_command(
    request: web.Request, command: ActivityLeaseCommandV1, key: str
) -> tuple[dict[str, Any] | None, bool]:
    ctx = context(request)
    ack = await ctx.events.publish(
        stream=SESSIONS.name,
        subject=subjects.activity_lease_command(command.lease_id),
        event=command,
        key=key,
    )
    outcome = await wait_applied(ctx, CONSUMER, key, preferred_wait_s(request, LEASE_WAIT_S))
    return outcome, bool(ack.duplicate)


async def _lease_answer(request: web.Request, lease_id: str, extra: dict[str, Any]) -> web.Response:
    ctx = context(request)
    async with ctx.sessions() as db:
        row = (await sessions.get_leases(db, [lease_id])).get(lease_id)
    if row is None:
        return web.json_response({"lease_id": lease_id, "applied": False, **extra}, status=202)
    return web.json_response({**lease_view(row, utc_now()), "applied": True, **extra})


async def create_lease(request: web.Request) -> web.Response:
    ctx = context(request)
    ctx.auth.require_admin(request)
    client_key = idempotency_key(request)
    body = await parse_body(request, ActivityLeaseRequest)
    async with ctx.sessions() as db:
        if await registry.get(db, body.orchestrator_id) is None:
            raise NotFound("Unknown orchestrator")
    seconds, clamp = clamp_lease(
        body.lease_seconds,
        ctx.settings.activity_lease_seconds,
        ctx.settings.activity_lease_max_seconds,
    )
    if client_key is not None:
        digest = hashlib.sha256(f"{body.orchestrator_id}:{client_key}".encode()).hexdigest()
        lease_id = digest[:32]
    else:
        lease_id = uuid.uuid4().hex
    command = ActivityLeaseCommandV1(
        action="issue",
        lease_id=lease_id,
        orchestrator_id=body.orchestrator_id,
        upstream_addr=body.upstream_addr,
        kind=body.kind,
        lease_seconds=seconds,
        metadata=body.metadata,
        request_ip=ctx.auth.client_ip(request),
        received_at=utc_now(),
    )
    outcome, _duplicate = await _lease_command(request, command, f"lease:issue:{lease_id}")
    if outcome is not None and outcome.get("status") == 409:
        return web.json_response({"detail": "Lease belongs to another orchestrator"}, status=409)
    return await _lease_answer(request, lease_id, clamp)


async def _live_lease(
    request: web.Request, lease_id: str, orchestrator_id: str | None
) -> ActivityLease:
    ctx = context(request)
    async with ctx.sessions() as db:
        row = (await sessions.get_leases(db, [lease_id])).get(lease_id)
    now = utc_now()
    if row is None or (orchestrator_id is not None and row.orchestrator_id != orchestrator_id):
        raise NotFound("Lease not found")
    if (
        row.revoked_at is not None
        or row.expired_at is not None
        or (row.expires_at is not None and row.expires_at <= now)
    ):
        raise NotFound("Lease not found")
    return row


async def heartbeat_lease(request: web.Request) -> web.Response:
    ctx = context(request)
    ctx.auth.require_admin(request)
    lease_id = request.match_info["lease_id"]
    body = await parse_body(request, ActivityLeaseHeartbeatRequest)
    row = await _live_lease(request, lease_id, body.orchestrator_id)
    seconds, clamp = clamp_lease(
        body.lease_seconds, row.lease_seconds, ctx.settings.activity_lease_max_seconds
    )
    command = ActivityLeaseCommandV1(
        action="heartbeat",
        lease_id=lease_id,
        orchestrator_id=body.orchestrator_id,
        lease_seconds=seconds,
        request_ip=ctx.auth.client_ip(request),
        received_at=utc_now(),
    )
    outcome, _ = await _lease_command(
        request, command, f"lease:heartbeat:{lease_id}:{command.received_at.isoformat()}"
    )
    if outcome is not None and outcome.get("status") == 404:
        raise NotFound("Lease not found")
    return await _lease_answer(request, lease_id, clamp)


async def revoke_lease(request: web.Request) -> web.Response:
    ctx = context(request)
    ctx.auth.require_admin(request)
    lease_id = request.match_info["lease_id"]
    async with ctx.sessions() as db:
        row = (await sessions.get_leases(db, [lease_id])).get(lease_id)
    if row is None:
        raise NotFound("Lease not found")
    command = ActivityLeaseCommandV1(action="revoke", lease_id=lease_id, received_at=utc_now())
    outcome, _ = await _lease_command(request, command, f"lease:revoke:{lease_id}")
    return web.json_response({"ok": True, "lease_id": lease_id, "applied": outcome is not None})


async def list_leases(request: web.Request) -> web.Response:
    ctx = context(request)
    ctx.auth.require_viewer(request)
    limit = int_query(request, "limit", 200, 1, 2000)
    now = utc_now()
    async with ctx.sessions() as db:
        rows = await sessions.search_leases(
            db,
            orchestrator_id=request.query.get("orchestrator_id"),
            active_at=now if flag(request, "active_only", False) else None,
            limit=limit,
        )
    return web.json_response({"leases": [lease_view(row, now) for row in rows]})
