"""Waiting, briefly, for a worker to apply an event the api just published.

Accepted (202) only promises the event is stored. A caller that wants the applied result sends
`Prefer: wait=<seconds>` (RFC 7240; at most MAX_WAIT_S); the api then polls the consumer's inbox
for the event key and answers with the projection once it is there, or 202 if time runs out.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

from aiohttp import web

from api.context import ApiContext
from shared.db.repositories import inbox

MAX_WAIT_S = 10.0
POLL_INTERVAL_S = 0.02
_PREFER_WAIT = re.compile(r"(?:^|[,;\s])wait\s*=\s*(\d+(?:\.\d+)?)", re.IGNORECASE)


def preferred_wait_s(request: web.Request, default_s: float = 0.0) -> float:
    match = _PREFER_WAIT.search(request.headers.get("Prefer", ""))
    if match is None:
        return default_s
    return min(float(match.group(1)), MAX_WAIT_S)


async def wait_applied(
    ctx: ApiContext, consumer: str, key: str, timeout_s: float
) -> dict[str, Any] | None:
    if timeout_s <= 0:
        return None
    deadline = time.monotonic() + timeout_s
    while True:  # bounded by the deadline
        async with ctx.sessions() as session:
            outcome = await inbox.outcome_of(session, consumer, key)
        if outcome is not None or time.monotonic() >= deadline:
            return outcome
        await asyncio.sleep(POLL_INTERVAL_S)
