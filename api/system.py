"""Liveness, readiness, metrics, and the api's own documents."""

from __future__ import annotations

import asyncio

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from api.context import context


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def readyz(request: web.Request) -> web.Response:
    """Ready when NATS answers, every stream exists and the database answers."""
    ctx = context(request)
    problems: list[str] = []
    missing = await ctx.events.missing_streams()
    if missing is None:
        problems.append("nats unreachable")
    elif missing:
        problems.append("streams missing: " + ", ".join(missing))
    try:
        async with ctx.engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
    except Exception:
        problems.append("database unreachable")
    if problems:
        return web.json_response({"ready": False, "problems": problems}, status=503)
    return web.json_response({"ready": True})


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


# Documents are generated once per app, on first request (the route table and contracts/ do
# not change while it runs); the text is the one `payments docs write` checks in.
DOCUMENTS = web.AppKey("generated_documents", dict[str, str])


async def _document(request: web.Request, name: str) -> web.Response:
    from shared.generated_docs import asyncapi_text, openapi_text

    cache = request.app.get(DOCUMENTS, {})
    if name not in cache:
        if name == "openapi":
            cache[name] = openapi_text(request.app)
        else:
            # FastStream's generator takes a moment: keep the event loop answering meanwhile.
            cache[name] = await asyncio.to_thread(asyncapi_text)
    return web.Response(text=cache[name], content_type="application/json")


async def openapi(request: web.Request) -> web.Response:
    return await _document(request, "openapi")


async def asyncapi(request: web.Request) -> web.Response:
    return await _document(request, "asyncapi")
