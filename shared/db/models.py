"""SQLModel tables. Every table here is a projection of the streams, rebuilt by `payments replay`,
except `dead_letters`, which is the operators' record of what a worker could not apply.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, Index, Integer, LargeBinary, UniqueConstraint
from sqlmodel import Field, SQLModel

from shared.db.types import UtcDateTime, Wei

# 64-bit ids on PostgreSQL; SQLite only autoincrements a column declared exactly INTEGER.
BIG_ID = BigInteger().with_variant(Integer(), "sqlite")


def _id() -> Any:
    return Field(default=None, sa_column=Column(BIG_ID, primary_key=True, autoincrement=True))


def _utc(nullable: bool = True, index: bool = False) -> Any:
    return Field(default=None, sa_column=Column(UtcDateTime(), nullable=nullable, index=index))


def _json() -> Any:
    return Field(default=None, sa_column=Column(JSON(), nullable=True))


class Orchestrator(SQLModel, table=True):
    __tablename__ = "orchestrators"

    orchestrator_id: str = Field(primary_key=True, max_length=128)
    address: str = Field(max_length=42, unique=True)
    # Stream sequence of the first registration: the "insertion order" session attribution uses.
    registration_order: int = Field(sa_type=BigInteger, index=True)
    eligible_for_payments: bool = True
    is_top_100: bool = True
    denylisted: bool = False
    registration_count: int = 0
    first_seen: datetime | None = _utc()
    last_seen: datetime | None = _utc()
    last_seen_ip: str | None = Field(default=None, max_length=64)
    last_contact_source: str | None = Field(default=None, max_length=64)
    contact_email: str | None = Field(default=None, max_length=255)
    capability: str | None = Field(default=None, max_length=128)
    host_public_ip: str | None = Field(default=None, max_length=64)
    host_name: str | None = Field(default=None, max_length=128)
    health_url: str | None = Field(default=None, max_length=512)
    health_timeout: float | None = None
    monitored_services: list[str] | None = _json()
    min_service_uptime: float | None = None
    last_healthy_at: datetime | None = _utc()
    last_missed_all_services: datetime | None = _utc()
    cooldown_expires_at: datetime | None = _utc()
    last_cooldown_started_at: datetime | None = _utc()
    last_cooldown_cleared_at: datetime | None = _utc()
    # Miss counting follows report times: the newest report counted, and the run of misses.
    health_checked_at: datetime | None = _utc()
    consecutive_misses: int = 0
    last_session_upstream_addr: str | None = Field(default=None, max_length=64)
    last_session_seen_at: datetime | None = _utc()
    last_session_edge_id: str | None = Field(default=None, max_length=64)
    forwarder_health_source: str | None = Field(default=None, max_length=64)
    forwarder_health_reported_at: datetime | None = _utc()
    forwarder_health_data: dict[str, Any] | None = _json()


class ProcessedEvent(SQLModel, table=True):
    """The inbox: one row per (consumer, event key), written in the same transaction as the effect.

    A redelivery finds its row and is only acked. `outcome` keeps the answer a command waits for.
    """

    __tablename__ = "processed_events"
    __table_args__ = (UniqueConstraint("consumer", "event_key", name="uq_processed_consumer_key"),)

    id: int | None = _id()
    consumer: str = Field(max_length=64)
    event_key: str = Field(max_length=300)
    stream: str = Field(max_length=32)
    stream_seq: int = Field(sa_type=BigInteger)
    outcome: dict[str, Any] | None = _json()


class DeadLetter(SQLModel, table=True):
    """A message a worker terminated: malformed, or still failing after MAX_ATTEMPTS deliveries."""

    __tablename__ = "dead_letters"
    __table_args__ = (
        UniqueConstraint("consumer", "stream", "stream_seq", name="uq_dead_letter_message"),
        Index("ix_dead_letters_status", "status"),
    )

    id: int | None = _id()
    consumer: str = Field(max_length=64)
    stream: str = Field(max_length=32)
    subject: str = Field(max_length=256)
    stream_seq: int = Field(sa_type=BigInteger)
    event_key: str | None = Field(default=None, max_length=300)
    error: str = Field(max_length=2000)
    body: bytes = Field(sa_column=Column(LargeBinary(), nullable=False))
    headers: dict[str, str] | None = _json()
    deliveries: int
    status: str = Field(default="dead", max_length=16)  # dead | retried
    created_at: datetime | None = _utc(nullable=False)
    retried_at: datetime | None = _utc()


class OutboxMessage(SQLModel, table=True):
    """A message to publish, written in the same transaction as the effect it reports.

    The relay publishes it after the commit with its event key as Nats-Msg-Id and marks it
    published; a crash in between leaves it pending, and the sweeper publishes it again (the
    stream's duplicate window and the readers' event keys absorb the second copy).
    """

    __tablename__ = "outbox"
    __table_args__ = (Index("ix_outbox_pending", "published_at", "id"),)

    id: int | None = _id()
    stream: str = Field(max_length=32)
    subject: str = Field(max_length=256)
    event_key: str = Field(max_length=300, unique=True)
    schema_name: str = Field(max_length=64)
    body: bytes = Field(sa_column=Column(LargeBinary(), nullable=False))
    created_at: datetime | None = _utc(nullable=False)
    published_at: datetime | None = _utc()


class Balance(SQLModel, table=True):
    """Per-orchestrator balance, updated in the same transaction as the entries it sums."""

    __tablename__ = "balances"

    orchestrator_id: str = Field(primary_key=True, max_length=128)
    balance_wei: int = Field(sa_column=Column(Wei(), nullable=False))
    entry_count: int = 0
    last_entry_id: int | None = Field(default=None, sa_type=BigInteger)


class LedgerEntry(SQLModel, table=True):
    """One append-only ledger entry. Never updated or deleted; a mistake gets a new entry
    (`corrects_entry_id`) that points at the old one.

    `entry_key` is unique: a second entry for the same source cannot be written, on SQLite or
    PostgreSQL, whatever the application does.
    """

    __tablename__ = "ledger_entries"
    __table_args__ = (Index("ix_ledger_orchestrator_id", "orchestrator_id", "id"),)

    id: int | None = _id()
    entry_key: str = Field(max_length=300, unique=True)
    orchestrator_id: str = Field(max_length=128)
    amount_wei: int = Field(sa_column=Column(Wei(), nullable=False))
    balance_after_wei: int = Field(sa_column=Column(Wei(), nullable=False))
    reason: str = Field(max_length=256)
    source_stream: str = Field(max_length=32)
    source_seq: int = Field(sa_type=BigInteger)
    source_key: str = Field(max_length=300)
    entry_metadata: dict[str, Any] | None = Field(
        default=None, sa_column=Column("metadata", JSON(), nullable=True)
    )
    occurred_at: datetime | None = _utc(nullable=False, index=True)
    corrects_entry_id: int | None = Field(default=None, sa_type=BigInteger)


class Workload(SQLModel, table=True):
    """Content workloads: time-based (credited on arrival), fixed-price (credited once verified)."""

    __tablename__ = "workloads"
    __table_args__ = (
        Index("ix_workloads_orchestrator_submitted", "orchestrator_id", "submitted_at"),
        Index("ix_workloads_artifact_hash", "artifact_hash"),
    )

    workload_id: str = Field(primary_key=True, max_length=255)
    orchestrator_id: str = Field(max_length=128)
    kind: str = Field(max_length=16)  # time | fixed
    status: str = Field(max_length=16)
    plan_id: str | None = Field(default=None, max_length=128)
    run_id: str | None = Field(default=None, max_length=256)
    artifact_hash: str | None = Field(default=None, max_length=256)
    artifact_uri: str | None = Field(default=None, max_length=512)
    notes: str | None = Field(default=None, max_length=1024)
    tx_hash: str | None = Field(default=None, max_length=128)
    job_id: str | None = Field(default=None, max_length=255)
    payout_amount_wei: int = Field(sa_column=Column(Wei(), nullable=False))
    duration_ms: int | None = Field(default=None, sa_type=BigInteger)
    credit_eth_per_minute: str | None = Field(default=None, max_length=64)
    body_sha256: str = Field(max_length=64)
    submitted_at: datetime | None = _utc(nullable=False, index=True)
    updated_at: datetime | None = _utc(nullable=False)
    credited: bool = False
    credited_at: datetime | None = _utc()


class Session(SQLModel, table=True):
    """An edge's Pixel Streaming session: its state machine and what has been billed."""

    __tablename__ = "sessions"
    __table_args__ = (
        Index("ix_sessions_partition_live", "partition", "ended_at"),
        Index("ix_sessions_upstream_addr", "upstream_addr", "last_seen_at"),
        Index("ix_sessions_orchestrator_started", "orchestrator_id", "started_at"),
    )

    session_id: str = Field(primary_key=True, max_length=128)
    partition: int
    orchestrator_id: str | None = Field(default=None, max_length=128)
    upstream_addr: str = Field(max_length=64)
    upstream_port: int
    edge_id: str | None = Field(default=None, max_length=64)
    # Incremented each time an ended session starts again: credits of each run are keyed apart.
    run: int = 0
    started_at: datetime | None = _utc(nullable=False)
    last_seen_at: datetime | None = _utc(nullable=False)
    ended_at: datetime | None = _utc()
    end_trigger: str | None = Field(default=None, max_length=16)
    last_event: str = Field(max_length=16)
    updated_at: datetime | None = _utc(nullable=False)
    last_billed_at: datetime | None = _utc(nullable=False)
    billed_ms: int = Field(default=0, sa_type=BigInteger)
    billed_wei: int = Field(default=0, sa_column=Column(Wei(), nullable=False))
    last_credited_wei: int = Field(default=0, sa_column=Column(Wei(), nullable=False))
    metered_ms: int = Field(default=0, sa_type=BigInteger)
    segment_index: int = 0
    heartbeat_count: int = 0
    segments: list[dict[str, Any]] | None = _json()
    last_credit_proof: str | None = Field(default=None, max_length=80)
    # Terms stamped into the last event by the ingress; ticks bill with them.
    credit_eth_per_minute: str = Field(default="0", max_length=64)
    segment_seconds: int = 2400
    idle_timeout_seconds: float = 120.0


class ActivityLease(SQLModel, table=True):
    """Activity leases that autosleep watchers read: `session:<id>` ones and manual ones."""

    __tablename__ = "activity_leases"
    __table_args__ = (
        Index("ix_activity_leases_orchestrator", "orchestrator_id", "expires_at"),
        Index("ix_activity_leases_partition", "partition", "expires_at"),
    )

    lease_id: str = Field(primary_key=True, max_length=160)
    partition: int
    orchestrator_id: str = Field(max_length=128)
    upstream_addr: str | None = Field(default=None, max_length=255)
    kind: str = Field(max_length=32)
    lease_metadata: dict[str, Any] | None = Field(
        default=None, sa_column=Column("metadata", JSON(), nullable=True)
    )
    lease_seconds: int
    issued_at: datetime | None = _utc(nullable=False)
    last_seen_at: datetime | None = _utc(nullable=False)
    last_seen_ip: str | None = Field(default=None, max_length=64)
    expires_at: datetime | None = _utc(nullable=False)
    revoked_at: datetime | None = _utc()
    expired_at: datetime | None = _utc()


class LicenseImage(SQLModel, table=True):
    """An encrypted image's secret (sealed, never plaintext) and where its artifact lives."""

    __tablename__ = "license_images"

    image_ref: str = Field(primary_key=True, max_length=512)
    secret_sealed: bytes = Field(sa_column=Column(LargeBinary(), nullable=False))
    artifact_s3_uri: str | None = Field(default=None, max_length=2048)
    created_at: datetime | None = _utc(nullable=False)
    rotated_at: datetime | None = _utc(nullable=False)
    revoked_at: datetime | None = _utc()


class OrchestratorToken(SQLModel, table=True):
    """An orchestrator's API token, stored only as `sha256:<hex>`."""

    __tablename__ = "orchestrator_tokens"

    token_id: str = Field(primary_key=True, max_length=32)
    orchestrator_id: str = Field(max_length=128, index=True)
    token_hash: str = Field(max_length=80, unique=True)
    created_at: datetime | None = _utc(nullable=False)
    revoked_at: datetime | None = _utc()
    last_seen_at: datetime | None = _utc()


class LicenseAccess(SQLModel, table=True):
    __tablename__ = "license_access"

    orchestrator_id: str = Field(primary_key=True, max_length=128)
    image_ref: str = Field(primary_key=True, max_length=512)
    granted_at: datetime | None = _utc(nullable=False)


class LicenseInvite(SQLModel, table=True):
    """A wallet-bound, single-use invite; the code is stored only as `sha256:<hex>`."""

    __tablename__ = "license_invites"

    invite_id: str = Field(primary_key=True, max_length=32)
    code_hash: str = Field(max_length=80, unique=True)
    image_ref: str = Field(max_length=512)
    bound_address: str = Field(max_length=42)
    created_at: datetime | None = _utc(nullable=False)
    expires_at: datetime | None = _utc(nullable=False)
    note: str | None = Field(default=None, max_length=256)
    revoked_at: datetime | None = _utc()
    redeeming_at: datetime | None = _utc()
    redeemed_at: datetime | None = _utc()
    redeemed_by: str | None = Field(default=None, max_length=128)
    redeemed_ip: str | None = Field(default=None, max_length=64)
    redeemed_address: str | None = Field(default=None, max_length=42)
    redeemed_token_id: str | None = Field(default=None, max_length=32)


class LicenseLease(SQLModel, table=True):
    __tablename__ = "license_leases"
    __table_args__ = (Index("ix_license_leases_expiry", "revoked_at", "expires_at"),)

    lease_id: str = Field(primary_key=True, max_length=32)
    orchestrator_id: str = Field(max_length=128, index=True)
    image_ref: str = Field(max_length=512, index=True)
    token_id: str | None = Field(default=None, max_length=32)
    lease_seconds: int
    issued_at: datetime | None = _utc(nullable=False)
    last_seen_at: datetime | None = _utc(nullable=False)
    last_seen_ip: str | None = Field(default=None, max_length=64)
    expires_at: datetime | None = _utc(nullable=False)
    revoked_at: datetime | None = _utc()
    end_reason: str | None = Field(default=None, max_length=32)


class RecordingJob(SQLModel, table=True):
    """A recording job: the request, the last step the jobs worker finished, and its outcome.

    A projection of the `jobs.>` events on WORKLOADS. `last_step_key` is the event key of the
    newest request or step event applied: the one event the jobs worker drives next.
    """

    __tablename__ = "recording_jobs"
    __table_args__ = (Index("ix_recording_jobs_orchestrator_state", "orchestrator_id", "state"),)

    job_id: str = Field(primary_key=True, max_length=160)
    orchestrator_id: str = Field(max_length=128)
    state: str = Field(max_length=16)  # pending | running | completed | failed | cancelled
    step: str = Field(max_length=32)
    created_at: datetime | None = _utc(nullable=False, index=True)
    updated_at: datetime | None = _utc(nullable=False)
    started_at: datetime | None = _utc()
    ended_at: datetime | None = _utc()
    cancel_requested_at: datetime | None = _utc()
    plan_id: str | None = Field(default=None, max_length=128)
    run_id: str | None = Field(default=None, max_length=256)
    notes: str | None = Field(default=None, max_length=1024)
    recording_label: str | None = Field(default=None, max_length=128)
    recording_streamer_id: str | None = Field(default=None, max_length=128)
    wake_seconds: int | None = None
    max_wait_seconds: int
    delete_after_upload: bool = True
    script: dict[str, Any] | None = _json()
    credit_eth_per_minute: str = Field(max_length=64)
    host: str | None = Field(default=None, max_length=255)
    recording_file: str | None = Field(default=None, max_length=255)
    runner_session_id: str | None = Field(default=None, max_length=128)
    script_started_at: datetime | None = _utc()
    workload_id: str | None = Field(default=None, max_length=255)
    duration_ms: int | None = Field(default=None, sa_type=BigInteger)
    artifact_uri: str | None = Field(default=None, max_length=1024)
    artifact_hash: str | None = Field(default=None, max_length=256)
    error: str | None = Field(default=None, max_length=1024)
    steps: list[dict[str, Any]] | None = _json()
    last_step_key: str = Field(max_length=300)
