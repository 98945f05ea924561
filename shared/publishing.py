"""Publishing events to JetStream with their idempotency key, and waiting for the PubAck."""

from __future__ import annotations

from nats.js.api import PubAck
from nats.js.client import JetStreamContext

from contracts.events import EVENT_KEY_HEADER, MSG_ID_HEADER, SCHEMA_HEADER, EventModel

# How long a publisher waits for JetStream to store a message.
PUBLISH_TIMEOUT_S = 5.0


def event_headers(event: EventModel, key: str) -> dict[str, str]:
    return {MSG_ID_HEADER: key, EVENT_KEY_HEADER: key, SCHEMA_HEADER: event.SCHEMA}


async def publish_event(
    js: JetStreamContext,
    *,
    stream: str,
    subject: str,
    event: EventModel,
    key: str,
    timeout_s: float = PUBLISH_TIMEOUT_S,
) -> PubAck:
    """Publish and return the PubAck; `ack.duplicate` is true when the stream already had `key`."""
    return await js.publish(
        subject,
        event.model_dump_json().encode("utf-8"),
        timeout=timeout_s,
        stream=stream,
        headers=event_headers(event, key),
    )
