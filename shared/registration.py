"""Registering an orchestrator from a worker: publish the decision to REGISTRY and wait until the
strictly ordered registry consumer has applied it, so the caller can answer with its outcome.

Used by the registry worker (public registration, bootstrap) and the licensing worker (invite
redemption). The projection only ever changes through the REGISTRY stream, so a replay sees
every registration whichever worker asked for it.
"""

from __future__ import annotations

import asyncio
import hashlib
from datetime import datetime
from typing import Any

from nats.js.client import JetStreamContext
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from contracts import subjects
from contracts.commands import COMMAND_TIMEOUT_S
from contracts.events import OrchestratorRegisteredV1, RegistrationOrigin
from contracts.http import RegisterRequest
from contracts.streams import REGISTRY, REGISTRY_EVENTS_CONSUMER
from shared.db.repositories import inbox
from shared.publishing import publish_event

# A registration answers within the api's COMMAND_TIMEOUT_S.
REGISTRATION_APPLY_WAIT_S = COMMAND_TIMEOUT_S - 2.0
REGISTRATION_POLL_S = 0.02


def registration_key(request: RegisterRequest, origin: str, at: datetime | None) -> str:
    digest = hashlib.sha256(request.model_dump_json().encode("utf-8")).hexdigest()[:24]
    stamp = at.isoformat() if at else "config"
    return f"register:{origin}:{request.orchestrator_id}:{stamp}:{digest}"


def registered_event(
    request: RegisterRequest,
    *,
    origin: RegistrationOrigin,
    is_top_100: bool | None,
    request_ip: str | None,
    at: datetime,
) -> OrchestratorRegisteredV1:
    metadata = request.model_dump(exclude={"orchestrator_id", "address"})
    return OrchestratorRegisteredV1(
        orchestrator_id=request.orchestrator_id,
        address=request.address.lower(),
        origin=origin,
        is_top_100=is_top_100,
        metadata=metadata,
        request_ip=request_ip,
        registered_at=at,
    )


async def publish_registration(
    js: JetStreamContext, event: OrchestratorRegisteredV1, key: str
) -> None:
    await publish_event(
        js,
        stream=REGISTRY.name,
        subject=subjects.registry_event(event.orchestrator_id),
        event=event,
        key=key,
    )


async def wait_for_outcome(
    sessions: async_sessionmaker[AsyncSession],
    key: str,
    timeout_s: float = REGISTRATION_APPLY_WAIT_S,
) -> dict[str, Any] | None:
    """The registry's answer for `key` ({status, body}), or None if not applied in time."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        async with sessions() as session:
            found = await inbox.outcome_of(session, REGISTRY_EVENTS_CONSUMER.durable, key)
        if found is not None:
            return found
        await asyncio.sleep(REGISTRATION_POLL_S)
    return None


async def register_and_wait(
    js: JetStreamContext,
    sessions: async_sessionmaker[AsyncSession],
    event: OrchestratorRegisteredV1,
    key: str,
) -> dict[str, Any] | None:
    await publish_registration(js, event, key)
    return await wait_for_outcome(sessions, key)
