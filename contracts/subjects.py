"""Subject names. Lower-case dot words that operators filter with `nats stream view --subject`.

An identifier becomes one subject token. Identifiers made only of letters, digits, `-` and `_`
are used as they are, so `nats sub 'health.reports.orch-1'` works as an operator expects. Anything
else (dots, spaces, wildcards) cannot be a NATS token, so it is replaced by `h-` and the first 32
hex digits of its sha256. The payload always carries the real identifier; the token only routes.
"""

from __future__ import annotations

import hashlib
import re

_SAFE_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

# Streams' subject spaces.
HEALTH_REPORTS = "health.reports"
REGISTRY_EVENTS = "registry.events"
SESSIONS_EVENTS = "sessions.events"
SESSIONS_TICKS = "sessions.ticks"
WORKLOADS = "workloads"
JOBS = "jobs"
LEDGER_ENTRIES = "ledger.entries"
PAYOUTS = "payouts"
AUDIT = "audit"

# Request-reply command subjects (core NATS, answered by a worker queue group; never stored).
REGISTRY_COMMANDS = "registry.commands"
REGISTER_COMMAND = f"{REGISTRY_COMMANDS}.register"


def token(identifier: str) -> str:
    """Return a subject token that stands for `identifier`."""
    if _SAFE_TOKEN.match(identifier):
        return identifier
    digest = hashlib.sha256(identifier.encode("utf-8")).hexdigest()[:32]
    return f"h-{digest}"


def health_report(orchestrator_id: str) -> str:
    return f"{HEALTH_REPORTS}.{token(orchestrator_id)}"


def registry_event(orchestrator_id: str) -> str:
    return f"{REGISTRY_EVENTS}.{token(orchestrator_id)}"


def ledger_entry(orchestrator_id: str) -> str:
    return f"{LEDGER_ENTRIES}.{token(orchestrator_id)}"


def payout_state(orchestrator_id: str) -> str:
    return f"{PAYOUTS}.state.{token(orchestrator_id)}"


def payout_transaction(sender: str) -> str:
    return f"{PAYOUTS}.transactions.{token(sender)}"


# Session events are split over this many partitions so one session's events stay in order
# (one in flight per partition) while different sessions proceed in parallel. Changing it
# reshuffles sessions: drain the SESSIONS consumers first.
SESSION_PARTITIONS = 16


def session_partition(key: str) -> int:
    """The partition of a session (or an activity lease), stable across processes and restarts."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") % SESSION_PARTITIONS


def session_event(session_id: str) -> str:
    return f"{SESSIONS_EVENTS}.{session_partition(session_id)}.{token(session_id)}"


def activity_lease_command(lease_id: str) -> str:
    return f"{SESSIONS_EVENTS}.{session_partition(lease_id)}.lease-{token(lease_id)}"


def session_tick(partition: int) -> str:
    return f"{SESSIONS_TICKS}.{partition}"


def workload_time(orchestrator_id: str) -> str:
    return f"{WORKLOADS}.time.{token(orchestrator_id)}"


def workload_fixed(orchestrator_id: str) -> str:
    return f"{WORKLOADS}.fixed.{token(orchestrator_id)}"


def workload_update(orchestrator_id: str) -> str:
    return f"{WORKLOADS}.updates.{token(orchestrator_id)}"


def ledger_adjustment(orchestrator_id: str) -> str:
    return f"{WORKLOADS}.adjustments.{token(orchestrator_id)}"


def job_requested(orchestrator_id: str) -> str:
    return f"{JOBS}.requested.{token(orchestrator_id)}"


def job_step(orchestrator_id: str) -> str:
    return f"{JOBS}.steps.{token(orchestrator_id)}"


def job_cancel(orchestrator_id: str) -> str:
    return f"{JOBS}.cancel.{token(orchestrator_id)}"


def job_finished(orchestrator_id: str) -> str:
    return f"{JOBS}.finished.{token(orchestrator_id)}"


def audit(domain: str, event: str) -> str:
    return f"{AUDIT}.{token(domain)}.{token(event)}"
