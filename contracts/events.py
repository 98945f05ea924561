"""Versioned message schemas for stream payloads (JSON) and the headers every message carries.

A schema name ends in its version (`health.report.v1`). A change that an old reader cannot read
gets a new name; old messages stay readable, because streams are replayed from the beginning.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from contracts.http import OrchestratorMetadata

# The idempotency key of the event: a unique key in the database, written with the effect.
EVENT_KEY_HEADER = "Payments-Event-Key"
# JetStream's publish de-duplication id; normally equal to the event key.
MSG_ID_HEADER = "Nats-Msg-Id"
SCHEMA_HEADER = "Payments-Schema"


def _require_utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("timestamp must carry a timezone")
    return value.astimezone(UTC)


UtcDatetime = Annotated[datetime, AfterValidator(_require_utc)]


class EventModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    SCHEMA: ClassVar[str]


class HealthReportV1(EventModel):
    """A health snapshot for one orchestrator, stamped with the ingress's receive time."""

    SCHEMA: ClassVar[str] = "health.report.v1"
    orchestrator_id: str = Field(min_length=1, max_length=128)
    source: str = Field(min_length=1, max_length=64)
    data: dict[str, Any]
    received_at: UtcDatetime


RegistrationOrigin = Literal["public", "bootstrap", "single", "invite"]


class OrchestratorRegisteredV1(EventModel):
    """A registration that passed the checks that need the outside world (rank, rate limits).

    The registry worker applies these strictly in stream order; address conflicts and the
    denylist are decided there, so a replay reaches the same decisions.
    """

    SCHEMA: ClassVar[str] = "registry.registered.v1"
    orchestrator_id: str = Field(min_length=1, max_length=128)
    address: str = Field(pattern=r"^0x[a-f0-9]{40}$")
    origin: RegistrationOrigin
    # None keeps the stored value (true for a new record), as the original's skip path does.
    is_top_100: bool | None
    metadata: OrchestratorMetadata
    request_ip: str | None = Field(default=None, max_length=64)
    registered_at: UtcDatetime


class AuditEventV1(EventModel):
    """One audit record. Producers put identifiers here, never a secret, token or invite code."""

    SCHEMA: ClassVar[str] = "audit.event.v1"
    domain: str = Field(min_length=1, max_length=32)
    event: str = Field(min_length=1, max_length=64)
    at: UtcDatetime
    fields: dict[str, Any]
