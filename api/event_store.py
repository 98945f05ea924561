"""The api's connection to NATS: publish an event and wait for its PubAck, or ask a worker.

Accepted means stored: a caller gets 2xx only after JetStream's PubAck. Concurrent requests'
events are stored together (api.group_commit), each caller still waiting for its own. While
NATS is unreachable every publish and command answers 503 with Retry-After, at once, without
queueing the message in the client's reconnect buffer (where it could be stored after we said
503).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.js.api import PubAck
from nats.js.errors import NotFoundError

from api.errors import ServiceUnavailable
from api.group_commit import GroupCommitPublisher
from contracts.commands import COMMAND_TIMEOUT_S
from contracts.events import EventModel
from shared.atomic_batch import OutgoingMessage
from shared.nats_client import RECONNECT_WAIT_S, connect_once
from shared.observability import PUBLISH_SECONDS
from shared.provisioning import missing_streams
from shared.publishing import PUBLISH_TIMEOUT_S, event_headers
from shared.settings import Settings

log = logging.getLogger(__name__)
UNAVAILABLE = "Event store unavailable; retry shortly"


class EventStore:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._nc: NatsClient | None = None
        self._publisher: GroupCommitPublisher | None = None
        self._connector: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Connect in the background: the api answers 503 until NATS is reachable."""
        self._connector = asyncio.create_task(self._connect_until_done())

    async def stop(self) -> None:
        if self._connector is not None:
            self._connector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._connector
        if self._nc is not None and not self._nc.is_closed:
            await self._nc.drain()

    async def _connect_until_done(self) -> None:
        while self._nc is None:  # bounded by cancellation at shutdown
            try:
                nc = await connect_once(self.settings, "ingress", "payments-api")
                self._publisher = GroupCommitPublisher(nc, PUBLISH_TIMEOUT_S)
                self._nc = nc
            except Exception as error:
                log.warning("nats not reachable yet", extra={"error": type(error).__name__})
                await asyncio.sleep(RECONNECT_WAIT_S)

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    def _client(self) -> NatsClient:
        if self._nc is None or not self._nc.is_connected:
            raise ServiceUnavailable(UNAVAILABLE)
        return self._nc

    def _connected_publisher(self) -> GroupCommitPublisher:
        self._client()
        if self._publisher is None:
            raise ServiceUnavailable(UNAVAILABLE)
        return self._publisher

    async def publish(self, *, stream: str, subject: str, event: EventModel, key: str) -> PubAck:
        """Store `event` under `key`; `ack.duplicate` is true when the stream already had `key`."""
        publisher = self._connected_publisher()
        message = OutgoingMessage(
            subject=subject,
            body=event.model_dump_json().encode(),
            headers=event_headers(event, key),
        )
        started = time.perf_counter()
        try:
            ack = await publisher.publish(stream, message)
        except (nats.errors.Error, TimeoutError, OSError) as error:
            log.warning("publish failed", extra={"stream": stream, "error": type(error).__name__})
            raise ServiceUnavailable(UNAVAILABLE) from None
        PUBLISH_SECONDS.labels(stream).observe(time.perf_counter() - started)
        return ack

    async def request(self, subject: str, payload: bytes) -> bytes:
        nc = self._client()
        try:
            reply = await nc.request(subject, payload, timeout=COMMAND_TIMEOUT_S)
        except nats.errors.NoRespondersError:
            raise ServiceUnavailable("No worker is available to answer; retry shortly") from None
        except (nats.errors.Error, TimeoutError, OSError):
            raise ServiceUnavailable("The worker did not answer in time; retry shortly") from None
        return bytes(reply.data)

    async def missing_streams(self) -> list[str] | None:
        """Streams that do not exist, or None when NATS cannot be asked."""
        if not self.connected or self._nc is None:
            return None
        try:
            return await missing_streams(self._nc.jetstream())
        except (nats.errors.Error, TimeoutError, NotFoundError):
            return None
