"""Stream and durable-consumer definitions, as data; `payments nats provision` creates them.

Every stream uses `limits` retention and file storage, so it stays replayable: `payments replay`
rebuilds every projection from these streams. Every consumer is a durable pull consumer with
explicit acks and bounded redelivery, shared by all copies of one worker role.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from contracts import subjects

# How long JetStream remembers a Nats-Msg-Id. It only absorbs retry storms; the database's unique
# event key is the lasting guard against a second effect.
DUPLICATE_WINDOW_S = 120.0
# Largest message a stream accepts; the ingress refuses bigger bodies before publishing.
MAX_MESSAGE_BYTES = 1024 * 1024
# Time a worker has to commit and ack one fetched batch before JetStream redelivers it.
ACK_WAIT_S = 30.0
# Ordered partitions wait for a crashed worker's message this long before redelivering it.
PARTITION_ACK_WAIT_S = 10.0
# Deliveries after which a worker dead-letters a message that still fails.
MAX_ATTEMPTS = 8
# The server's own bound, a little above MAX_ATTEMPTS so a failed dead-letter write is retried.
MAX_DELIVER = MAX_ATTEMPTS + 2
# Redelivery delays after a transient failure, by attempt (the last one repeats).
RETRY_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0)


@dataclass(frozen=True)
class StreamSpec:
    name: str
    subjects: tuple[str, ...]
    description: str
    max_age_s: float = 0.0  # 0 keeps everything: replay needs the whole history.
    deny_delete: bool = True
    deny_purge: bool = True


@dataclass(frozen=True)
class ConsumerSpec:
    stream: str
    durable: str
    filter_subjects: tuple[str, ...]
    description: str
    batch_size: int = 256
    # 1 makes the consumer strictly ordered across every copy of the worker.
    max_ack_pending: int = 4096
    ack_wait_s: float = ACK_WAIT_S
    max_deliver: int = MAX_DELIVER
    # How long a pull waits when nothing is waiting. With messages already pending, nats-py's
    # fetch returns at once with what is there (often a few), so batches are small under load.
    fetch_timeout_s: float = 0.1
    extra: dict[str, str] = field(default_factory=dict)


HEALTH = StreamSpec(
    name="HEALTH",
    subjects=(f"{subjects.HEALTH_REPORTS}.>",),
    description="Health reports from forwarders and the poller, one subject per orchestrator.",
)
REGISTRY = StreamSpec(
    name="REGISTRY",
    subjects=(f"{subjects.REGISTRY_EVENTS}.>",),
    description="Registration decisions (public, bootstrap, single mode, invites), in apply order.",
)
SESSIONS = StreamSpec(
    name="SESSIONS",
    subjects=(f"{subjects.SESSIONS_EVENTS}.>", f"{subjects.SESSIONS_TICKS}.>"),
    description="Edge session events and the idle/lease ticks that close them.",
)
WORKLOADS = StreamSpec(
    name="WORKLOADS",
    subjects=(f"{subjects.WORKLOADS}.>", f"{subjects.JOBS}.>"),
    description="Content workloads, ledger adjustments and recording-job events.",
)
LEDGER = StreamSpec(
    name="LEDGER",
    subjects=(f"{subjects.LEDGER_ENTRIES}.>",),
    description="Every committed ledger entry, one subject per orchestrator, for readers.",
)
PAYOUTS = StreamSpec(
    name="PAYOUTS",
    subjects=(f"{subjects.PAYOUTS}.>",),
    description="Payout state changes and transaction events.",
)
AUDIT = StreamSpec(
    name="AUDIT",
    subjects=(f"{subjects.AUDIT}.>",),
    description="Audit events of every domain; never carries a secret.",
)

ALL_STREAMS: tuple[StreamSpec, ...] = (
    HEALTH,
    REGISTRY,
    SESSIONS,
    WORKLOADS,
    LEDGER,
    PAYOUTS,
    AUDIT,
)

REGISTRY_HEALTH_CONSUMER = ConsumerSpec(
    stream=HEALTH.name,
    durable="registry-health",
    filter_subjects=(f"{subjects.HEALTH_REPORTS}.>",),
    description="Registry worker: stores health snapshots.",
)
REGISTRY_EVENTS_CONSUMER = ConsumerSpec(
    stream=REGISTRY.name,
    durable="registry-events",
    filter_subjects=(f"{subjects.REGISTRY_EVENTS}.>",),
    description="Registry worker: applies registrations strictly in stream order.",
    batch_size=64,
    max_ack_pending=1,
)

LEDGER_WORKLOADS_CONSUMER = ConsumerSpec(
    stream=WORKLOADS.name,
    durable="ledger-workloads",
    filter_subjects=(f"{subjects.WORKLOADS}.>",),
    description="Ledger worker: credits workloads and applies adjustments.",
    batch_size=1024,
    # Each copy holds a batch in hand and one prefetched: room for four copies.
    max_ack_pending=8192,
)

JOBS_PROJECTION_CONSUMER = ConsumerSpec(
    stream=WORKLOADS.name,
    durable="jobs-projection",
    filter_subjects=(f"{subjects.JOBS}.>",),
    description="Jobs worker: applies recording-job events to the jobs table, in stream order.",
    batch_size=64,
    max_ack_pending=1,
)
JOBS_DRIVER_CONSUMER = ConsumerSpec(
    stream=WORKLOADS.name,
    durable="jobs-driver",
    filter_subjects=(f"{subjects.JOBS}.requested.>", f"{subjects.JOBS}.steps.>"),
    description=(
        "Jobs worker: runs the next step of a job after its request or last finished step; "
        "a message held by a crashed copy is redelivered to another, which resumes the job."
    ),
    batch_size=16,
    max_ack_pending=1024,
)


PAYOUTS_LEDGER_CONSUMER = ConsumerSpec(
    stream=LEDGER.name,
    durable="payouts-ledger",
    filter_subjects=(f"{subjects.LEDGER_ENTRIES}.>",),
    description="Payouts worker: a balance moved, so see whether it is due a payout.",
    batch_size=256,
)
PAYOUTS_DEBITS_CONSUMER = ConsumerSpec(
    stream=PAYOUTS.name,
    durable="payouts-debits",
    filter_subjects=(f"{subjects.PAYOUTS}.state.>",),
    description=(
        "Payouts worker: the payout debit of every paid payout, already written with the "
        "payout; replay rebuilds the debits from here."
    ),
    batch_size=64,
)


def session_partition_consumer(partition: int) -> ConsumerSpec:
    """One durable per partition, strictly ordered: one message in flight across all copies."""
    return ConsumerSpec(
        stream=SESSIONS.name,
        durable=f"sessions-p{partition}",
        filter_subjects=(
            f"{subjects.SESSIONS_EVENTS}.{partition}.>",
            f"{subjects.SESSIONS_TICKS}.{partition}",
        ),
        description=f"Sessions worker: partition {partition}: session events and ticks, in order.",
        batch_size=1,
        max_ack_pending=1,
        # A crashed worker's message holds its partition until redelivered: keep this short.
        ack_wait_s=PARTITION_ACK_WAIT_S,
    )


SESSION_PARTITION_CONSUMERS: tuple[ConsumerSpec, ...] = tuple(
    session_partition_consumer(p) for p in range(subjects.SESSION_PARTITIONS)
)

LICENSING_TICKS_CONSUMER = ConsumerSpec(
    stream=SESSIONS.name,
    durable="licensing-ticks",
    filter_subjects=(f"{subjects.SESSIONS_TICKS}.0",),
    description="Licensing worker: partition 0's ticks end expired image leases.",
    batch_size=16,
)
AUDIT_SINK_CONSUMER = ConsumerSpec(
    stream=AUDIT.name,
    durable="audit-sink",
    filter_subjects=(f"{subjects.AUDIT}.>",),
    description="Audit worker: appends audit events to data/audit/<domain>.log in stream order.",
    batch_size=1,
    max_ack_pending=1,
)

ALL_CONSUMERS: tuple[ConsumerSpec, ...] = (
    REGISTRY_HEALTH_CONSUMER,
    REGISTRY_EVENTS_CONSUMER,
    LEDGER_WORKLOADS_CONSUMER,
    JOBS_PROJECTION_CONSUMER,
    JOBS_DRIVER_CONSUMER,
    *SESSION_PARTITION_CONSUMERS,
    LICENSING_TICKS_CONSUMER,
    AUDIT_SINK_CONSUMER,
    PAYOUTS_LEDGER_CONSUMER,
    PAYOUTS_DEBITS_CONSUMER,
)


def stream_by_name(name: str) -> StreamSpec:
    for spec in ALL_STREAMS:
        if spec.name == name:
            return spec
    raise KeyError(name)
