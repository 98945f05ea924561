"""Connections to NATS, one user per role (see nats.conf): ingress, worker, ops."""

from __future__ import annotations

import logging
from typing import Any, Literal

import nats
from nats.aio.client import Client as NatsClient
from nats.js.errors import ServiceUnavailableError
from tenacity import retry, retry_if_exception_type, stop_after_delay, wait_fixed

from shared.settings import Settings

Role = Literal["ingress", "worker", "ops"]

# Initial connection attempts are bounded; once connected the client reconnects forever.
INITIAL_CONNECT_DEADLINE_S = 30.0
RECONNECT_WAIT_S = 0.5
CONNECT_TIMEOUT_S = 2.0

# A JetStream API request nobody answered: a leader is being elected, the server restarted, or
# (503) no server holds the asset yet. Worth asking again, unlike a refusal.
JETSTREAM_UNANSWERED = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    ServiceUnavailableError,
)

log = logging.getLogger(__name__)


def credentials(settings: Settings, role: Role) -> dict[str, str]:
    secret = {
        "ingress": settings.nats_ingress_password,
        "worker": settings.nats_worker_password,
        "ops": settings.nats_ops_password,
    }[role]
    if secret is None or not secret.get_secret_value():
        return {}
    return {"user": role, "password": secret.get_secret_value()}


def connect_options(settings: Settings, role: Role, name: str) -> dict[str, Any]:
    return {
        "servers": [url.strip() for url in settings.resolved_nats_url.split(",")],
        "name": name,
        "allow_reconnect": True,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": RECONNECT_WAIT_S,
        "connect_timeout": CONNECT_TIMEOUT_S,
        **credentials(settings, role),
    }


async def _quiet_error(error: Exception) -> None:
    log.warning("nats connection problem: %s", type(error).__name__)


# Attempts per server during the first connection; nats-py would otherwise retry forever.
INITIAL_ATTEMPTS_PER_SERVER = 2


async def connect_once(settings: Settings, role: Role, name: str) -> NatsClient:
    options = connect_options(settings, role, name)
    options["max_reconnect_attempts"] = INITIAL_ATTEMPTS_PER_SERVER
    client = await nats.connect(**options, error_cb=_quiet_error)
    # Connected: from now on ride out any outage, reconnecting for as long as the process lives.
    client.options["max_reconnect_attempts"] = -1
    return client


@retry(
    stop=stop_after_delay(INITIAL_CONNECT_DEADLINE_S),
    wait=wait_fixed(RECONNECT_WAIT_S),
    retry=retry_if_exception_type((OSError, nats.errors.NoServersError, TimeoutError)),
    reraise=True,
)
async def connect(settings: Settings, role: Role, name: str) -> NatsClient:
    """Connect, retrying for a bounded time so a stack that starts all at once settles."""
    return await connect_once(settings, role, name)
