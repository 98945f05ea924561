"""Content workload routes: time-based and fixed-price workloads, updates, listing, summary.

Writes publish to the WORKLOADS stream and answer 202 once stored (200 with the projection when
the caller asked to wait with `Prefer: wait=N` and the ledger worker applied it in time). A
workload id already in the projection answers at once: same body, the stored record (200);
different body, 409.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from aiohttp import web

from api.context import ApiContext, context
from api.errors import BadRequest, Conflict, NotFound
from api.outcomes import preferred_wait_s, wait_applied
from api.parsing import idempotency_key, int_query, parse_body
from api.views import workload_record
from contracts import subjects
from contracts.events import (
    EventModel,
    WorkloadSubmittedV1,
    WorkloadTimeRecordedV1,
    WorkloadUpdatedV1,
)
from contracts.http import (
    WORKLOAD_STATUSES,
    WorkloadCreateRequest,
    WorkloadPatchRequest,
    WorkloadTimeRequest,
)
from contracts.streams import LEDGER_WORKLOADS_CONSUMER, WORKLOADS
from shared.db.repositories import workloads
from shared.money import eth_to_wei, wei_to_eth

CONSUMER = LEDGER_WORKLOADS_CONSUMER.durable


def utc_now() -> datetime:
    return datetime.now(UTC)


def body_sha256(model: Any) -> str:
    return hashlib.sha256(model.model_dump_json().encode("utf-8")).hexdigest()


async def _require_orchestrator(ctx: ApiContext, orchestrator_id: str) -> None:
    if not await ctx.orchestrator_exists(orchestrator_id):
        raise NotFound("Unknown orchestrator")


async def _existing_answer(ctx: ApiContext, workload_id: str, digest: str) -> web.Response | None:
    """The stored record for a repeated request, 409 for a reused id; None for a new workload.

    Most requests are new workloads: one lookup (shared.db.lookups) settles those; only a
    repeated id loads the whole record.
    """
    stored_digest = await workloads.body_digest(ctx.lookups, workload_id)
    if stored_digest is None:
        return None
    if stored_digest != digest:
        raise Conflict("Workload already exists")
    async with ctx.sessions() as session:
        existing = await workloads.get(session, workload_id)
    if existing is None:
        return None
    return web.json_response(workload_record(existing))


async def _publish_and_answer(
    request: web.Request,
    *,
    subject: str,
    event: EventModel,
    key: str,
    workload_id: str,
    provisional: dict[str, Any],
) -> web.Response:
    ctx = context(request)
    ack = await ctx.events.publish(stream=WORKLOADS.name, subject=subject, event=event, key=key)
    outcome = await wait_applied(ctx, CONSUMER, key, preferred_wait_s(request))
    if outcome is not None:
        async with ctx.sessions() as session:
            stored = await workloads.get(session, workload_id)
        if stored is not None:
            return web.json_response({**workload_record(stored), "event_key": key}, status=200)
    body = {**provisional, "event_key": key, "duplicate": bool(ack.duplicate)}
    return web.json_response(body, status=202)


def accepted_record(
    fields: dict[str, Any], payout_wei: int, received_at: datetime
) -> dict[str, Any]:
    """The WorkloadRecord shape for a workload accepted but not yet applied."""
    return {
        **fields,
        "payout_amount_eth": wei_to_eth(payout_wei),
        "submitted_at": received_at.isoformat(),
        "tx_hash": None,
        "credited": False,
        "credited_at": None,
    }


async def create_time_workload(request: web.Request) -> web.Response:
    ctx = context(request)
    ctx.auth.require_admin(request)
    body = await parse_body(request, WorkloadTimeRequest)
    await _require_orchestrator(ctx, body.orchestrator_id)
    if body.status not in WORKLOAD_STATUSES:
        raise BadRequest("Invalid workload status")
    digest = body_sha256(body)
    if (answer := await _existing_answer(ctx, body.workload_id, digest)) is not None:
        return answer
    rate = ctx.settings.workload_time_credit_eth_per_minute
    event = WorkloadTimeRecordedV1(
        **body.model_dump(),
        credit_eth_per_minute=str(rate),
        body_sha256=digest,
        received_at=utc_now(),
    )
    amount = Decimal(body.duration_ms) * rate / Decimal(60_000)
    provisional = accepted_record(
        body.model_dump(exclude={"duration_ms"}), eth_to_wei(amount), event.received_at
    )
    return await _publish_and_answer(
        request,
        subject=subjects.workload_time(body.orchestrator_id),
        event=event,
        key=f"workload_time:{body.workload_id}:{digest[:16]}",
        workload_id=body.workload_id,
        provisional=provisional,
    )


async def create_workload(request: web.Request) -> web.Response:
    ctx = context(request)
    ctx.auth.require_admin(request)
    body = await parse_body(request, WorkloadCreateRequest)
    await _require_orchestrator(ctx, body.orchestrator_id)
    digest = body_sha256(body)
    if (answer := await _existing_answer(ctx, body.workload_id, digest)) is not None:
        return answer
    event = WorkloadSubmittedV1(
        **body.model_dump(exclude={"payout_amount_eth"}),
        payout_amount_wei=eth_to_wei(body.payout_amount_eth),
        body_sha256=digest,
        received_at=utc_now(),
    )
    provisional = accepted_record(
        {**body.model_dump(exclude={"payout_amount_eth"}), "status": "pending"},
        event.payout_amount_wei,
        event.received_at,
    )
    return await _publish_and_answer(
        request,
        subject=subjects.workload_fixed(body.orchestrator_id),
        event=event,
        key=f"workload_fixed:{body.workload_id}:{digest[:16]}",
        workload_id=body.workload_id,
        provisional=provisional,
    )


async def update_workload(request: web.Request) -> web.Response:
    ctx = context(request)
    ctx.auth.require_admin(request)
    workload_id = request.match_info["workload_id"]
    client_key = idempotency_key(request)
    body = await parse_body(request, WorkloadPatchRequest)
    async with ctx.sessions() as session:
        existing = await workloads.get(session, workload_id)
    if existing is None:
        raise NotFound("Workload not found")
    event = WorkloadUpdatedV1(
        workload_id=workload_id,
        orchestrator_id=existing.orchestrator_id,
        **body.model_dump(),
        received_at=utc_now(),
    )
    digest = body_sha256(body)[:16]
    stamp = client_key or event.received_at.replace(microsecond=0).isoformat()
    provisional = {**workload_record(existing), **body.model_dump(exclude_none=True)}
    return await _publish_and_answer(
        request,
        subject=subjects.workload_update(existing.orchestrator_id),
        event=event,
        key=f"workload_update:{workload_id}:{stamp}:{digest}",
        workload_id=workload_id,
        provisional=provisional,
    )


def parse_timestamp(raw: str | None) -> datetime | None:
    """ISO 8601, with or without a zone (no zone means UTC); a bad value is a 400."""
    if raw is None or not raw.strip():
        return None
    text = raw.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise BadRequest("Invalid timestamp filter") from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


async def list_workloads(request: web.Request) -> web.Response:
    ctx = context(request)
    ctx.auth.require_viewer(request)
    status = request.query.get("status")
    if status is not None and status not in WORKLOAD_STATUSES:
        raise BadRequest("Invalid workload status")
    limit = int_query(request, "limit", 0, 1, 500) if "limit" in request.query else None
    async with ctx.sessions() as session:
        rows = await workloads.search(
            session,
            orchestrator_id=request.query.get("orchestrator_id"),
            status=status,
            since=parse_timestamp(request.query.get("since")),
            until=parse_timestamp(request.query.get("until")),
            limit=limit,
        )
    return web.json_response({"workloads": [workload_record(row) for row in rows]})


async def workload_summary(request: web.Request) -> web.Response:
    """Per orchestrator: workloads, earned (credited) and pending (not credited, not rejected).

    The original counted pending and rejected workloads as earned (its §12 item 19).
    """
    ctx = context(request)
    ctx.auth.require_viewer(request)
    since = parse_timestamp(request.query.get("since"))
    until = parse_timestamp(request.query.get("until"))
    async with ctx.sessions() as session:
        rows = await workloads.search(session, since=since, until=until)
    totals: dict[str, dict[str, int]] = {}
    for row in rows:
        bucket = totals.setdefault(row.orchestrator_id, {"workloads": 0, "earned": 0, "pending": 0})
        bucket["workloads"] += 1
        if row.credited:
            bucket["earned"] += row.payout_amount_wei
        elif row.status != "rejected":
            bucket["pending"] += row.payout_amount_wei
    summary = [
        {
            "orchestrator_id": orchestrator_id,
            "workloads": bucket["workloads"],
            "earned_eth": wei_to_eth(bucket["earned"]),
            "pending_eth": wei_to_eth(bucket["pending"]),
        }
        for orchestrator_id, bucket in sorted(totals.items())
    ]
    return web.json_response(
        {
            "range_start": since.isoformat() if since else None,
            "range_end": until.isoformat() if until else None,
            "orchestrators": summary,
        }
    )
