"""HTTP request and response models. Field names and limits follow the original service."""

from __future__ import annotations

import ipaddress
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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


WORKLOAD_STATUSES = ("pending", "verified", "paid", "rejected")


class _ArtifactFields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    workload_id: str = Field(min_length=1, max_length=255)
    orchestrator_id: str = Field(min_length=1, max_length=128)
    plan_id: str | None = Field(default=None, max_length=128)
    run_id: str | None = Field(default=None, max_length=256)
    artifact_hash: str | None = Field(default=None, max_length=256)
    artifact_uri: str | None = Field(default=None, max_length=512)
    notes: str | None = Field(default=None, max_length=1024)

    @model_validator(mode="after")
    def _needs_artifact(self) -> _ArtifactFields:
        if not (self.artifact_hash or self.artifact_uri):
            raise ValueError("artifact_hash or artifact_uri is required")
        return self


# Amounts a ledger entry can hold: whole wei, below 2**256 (a uint256, NUMERIC(78, 0)).
MAX_WEI = 2**256
_MAX_ETH = Decimal(f"{MAX_WEI}E-18")  # exact; compared without arithmetic, which would round


def whole_wei(name: str, value: Decimal) -> Decimal:
    """An ETH amount of whole wei that fits a uint256; otherwise a clear validation error."""
    exponent = value.normalize().as_tuple().exponent
    if isinstance(exponent, int) and exponent < -18:
        raise ValueError(f"{name} has more than 18 decimal places (smaller than 1 wei)")
    if value.copy_abs() >= _MAX_ETH:
        raise ValueError(f"{name} is too large (at most 2**256 - 1 wei)")
    return value


class WorkloadTimeRequest(_ArtifactFields):
    duration_ms: int = Field(gt=0, le=86_400_000)
    # Checked by the handler after the orchestrator lookup, as the original did (400, not 422).
    status: str = Field(default="verified", max_length=32)


class WorkloadCreateRequest(_ArtifactFields):
    payout_amount_eth: Decimal = Field(gt=0)

    @field_validator("payout_amount_eth")
    @classmethod
    def _whole_wei(cls, value: Decimal) -> Decimal:
        return whole_wei("payout_amount_eth", value)


class WorkloadPatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: Literal["pending", "verified", "paid", "rejected"] | None = None
    notes: str | None = Field(default=None, max_length=1024)
    tx_hash: str | None = Field(default=None, max_length=128)
    artifact_uri: str | None = Field(default=None, max_length=512)
    artifact_hash: str | None = Field(default=None, max_length=256)


class WorkloadRecord(BaseModel):
    workload_id: str
    orchestrator_id: str
    plan_id: str | None
    run_id: str | None
    artifact_hash: str | None
    artifact_uri: str | None
    payout_amount_eth: str
    status: str
    submitted_at: datetime | None
    notes: str | None
    tx_hash: str | None
    credited: bool
    credited_at: datetime | None


class AdjustmentRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    orchestrator_id: str = Field(min_length=1, max_length=128)
    amount_eth: Decimal
    reason: str = Field(default="adjustment", min_length=1, max_length=256)
    reference_workload_id: str | None = Field(default=None, max_length=256)
    notes: str | None = Field(default=None, max_length=1024)

    @field_validator("amount_eth")
    @classmethod
    def _non_zero_whole_wei(cls, value: Decimal) -> Decimal:
        if not value.is_finite() or value == 0:
            raise ValueError("amount_eth must be a non-zero number")
        return whole_wei("amount_eth", value)


class SessionEventRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    session_id: str = Field(min_length=1, max_length=128)
    upstream_addr: str = Field(min_length=2, max_length=64)
    upstream_port: int = Field(ge=1, le=65535)
    edge_id: str | None = Field(default=None, max_length=64)
    event: str = Field(default="heartbeat", max_length=16)
    event_id: str | None = Field(default=None, min_length=1, max_length=128)

    @field_validator("upstream_addr")
    @classmethod
    def _ip_literal(cls, value: str) -> str:
        try:
            return str(ipaddress.ip_address(value.strip()))
        except ValueError:
            raise ValueError(
                "upstream_addr must be an IP address literal, not a hostname"
            ) from None

    @field_validator("event")
    @classmethod
    def _event_kind(cls, value: str) -> str:
        kind = value.strip().lower()
        if kind not in ("start", "heartbeat", "end"):
            raise ValueError("event must be start, heartbeat or end")
        return kind


class ActivityLeaseRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    orchestrator_id: str = Field(min_length=1, max_length=128)
    upstream_addr: str | None = Field(default=None, max_length=255)
    kind: str = Field(default="workload", min_length=1, max_length=32)
    lease_seconds: int | None = Field(default=None, ge=30, le=86_400)
    metadata: dict[str, Any] | None = None


class ActivityLeaseHeartbeatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    orchestrator_id: str = Field(min_length=1, max_length=128)
    lease_seconds: int | None = Field(default=None, ge=30, le=86_400)


# `job:<job_id>` must fit an activity lease id (160 characters), so job ids stop at 156.
JOB_ID_MAX_CHARS = 156
JOB_STATES = ("pending", "running", "completed", "failed", "cancelled")


class JobRecordRequest(BaseModel):
    """`POST /api/jobs/record`: a recording job, with the original's fields and limits."""

    model_config = ConfigDict(extra="forbid")

    # No "/" (the job is read back at /api/jobs/{job_id}) and no whitespace.
    job_id: str | None = Field(
        default=None, min_length=1, max_length=JOB_ID_MAX_CHARS, pattern=r"^[^/\s]+$"
    )
    orchestrator_id: str = Field(min_length=1, max_length=128)
    plan_id: str | None = Field(default=None, max_length=128)
    run_id: str | None = Field(default=None, max_length=256)
    notes: str | None = Field(default=None, max_length=1024)
    # The runner's /scripts/execute payload; the jobs worker adds its own session_id.
    script: dict[str, Any]
    recording_label: str | None = Field(default=None, max_length=128)
    recording_streamer_id: str | None = Field(default=None, max_length=128)
    wake_seconds: int | None = Field(default=2400, ge=0, le=86_400)
    max_wait_seconds: int = Field(default=900, ge=30, le=3600)
    delete_after_upload: bool = True

    @field_validator("script")
    @classmethod
    def _script_has_commands(cls, value: dict[str, Any]) -> dict[str, Any]:
        commands = value.get("commands")
        if not isinstance(commands, list) or not commands:
            raise ValueError("script must have a non-empty commands list")
        return {key: item for key, item in value.items() if key != "session_id"}
