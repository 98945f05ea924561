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


WorkloadStatus = Literal["pending", "verified", "paid", "rejected"]


class WorkloadTimeRecordedV1(EventModel):
    """A time-based content workload, priced at the rate in force when the ingress received it."""

    SCHEMA: ClassVar[str] = "workloads.time.v1"
    workload_id: str = Field(min_length=1, max_length=255)
    orchestrator_id: str = Field(min_length=1, max_length=128)
    duration_ms: int = Field(gt=0, le=86_400_000)
    credit_eth_per_minute: str = Field(max_length=64)
    plan_id: str | None = Field(default=None, max_length=128)
    run_id: str | None = Field(default=None, max_length=256)
    artifact_hash: str | None = Field(default=None, max_length=256)
    artifact_uri: str | None = Field(default=None, max_length=512)
    notes: str | None = Field(default=None, max_length=1024)
    status: WorkloadStatus = "verified"
    job_id: str | None = Field(default=None, max_length=255)
    body_sha256: str = Field(min_length=64, max_length=64)
    received_at: UtcDatetime


class WorkloadSubmittedV1(EventModel):
    """A fixed-price workload, stored pending; it is credited when an update verifies it."""

    SCHEMA: ClassVar[str] = "workloads.fixed.v1"
    workload_id: str = Field(min_length=1, max_length=255)
    orchestrator_id: str = Field(min_length=1, max_length=128)
    payout_amount_wei: int = Field(gt=0)
    plan_id: str | None = Field(default=None, max_length=128)
    run_id: str | None = Field(default=None, max_length=256)
    artifact_hash: str | None = Field(default=None, max_length=256)
    artifact_uri: str | None = Field(default=None, max_length=512)
    notes: str | None = Field(default=None, max_length=1024)
    body_sha256: str = Field(min_length=64, max_length=64)
    received_at: UtcDatetime


class WorkloadUpdatedV1(EventModel):
    """An admin's PATCH of a workload; only the fields given change."""

    SCHEMA: ClassVar[str] = "workloads.update.v1"
    workload_id: str = Field(min_length=1, max_length=255)
    orchestrator_id: str = Field(min_length=1, max_length=128)
    status: WorkloadStatus | None = None
    notes: str | None = Field(default=None, max_length=1024)
    tx_hash: str | None = Field(default=None, max_length=128)
    artifact_uri: str | None = Field(default=None, max_length=512)
    artifact_hash: str | None = Field(default=None, max_length=256)
    received_at: UtcDatetime


class LedgerAdjustmentV1(EventModel):
    """An admin's adjustment: a signed amount with a reason, applied as its own ledger entry."""

    SCHEMA: ClassVar[str] = "ledger.adjustment.v1"
    orchestrator_id: str = Field(min_length=1, max_length=128)
    amount_wei: int
    reason: str = Field(min_length=1, max_length=256)
    reference_workload_id: str | None = Field(default=None, max_length=256)
    notes: str | None = Field(default=None, max_length=1024)
    metadata: dict[str, Any] = Field(default_factory=dict)
    corrects_entry_id: int | None = None
    received_at: UtcDatetime


class LedgerEntryV1(EventModel):
    """A committed ledger entry, as published to the LEDGER stream for downstream readers."""

    SCHEMA: ClassVar[str] = "ledger.entry.v1"
    entry_id: int
    entry_key: str
    orchestrator_id: str
    amount_wei: int
    balance_after_wei: int
    reason: str
    source_stream: str
    source_seq: int
    source_key: str
    metadata: dict[str, Any]
    occurred_at: UtcDatetime


PayoutStatus = Literal[
    "claimed",
    "signed",
    "broadcast",
    "paid",
    "short_paid",
    "retry",
    "reverted",
    "failed",
    "expired",
    "simulated",
    "skipped",
]


class PayoutStateV1(EventModel):
    """A payout reached `status`. `paid` and `short_paid` carry the debit the ledger holds for
    it (entry key `payout:<payout_key>`), which `payments replay` rebuilds from this event."""

    SCHEMA: ClassVar[str] = "payouts.state.v1"
    payout_key: str
    orchestrator_id: str
    recipient: str
    strategy: str
    status: PayoutStatus
    amount_wei: int
    paid_wei: int | None = None
    tx_hash: str | None = None
    nonce: int | None = None
    ticket_hash: str | None = None
    reason: str | None = None
    occurred_at: UtcDatetime


class ChainTransactionV1(EventModel):
    """A transaction of the payer account changed state (signed, broadcast, replaced, mined,
    reverted)."""

    SCHEMA: ClassVar[str] = "payouts.transaction.v1"
    kind: str
    sender: str
    nonce: int
    status: str
    tx_hash: str
    hashes: list[str]
    payout_keys: list[str]
    block_number: int | None = None
    occurred_at: UtcDatetime


SessionEventKind = Literal["start", "heartbeat", "end"]


class SessionEventV1(EventModel):
    """An edge's session event, with the billing terms in force when the ingress received it."""

    SCHEMA: ClassVar[str] = "sessions.event.v1"
    session_id: str = Field(min_length=1, max_length=128)
    upstream_addr: str = Field(min_length=2, max_length=64)
    upstream_port: int = Field(ge=1, le=65535)
    edge_id: str | None = Field(default=None, max_length=64)
    event: SessionEventKind
    received_at: UtcDatetime
    credit_eth_per_minute: str = Field(max_length=64)
    segment_seconds: int = Field(gt=0)
    idle_timeout_seconds: float = Field(gt=0)
    lease_seconds: int = Field(gt=0)


class SessionTickV1(EventModel):
    """A clock tick for one partition: closes idle sessions and expires leases up to `at`."""

    SCHEMA: ClassVar[str] = "sessions.tick.v1"
    partition: int = Field(ge=0)
    at: UtcDatetime


LeaseAction = Literal["issue", "heartbeat", "revoke"]


class ActivityLeaseCommandV1(EventModel):
    """An admin's activity-lease command; `lease_seconds` is already clamped by the ingress."""

    SCHEMA: ClassVar[str] = "activity.lease.v1"
    action: LeaseAction
    lease_id: str = Field(min_length=1, max_length=160)
    orchestrator_id: str | None = Field(default=None, max_length=128)
    upstream_addr: str | None = Field(default=None, max_length=255)
    kind: str | None = Field(default=None, max_length=32)
    lease_seconds: int | None = Field(default=None, gt=0)
    metadata: dict[str, Any] | None = None
    request_ip: str | None = Field(default=None, max_length=64)
    received_at: UtcDatetime


# The steps of a recording job, in order; each one's result is a JobStepRecordedV1.
JOB_STEPS: tuple[str, ...] = (
    "started",
    "woken",
    "ready",
    "recording_started",
    "script_started",
    "script_finished",
    "recording_stopped",
    "uploaded",
)
JobStep = Literal[
    "started",
    "woken",
    "ready",
    "recording_started",
    "script_started",
    "script_finished",
    "recording_stopped",
    "uploaded",
]
JobEndState = Literal["completed", "failed", "cancelled"]


class JobRequestedV1(EventModel):
    """An admin's recording job, with the credit rate in force when the ingress received it."""

    SCHEMA: ClassVar[str] = "jobs.requested.v1"
    job_id: str = Field(min_length=1, max_length=156)
    orchestrator_id: str = Field(min_length=1, max_length=128)
    plan_id: str | None = Field(default=None, max_length=128)
    run_id: str | None = Field(default=None, max_length=256)
    notes: str | None = Field(default=None, max_length=1024)
    script: dict[str, Any]
    recording_label: str | None = Field(default=None, max_length=128)
    recording_streamer_id: str | None = Field(default=None, max_length=128)
    wake_seconds: int | None = Field(default=None, ge=0, le=86_400)
    max_wait_seconds: int = Field(ge=1, le=3600)
    delete_after_upload: bool
    credit_eth_per_minute: str = Field(max_length=64)
    received_at: UtcDatetime


class JobStepRecordedV1(EventModel):
    """One finished step of a job, stamped with the jobs worker's clock when it finished."""

    SCHEMA: ClassVar[str] = "jobs.step.v1"
    job_id: str = Field(min_length=1, max_length=156)
    orchestrator_id: str = Field(min_length=1, max_length=128)
    step: JobStep
    at: UtcDatetime
    host: str | None = Field(default=None, max_length=255)
    recording_file: str | None = Field(default=None, max_length=255)
    runner_session_id: str | None = Field(default=None, max_length=128)
    artifact_uri: str | None = Field(default=None, max_length=1024)
    artifact_hash: str | None = Field(default=None, max_length=256)
    duration_ms: int | None = Field(default=None, ge=0)
    detail: dict[str, Any] = Field(default_factory=dict)


class JobCancelRequestedV1(EventModel):
    """An admin asked to cancel a job; the jobs worker ends it at its next check."""

    SCHEMA: ClassVar[str] = "jobs.cancel.v1"
    job_id: str = Field(min_length=1, max_length=156)
    orchestrator_id: str = Field(min_length=1, max_length=128)
    received_at: UtcDatetime


class JobFinishedV1(EventModel):
    """A job's end: completed (its credit is stored on WORKLOADS), failed or cancelled."""

    SCHEMA: ClassVar[str] = "jobs.finished.v1"
    job_id: str = Field(min_length=1, max_length=156)
    orchestrator_id: str = Field(min_length=1, max_length=128)
    state: JobEndState
    at: UtcDatetime
    error: str | None = Field(default=None, max_length=1024)
    workload_id: str | None = Field(default=None, max_length=255)
