"""Typed application keys: what every handler can reach on `request.app`."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from api.auth import Auth
from api.event_store import EventStore
from api.rate_limit import RateLimiter
from shared.settings import Settings


@dataclass
class ApiContext:
    settings: Settings
    auth: Auth
    events: EventStore
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    registration_limits: RateLimiter
    redeem_limits: RateLimiter


CONTEXT = web.AppKey("context", ApiContext)


def context(request: web.Request) -> ApiContext:
    return request.app[CONTEXT]
