"""Which message travels on which subject: the map the generated AsyncAPI document is built from.

Every stream subject family names its stream, its message schemas (contracts.events) and who
publishes it; every request-reply command names its queue group, request and reply. A subject
template writes each variable token as `{name}` (what `contracts.subjects` fills in).
tests/test_generated_docs.py fails when a schema, a stream or a consumer is missing here.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel

from contracts import events, subjects
from contracts.commands import CommandReply, RegisterCommandV1
from contracts.licensing import LICENSING_COMMANDS, LICENSING_QUEUE, LicensingCommandV1
from contracts.streams import AUDIT, HEALTH, LEDGER, PAYOUTS, REGISTRY, SESSIONS, WORKLOADS


@dataclass(frozen=True)
class SubjectFamily:
    stream: str
    subject: str  # a template: `{name}` is one variable token
    messages: tuple[type[events.EventModel], ...]
    publishers: str
    description: str


@dataclass(frozen=True)
class Command:
    subject: str
    queue: str
    request: type[BaseModel]
    reply: type[BaseModel]
    description: str


ORCH = "{orchestrator}"

SUBJECT_FAMILIES: tuple[SubjectFamily, ...] = (
    SubjectFamily(
        HEALTH.name,
        f"{subjects.HEALTH_REPORTS}.{ORCH}",
        (events.HealthReportV1,),
        "api (forwarder reports)",
        "A health snapshot of one orchestrator.",
    ),
    SubjectFamily(
        REGISTRY.name,
        f"{subjects.REGISTRY_EVENTS}.{ORCH}",
        (events.OrchestratorRegisteredV1,),
        "registry worker",
        "A registration decision (public, bootstrap, single mode, invite), applied in order.",
    ),
    SubjectFamily(
        SESSIONS.name,
        f"{subjects.SESSIONS_EVENTS}.{{partition}}.{{session}}",
        (events.SessionEventV1, events.ActivityLeaseCommandV1),
        "api (edges, admin lease commands), jobs worker (job leases)",
        "An edge session event, or an activity-lease command (token `lease-<lease id>`); "
        "partition = sha256(session or lease id) mod 16.",
    ),
    SubjectFamily(
        SESSIONS.name,
        f"{subjects.SESSIONS_TICKS}.{{partition}}",
        (events.SessionTickV1,),
        "sessions worker",
        "A clock tick for one partition: closes idle sessions, expires leases.",
    ),
    SubjectFamily(
        WORKLOADS.name,
        f"{subjects.WORKLOADS}.time.{ORCH}",
        (events.WorkloadTimeRecordedV1,),
        "api, jobs worker (a finished job's credit)",
        "A time-based content workload, priced at the rate stamped by the ingress.",
    ),
    SubjectFamily(
        WORKLOADS.name,
        f"{subjects.WORKLOADS}.fixed.{ORCH}",
        (events.WorkloadSubmittedV1,),
        "api",
        "A fixed-price workload, stored pending until an update verifies it.",
    ),
    SubjectFamily(
        WORKLOADS.name,
        f"{subjects.WORKLOADS}.updates.{ORCH}",
        (events.WorkloadUpdatedV1,),
        "api",
        "An admin's change to a workload (status, notes, transaction, artifact).",
    ),
    SubjectFamily(
        WORKLOADS.name,
        f"{subjects.WORKLOADS}.adjustments.{ORCH}",
        (events.LedgerAdjustmentV1,),
        "api, standardize script",
        "A signed ledger adjustment with its reason.",
    ),
    SubjectFamily(
        WORKLOADS.name,
        f"{subjects.JOBS}.requested.{ORCH}",
        (events.JobRequestedV1,),
        "api",
        "A recording job was requested.",
    ),
    SubjectFamily(
        WORKLOADS.name,
        f"{subjects.JOBS}.steps.{ORCH}",
        (events.JobStepRecordedV1,),
        "jobs worker",
        "One finished step of a recording job.",
    ),
    SubjectFamily(
        WORKLOADS.name,
        f"{subjects.JOBS}.cancel.{ORCH}",
        (events.JobCancelRequestedV1,),
        "api",
        "An admin asked to cancel a recording job.",
    ),
    SubjectFamily(
        WORKLOADS.name,
        f"{subjects.JOBS}.finished.{ORCH}",
        (events.JobFinishedV1,),
        "jobs worker",
        "A recording job ended: completed, failed or cancelled.",
    ),
    SubjectFamily(
        LEDGER.name,
        f"{subjects.LEDGER_ENTRIES}.{ORCH}",
        (events.LedgerEntryV1,),
        "every worker that posts entries, through its outbox",
        "A committed ledger entry, for readers outside the pipeline.",
    ),
    SubjectFamily(
        PAYOUTS.name,
        f"{subjects.PAYOUTS}.state.{ORCH}",
        (events.PayoutStateV1,),
        "payouts worker, through its outbox",
        "A payout reached a state; paid ones carry the debit replay rebuilds.",
    ),
    SubjectFamily(
        PAYOUTS.name,
        f"{subjects.PAYOUTS}.transactions.{{sender}}",
        (events.ChainTransactionV1,),
        "payouts worker, through its outbox",
        "A transaction of the payer account changed state.",
    ),
    SubjectFamily(
        AUDIT.name,
        f"{subjects.AUDIT}.{{domain}}.{{event}}",
        (events.AuditEventV1,),
        "every worker, through its outbox",
        "An audit record: identifiers only, never a secret.",
    ),
)

COMMANDS: tuple[Command, ...] = (
    Command(
        subjects.REGISTER_COMMAND,
        "registry",
        RegisterCommandV1,
        CommandReply,
        "Register an orchestrator; the registry worker decides and answers.",
    ),
    Command(
        f"{LICENSING_COMMANDS}.{{name}}",
        LICENSING_QUEUE,
        LicensingCommandV1,
        CommandReply,
        "A licensing command (image.put, token.mint, invite.redeem, lease.take, ...); "
        "core NATS, never stored, so secrets may travel in it.",
    ),
)


def as_filter(template: str) -> str:
    """The NATS subject filter a template stands for: each `{name}` becomes `*`."""
    return ".".join("*" if token.startswith("{") else token for token in template.split("."))


def filter_covers(filter_subject: str, template: str) -> bool:
    """Whether a consumer's filter can receive messages of the family `template`.

    A variable token matches any filter token (a partition consumer's `3` takes some of
    `{partition}`); a literal token must equal a literal, or sit under `*` or `>`.
    """
    wanted, family = filter_subject.split("."), template.split(".")
    for index, token in enumerate(wanted):
        if token == ">":
            return len(family) > index
        if index >= len(family):
            return False
        theirs = family[index]
        if not (token == "*" or theirs.startswith("{") or token == theirs):
            return False
    return len(wanted) == len(family)
