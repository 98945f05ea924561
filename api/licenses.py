"""Image licensing routes. Changes are commands answered by the licensing worker; lists are read
from the database. Secrets, tokens and invite codes appear only in the answer to their creator.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from pydantic import BaseModel

from api.context import context
from api.errors import BadRequest, Relayed, TooManyRequests
from api.orchestrator_auth import orchestrator_token
from api.parsing import int_query, parse_body
from api.sessions import flag
from contracts.commands import CommandReply
from contracts.licensing import (
    AccessRequest,
    ImageRefRequest,
    ImageUpsertRequest,
    InviteCreateRequest,
    InviteIdRequest,
    InviteRedeemRequest,
    LeaseRequest,
    LicensingCommandV1,
    command_subject,
)
from shared.db.models import LicenseInvite, LicenseLease, OrchestratorToken
from shared.db.repositories import licensing


def iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


async def ask(
    request: web.Request,
    name: str,
    args: dict[str, Any],
    actor: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Send a licensing command; the worker's non-2xx answer becomes this request's answer."""
    ctx = context(request)
    command = LicensingCommandV1(
        name=name,
        args=args,
        actor=actor or {},
        request_ip=ctx.auth.client_ip(request),
        received_at=datetime.now(UTC),
    )
    raw = await ctx.events.request(command_subject(name), command.model_dump_json().encode())
    reply = CommandReply.model_validate_json(raw)
    if reply.status >= 300:
        raise Relayed(reply.status, reply.body)
    return reply.body


async def admin_command(request: web.Request, name: str, model: type[BaseModel]) -> web.Response:
    context(request).auth.require_admin(request)
    body = await parse_body(request, model)
    return web.json_response(await ask(request, name, body.model_dump()))


# -- images, access, tokens (admin) -------------------------------------------------------------


async def put_image(request: web.Request) -> web.Response:
    return await admin_command(request, "image.put", ImageUpsertRequest)


async def revoke_image(request: web.Request) -> web.Response:
    return await admin_command(request, "image.revoke", ImageRefRequest)


async def list_images(request: web.Request) -> web.Response:
    ctx = context(request)
    ctx.auth.require_admin(request)
    async with ctx.sessions() as db:
        rows = await licensing.images(db)
    images = [
        {
            "image_ref": row.image_ref,
            "artifact_s3_uri": row.artifact_s3_uri,
            "created_at": iso(row.created_at),
            "rotated_at": iso(row.rotated_at),
            "revoked_at": iso(row.revoked_at),
        }
        for row in rows
    ]
    return web.json_response({"images": images})


async def grant_access(request: web.Request) -> web.Response:
    return await admin_command(request, "access.grant", AccessRequest)


async def revoke_access(request: web.Request) -> web.Response:
    return await admin_command(request, "access.revoke", AccessRequest)


async def list_access(request: web.Request) -> web.Response:
    ctx = context(request)
    ctx.auth.require_admin(request)
    async with ctx.sessions() as db:
        return web.json_response({"access": await licensing.access_map(db)})


async def mint_token(request: web.Request) -> web.Response:
    context(request).auth.require_admin(request)
    orchestrator_id = request.match_info["orchestrator_id"]
    return web.json_response(await ask(request, "token.mint", {"orchestrator_id": orchestrator_id}))


async def list_tokens(request: web.Request) -> web.Response:
    ctx = context(request)
    ctx.auth.require_admin(request)
    async with ctx.sessions() as db:
        rows = await licensing.tokens_of(db, request.match_info["orchestrator_id"])
    tokens = [
        {
            "token_id": row.token_id,
            "orchestrator_id": row.orchestrator_id,
            "created_at": iso(row.created_at),
            "revoked_at": iso(row.revoked_at),
            "last_seen_at": iso(row.last_seen_at),
        }
        for row in rows
    ]
    return web.json_response({"tokens": tokens})


async def revoke_token(request: web.Request) -> web.Response:
    context(request).auth.require_admin(request)
    args = {
        "orchestrator_id": request.match_info["orchestrator_id"],
        "token_id": request.match_info["token_id"],
    }
    return web.json_response(await ask(request, "token.revoke", args))


# -- invites ------------------------------------------------------------------------------------


async def create_invite(request: web.Request) -> web.Response:
    context(request).auth.require_admin(request)
    body = await parse_body(request, InviteCreateRequest)
    args = body.model_dump()
    if body.expires_at is not None:
        text = body.expires_at.strip().replace("Z", "+00:00").replace("z", "+00:00")
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise BadRequest("Invalid expires_at; expected an ISO 8601 timestamp") from None
        moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
        args["expires_at"] = moment.isoformat()
    return web.json_response(await ask(request, "invite.create", args))


def invite_view(row: LicenseInvite) -> dict[str, Any]:
    return {
        "invite_id": row.invite_id,
        "image_ref": row.image_ref,
        "bound_address": row.bound_address,
        "created_at": iso(row.created_at),
        "expires_at": iso(row.expires_at),
        "note": row.note,
        "revoked_at": iso(row.revoked_at),
        "redeeming_at": iso(row.redeeming_at),
        "redeemed_at": iso(row.redeemed_at),
        "redeemed_by": row.redeemed_by,
        "redeemed_ip": row.redeemed_ip,
        "redeemed_address": row.redeemed_address,
        "redeemed_token_id": row.redeemed_token_id,
    }


async def list_invites(request: web.Request) -> web.Response:
    ctx = context(request)
    ctx.auth.require_admin(request)
    async with ctx.sessions() as db:
        rows = await licensing.invites(db)
    return web.json_response({"invites": [invite_view(row) for row in rows]})


async def revoke_invite(request: web.Request) -> web.Response:
    return await admin_command(request, "invite.revoke", InviteIdRequest)


async def redeem_invite(request: web.Request) -> web.Response:
    """Public; rate limited per client IP (trusted-proxy aware)."""
    ctx = context(request)
    if not ctx.redeem_limits.allow(f"ip:{ctx.auth.client_ip(request)}"):
        raise TooManyRequests("Too many attempts; slow down")
    body = await parse_body(request, InviteRedeemRequest)
    return web.json_response(await ask(request, "invite.redeem", body.model_dump()))


# -- leases (orchestrator token) ----------------------------------------------------------------


def actor(token: OrchestratorToken) -> dict[str, str]:
    return {"orchestrator_id": token.orchestrator_id, "token_id": token.token_id}


async def take_lease(request: web.Request) -> web.Response:
    token = await orchestrator_token(request)
    body = await parse_body(request, LeaseRequest)
    return web.json_response(await ask(request, "lease.take", body.model_dump(), actor(token)))


async def heartbeat_lease(request: web.Request) -> web.Response:
    token = await orchestrator_token(request)
    args = {"lease_id": request.match_info["lease_id"]}
    return web.json_response(await ask(request, "lease.heartbeat", args, actor(token)))


def lease_view(row: LicenseLease, now: datetime) -> dict[str, Any]:
    active = (
        row.revoked_at is None
        and row.end_reason is None
        and row.expires_at is not None
        and row.expires_at > now
    )
    return {
        "lease_id": row.lease_id,
        "orchestrator_id": row.orchestrator_id,
        "image_ref": row.image_ref,
        "issued_at": iso(row.issued_at),
        "last_seen_at": iso(row.last_seen_at),
        "last_seen_ip": row.last_seen_ip,
        "expires_at": iso(row.expires_at),
        "revoked_at": iso(row.revoked_at),
        "end_reason": row.end_reason,
        "active": active,
    }


async def list_leases(request: web.Request) -> web.Response:
    ctx = context(request)
    ctx.auth.require_viewer(request)
    limit = int_query(request, "limit", 200, 1, 2000)
    now = datetime.now(UTC)
    async with ctx.sessions() as db:
        rows = await licensing.leases(
            db,
            orchestrator_id=request.query.get("orchestrator_id"),
            image_ref=request.query.get("image_ref"),
            active_at=now if flag(request, "active_only", True) else None,
            limit=limit,
        )
    return web.json_response({"leases": [lease_view(row, now) for row in rows]})
