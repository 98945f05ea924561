"""Request-reply commands: the api asks the owning worker and relays its answer.

Commands travel on core NATS subjects in a queue group, so exactly one worker copy answers.
A command's effect is never applied from the command itself: the worker publishes an event to a
stream and the projection is built from that event, so a replay sees it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from contracts.events import UtcDatetime
from contracts.http import RegisterRequest

# How long the api waits for a worker's answer before it answers 503.
COMMAND_TIMEOUT_S = 10.0


class RegisterCommandV1(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    request: RegisterRequest
    request_ip: str | None = Field(default=None, max_length=64)
    received_at: UtcDatetime


class CommandReply(BaseModel):
    """A worker's answer: an HTTP status and the body the api returns as is."""

    status: int
    body: dict[str, Any]
