"""Ledger routes: adjustments (events), the entry list and orchestrator stats (projections)."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

from aiohttp import web

from api.context import context
from api.errors import NotFound
from api.outcomes import preferred_wait_s, wait_applied
from api.parsing import idempotency_key, int_query, parse_body
from api.views import ledger_event
from contracts import subjects
from contracts.events import LedgerAdjustmentV1
from contracts.http import AdjustmentRequest
from contracts.streams import LEDGER_WORKLOADS_CONSUMER, WORKLOADS
from shared import stats
from shared.db.repositories import ledger, registry
from shared.money import eth_to_wei, wei_to_eth

# Adjustments are rare admin actions: wait this long for the applied balance by default.
ADJUSTMENT_WAIT_S = 5.0


async def create_adjustment(request: web.Request) -> web.Response:
    ctx = context(request)
    ctx.auth.require_admin(request)
    client_key = idempotency_key(request)
    body = await parse_body(request, AdjustmentRequest)
    async with ctx.sessions() as session:
        if await registry.get(session, body.orchestrator_id) is None:
            raise NotFound("Unknown orchestrator")
    event = LedgerAdjustmentV1(
        orchestrator_id=body.orchestrator_id,
        amount_wei=eth_to_wei(body.amount_eth),
        reason=body.reason,
        reference_workload_id=body.reference_workload_id,
        notes=body.notes,
        received_at=datetime.now(UTC),
    )
    if client_key is not None:
        key = f"adjustment:{body.orchestrator_id}:key:{client_key}"
    else:
        digest = hashlib.sha256(body.model_dump_json().encode("utf-8")).hexdigest()[:24]
        second = event.received_at.replace(microsecond=0).isoformat()
        key = f"adjustment:{body.orchestrator_id}:derived:{second}:{digest}"
    ack = await ctx.events.publish(
        stream=WORKLOADS.name,
        subject=subjects.ledger_adjustment(body.orchestrator_id),
        event=event,
        key=key,
    )
    wait_s = preferred_wait_s(request, default_s=ADJUSTMENT_WAIT_S)
    outcome = await wait_applied(ctx, LEDGER_WORKLOADS_CONSUMER.durable, key, wait_s)
    answer = {
        "orchestrator_id": body.orchestrator_id,
        "delta_eth": wei_to_eth(event.amount_wei),
        "reason": body.reason,
        "reference_workload_id": body.reference_workload_id,
        "notes": body.notes,
        "event_key": key,
        "duplicate": bool(ack.duplicate),
        "applied": outcome is not None,
    }
    if outcome is None:
        return web.json_response({**answer, "balance_eth": None}, status=202)
    async with ctx.sessions() as session:
        balance = await ledger.balance_wei(session, body.orchestrator_id)
    return web.json_response({**answer, "balance_eth": wei_to_eth(balance)})


async def list_events(request: web.Request) -> web.Response:
    ctx = context(request)
    ctx.auth.require_viewer(request)
    limit = int_query(request, "limit", 200, 1, 1000)
    async with ctx.sessions() as session:
        entries = await ledger.recent_entries(session, request.query.get("orchestrator_id"), limit)
    return web.json_response({"events": [ledger_event(entry) for entry in entries]})


async def orchestrator_stats(request: web.Request) -> web.Response:
    ctx = context(request)
    ctx.auth.require_viewer(request)
    return await stats_response(request, request.match_info["orchestrator_id"])


async def stats_response(request: web.Request, orchestrator_id: str) -> web.Response:
    ctx = context(request)
    days = int_query(request, "days", 30, 1, 365)
    today = datetime.now(UTC).date()
    async with ctx.sessions() as session:
        if await registry.get(session, orchestrator_id) is None:
            raise NotFound("Not found")
        balance = await ledger.balance_wei(session, orchestrator_id)
        entries = await ledger.entries_since(
            session, orchestrator_id, stats.window_start(today, days)
        )
    result = stats.compute(entries, today, days)
    return web.json_response(
        {
            "orchestrator_id": orchestrator_id,
            "balance_eth": wei_to_eth(balance),
            "days": days,
            **result.total.as_eth(prefix="total_"),
            "daily": stats.daily_series(result),
            "session_credit_eth_per_minute": str(ctx.settings.session_credit_eth_per_minute),
            "passive_credit_eth_per_minute": "0",
            "payout_strategy": ctx.settings.payout_strategy,
        }
    )
