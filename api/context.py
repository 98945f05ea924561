"""Typed application keys: what every handler can reach on `request.app`."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from api.auth import Auth
from api.event_store import EventStore
from api.rate_limit import RateLimiter
from shared.db.lookups import KeyLookups
from shared.db.repositories import registry
from shared.s3 import Presigner
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
    presigner: Presigner
    lookups: KeyLookups

    known_orchestrators: set[str] = field(default_factory=set)

    async def orchestrator_exists(self, orchestrator_id: str) -> bool:
        """Orchestrators are never deleted, so a known id is remembered for the process's life
        and only unknown ids cost a database read (the hot path of every event route)."""
        if orchestrator_id in self.known_orchestrators:
            return True
        async with self.sessions() as session:
            found = await registry.get(session, orchestrator_id) is not None
        if found:
            self.known_orchestrators.add(orchestrator_id)
        return found


CONTEXT = web.AppKey("context", ApiContext)


def context(request: web.Request) -> ApiContext:
    return request.app[CONTEXT]
