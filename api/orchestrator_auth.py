"""Orchestrator tokens: who is calling `/me` routes and license leases."""

from __future__ import annotations

from aiohttp import web

from api.context import context
from api.errors import Unauthorized
from shared.db.models import OrchestratorToken
from shared.db.repositories import licensing
from shared.secrets_box import digest


async def orchestrator_token(request: web.Request) -> OrchestratorToken:
    """`Authorization: Bearer` or `X-Orchestrator-Token`, looked up by its sha256."""
    ctx = context(request)
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    token = value.strip() if scheme.lower() == "bearer" else ""
    token = token or request.headers.get("X-Orchestrator-Token", "").strip()
    if not token:
        raise Unauthorized("Orchestrator token required")
    async with ctx.sessions() as db:
        row = await licensing.token_by_hash(db, digest(token))
    if row is None:
        raise Unauthorized("Orchestrator token required")
    return row
