"""HTTP request and response models. Field names and limits follow the original service."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

ADDRESS_PATTERN = r"^0x[a-fA-F0-9]{40}$"
MAX_MONITORED_SERVICES = 25


class OrchestratorMetadata(BaseModel):
    """Optional descriptive fields an orchestrator registers with."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    capability: str | None = Field(default=None, max_length=128)
    contact_email: str | None = Field(default=None, max_length=255)
    host_public_ip: str | None = Field(default=None, max_length=64)
    host_name: str | None = Field(default=None, max_length=128)
    services_healthy: bool | None = None
    health_url: str | None = Field(default=None, max_length=512)
    health_timeout: float | None = Field(default=None, ge=0.1, le=60)
    monitored_services: list[str] | None = None
    min_service_uptime: float | None = Field(default=None, ge=0, le=100)

    @field_validator("contact_email")
    @classmethod
    def _email_shape(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip()
        if "@" not in value or value.startswith("@") or value.endswith("@"):
            raise ValueError("contact_email must look like name@host")
        return value

    @field_validator("monitored_services")
    @classmethod
    def _services(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        cleaned = [item.strip() for item in value if item and item.strip()]
        if len(cleaned) > MAX_MONITORED_SERVICES:
            raise ValueError(f"at most {MAX_MONITORED_SERVICES} monitored_services are allowed")
        if any(len(item) > 128 for item in cleaned):
            raise ValueError("each monitored service name must be at most 128 characters")
        return cleaned


class RegisterRequest(OrchestratorMetadata):
    orchestrator_id: str = Field(min_length=1, max_length=128)
    address: str = Field(pattern=ADDRESS_PATTERN)


class RegisterResponse(BaseModel):
    orchestrator_id: str
    address: str
    balance_eth: str
    eligible_for_payments: bool
    is_top_100: bool
    denylisted: bool
    registration_count: int
    cooldown_expires_at: datetime | None
    message: str


class HealthReportRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str = Field(default="forwarder", min_length=1, max_length=64)
    data: dict[str, Any]


class AcceptedResponse(BaseModel):
    ok: bool = True
    event_key: str
    duplicate: bool


class ForwarderHealth(BaseModel):
    source: str
    reported_at: datetime
    data: dict[str, Any]


class OrchestratorRecord(BaseModel):
    orchestrator_id: str
    address: str
    balance_eth: str
    eligible_for_payments: bool
    is_top_100: bool
    denylisted: bool
    cooldown_expires_at: datetime | None
    cooldown_active: bool
    first_seen: datetime | None
    last_seen: datetime | None
    registration_count: int
    contact_email: str | None
    capability: str | None
    host_public_ip: str | None
    host_name: str | None
    last_seen_ip: str | None
    last_missed_all_services: datetime | None
    last_healthy_at: datetime | None
    last_cooldown_started_at: datetime | None
    last_cooldown_cleared_at: datetime | None
    health_url: str | None
    health_timeout: float | None
    monitored_services: list[str] | None
    min_service_uptime: float | None
    last_contact_source: str | None
    last_session_upstream_addr: str | None
    last_session_seen_at: datetime | None
    last_session_edge_id: str | None
    forwarder_health: ForwarderHealth | None
    active: bool
    active_reason: str | None
    in_use: bool
    active_sessions: int
    active_activity_leases: int


class ErrorBody(BaseModel):
    detail: str
