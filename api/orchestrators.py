"""Orchestrator registry routes: register (a command), reads (projections), health (events)."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from api.context import context
from api.errors import NotFound, Relayed, TooManyRequests
from api.ledger import stats_response
from api.orchestrator_auth import orchestrator_token
from api.parsing import idempotency_key, parse_body, path_id
from contracts import subjects
from contracts.commands import CommandReply, RegisterCommandV1
from contracts.events import HealthReportV1
from contracts.http import (
    AcceptedResponse,
    ForwarderHealth,
    HealthReportRequest,
    OrchestratorRecord,
    RegisterRequest,
)
from contracts.streams import HEALTH
from shared.db.models import Orchestrator
from shared.db.repositories import ledger, registry, sessions
from shared.money import wei_to_eth
from shared.registry_rules import activity, cooldown_active

REDACTED_FIELDS = (
    "host_public_ip",
    "last_seen_ip",
    "health_url",
    "last_session_upstream_addr",
    "last_session_edge_id",
)


def utc_now() -> datetime:
    return datetime.now(UTC)


async def register(request: web.Request) -> web.Response:
    ctx = context(request)
    body = await parse_body(request, RegisterRequest)
    ip = ctx.auth.client_ip(request)
    if not ctx.registration_limits.allow(f"id:{body.orchestrator_id}", f"ip:{ip}"):
        raise TooManyRequests("Too many registration attempts; slow down")
    command = RegisterCommandV1(request=body, request_ip=ip, received_at=utc_now())
    raw = await ctx.events.request(subjects.REGISTER_COMMAND, command.model_dump_json().encode())
    reply = CommandReply.model_validate_json(raw)
    if reply.status != 200:
        raise Relayed(reply.status, reply.body)
    return web.json_response(reply.body)


def build_record(
    row: Orchestrator,
    balance_wei: int,
    now: datetime,
    request: web.Request,
    redact: bool,
    counts: tuple[dict[str, int], dict[str, int]],
) -> dict[str, Any]:
    settings = context(request).settings
    active_sessions = counts[0].get(row.orchestrator_id, 0)
    active_leases = counts[1].get(row.orchestrator_id, 0)
    state = activity(
        row,
        now,
        health_ttl_s=settings.forwarder_health_ttl_seconds,
        active_sessions=active_sessions,
        active_leases=active_leases,
    )
    forwarder = None
    if row.forwarder_health_reported_at is not None:
        forwarder = ForwarderHealth(
            source=row.forwarder_health_source or "",
            reported_at=row.forwarder_health_reported_at,
            data=row.forwarder_health_data or {},
        )
    fields = row.model_dump(
        exclude={
            "registration_order",
            "forwarder_health_source",
            "forwarder_health_reported_at",
            "forwarder_health_data",
        }
    )
    record = OrchestratorRecord(
        **fields,
        balance_eth=wei_to_eth(balance_wei),
        cooldown_active=cooldown_active(row, now),
        forwarder_health=forwarder,
        active=state.active,
        active_reason=state.reason,
        in_use=active_sessions + active_leases > 0,
        active_sessions=active_sessions,
        active_activity_leases=active_leases,
    )
    document = record.model_dump(mode="json")
    if redact:
        for name in REDACTED_FIELDS:
            document[name] = None
        if document["forwarder_health"] is not None:
            document["forwarder_health"]["data"].pop("ip", None)
    return document


async def list_orchestrators(request: web.Request) -> web.Response:
    ctx = context(request)
    ctx.auth.require_viewer(request)
    async with ctx.sessions() as session:
        rows = await registry.list_all(session)
        balances = await ledger.balances_wei(session, [row.orchestrator_id for row in rows])
        now = utc_now()
        counts = await sessions.activity_counts(
            session, now, ctx.settings.session_idle_timeout_seconds
        )
    redact = not ctx.auth.sees_private_fields(request)
    records = [
        build_record(row, balances.get(row.orchestrator_id, 0), now, request, redact, counts)
        for row in rows
    ]
    return web.json_response({"orchestrators": records})


async def get_orchestrator(request: web.Request) -> web.Response:
    ctx = context(request)
    ctx.auth.require_viewer(request)
    orchestrator_id = path_id(request, "orchestrator_id", "Not found")
    async with ctx.sessions() as session:
        row = await registry.get(session, orchestrator_id)
        if row is None:
            raise NotFound("Not found")
        balance = await ledger.balance_wei(session, orchestrator_id)
        now = utc_now()
        counts = await sessions.activity_counts(
            session, now, ctx.settings.session_idle_timeout_seconds
        )
    redact = not ctx.auth.sees_private_fields(request)
    return web.json_response(build_record(row, balance, now, request, redact, counts))


def health_event_key(orchestrator_id: str, client_key: str | None, report: HealthReportV1) -> str:
    """The client's Idempotency-Key scoped to the orchestrator, else one derived from the report.

    A derived key includes the receive time: two identical snapshots sent a minute apart are
    two reports (the second one keeps the orchestrator fresh), while a retry of the same request
    within the same second is one.
    """
    if client_key is not None:
        return f"health:{orchestrator_id}:key:{client_key}"
    content = json.dumps({"source": report.source, "data": report.data}, sort_keys=True)
    digest = hashlib.sha256(content.encode("utf-8")).hexdigest()[:32]
    second = report.received_at.replace(microsecond=0).isoformat()
    return f"health:{orchestrator_id}:derived:{second}:{digest}"


async def report_health(request: web.Request) -> web.Response:
    ctx = context(request)
    ctx.auth.require_admin(request)
    orchestrator_id = path_id(request, "orchestrator_id", "Unknown orchestrator")
    client_key = idempotency_key(request)
    body = await parse_body(request, HealthReportRequest)
    if not await ctx.orchestrator_exists(orchestrator_id):
        raise NotFound("Unknown orchestrator")
    report = HealthReportV1(
        orchestrator_id=orchestrator_id, source=body.source, data=body.data, received_at=utc_now()
    )
    key = health_event_key(orchestrator_id, client_key, report)
    ack = await ctx.events.publish(
        stream=HEALTH.name, subject=subjects.health_report(orchestrator_id), event=report, key=key
    )
    answer = AcceptedResponse(event_key=key, duplicate=bool(ack.duplicate))
    return web.json_response(answer.model_dump(), status=202)


async def get_me(request: web.Request) -> web.Response:
    """The caller's own record (orchestrator token), never redacted."""
    ctx = context(request)
    token = await orchestrator_token(request)
    async with ctx.sessions() as session:
        row = await registry.get(session, token.orchestrator_id)
        if row is None:
            raise NotFound("Not found")
        balance = await ledger.balance_wei(session, token.orchestrator_id)
        now = utc_now()
        counts = await sessions.activity_counts(
            session, now, ctx.settings.session_idle_timeout_seconds
        )
    return web.json_response(build_record(row, balance, now, request, False, counts))


async def my_stats(request: web.Request) -> web.Response:
    token = await orchestrator_token(request)
    return await stats_response(request, token.orchestrator_id)
