"""Registry rules shared by the registry worker (effects) and the api (computed fields).

Pure functions: the caller passes the time. The worker passes event times, so a replay reaches
the same state; the api passes the wall clock, because "active" is a reading, not an effect.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from shared.db.models import Orchestrator

# A registration contact counts as recent for at least this long, whatever the TTL.
RECENT_CONTACT_FLOOR_S = 300.0


def services_up(data: dict[str, Any] | None) -> int | None:
    """`summary.services_up` when it is an int (bools are not), else None."""
    if not isinstance(data, dict):
        return None
    summary = data.get("summary")
    if not isinstance(summary, dict):
        return None
    value = summary.get("services_up")
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value


# The source the health poller stamps on the reports it publishes.
HEALTH_URL_SOURCE = "health_url"


@dataclass(frozen=True)
class HealthRules:
    miss_threshold: int
    cooldown_s: float
    default_min_uptime: float


def assess_report(data: dict[str, Any], min_uptime: float) -> str:
    """`miss`, `healthy`, `degraded` (services up, uptime below the minimum) or `unknown`.

    A miss is a report with services and none of them up, or a poll that could not get a
    readable answer (`reachable` false, or `malformed`): the orchestrator's health cannot be
    shown. Reports without a summary say nothing either way.
    """
    if data.get("reachable") is False or data.get("malformed") is True:
        return "miss"
    summary = data.get("summary")
    up = services_up(data)
    if not isinstance(summary, dict) or up is None:
        return "unknown"
    total = summary.get("total_services")
    if up == 0:
        return (
            "miss"
            if isinstance(total, int) and not isinstance(total, bool) and total > 0
            else "unknown"
        )
    uptime = summary.get("overall_uptime", summary.get("calculated_uptime"))
    if isinstance(uptime, int | float) and not isinstance(uptime, bool) and uptime < min_uptime:
        return "degraded"
    return "healthy"


def report_is_fresh(reported_at: datetime | None, now: datetime, ttl_s: float) -> bool:
    if reported_at is None:
        return False
    age_s = (now - reported_at).total_seconds()
    return 0 <= age_s <= ttl_s


def cooldown_active(record: Orchestrator, now: datetime) -> bool:
    return record.cooldown_expires_at is not None and record.cooldown_expires_at > now


def eligible_for_payments(record: Orchestrator, now: datetime) -> bool:
    return not record.denylisted and not cooldown_active(record, now) and record.is_top_100


@dataclass(frozen=True)
class Activity:
    active: bool
    reason: str | None


def activity(
    record: Orchestrator,
    now: datetime,
    *,
    health_ttl_s: float,
    active_sessions: int,
    active_leases: int,
) -> Activity:
    """The original's `active`/`active_reason`, in its priority order."""
    if active_sessions > 0:
        return Activity(True, "session")
    if active_leases > 0:
        return Activity(True, "activity_lease")
    if report_is_fresh(record.forwarder_health_reported_at, now, health_ttl_s):
        up = services_up(record.forwarder_health_data)
        return Activity(up is not None and up > 0, "forwarder_health")
    recent_s = max(health_ttl_s, RECENT_CONTACT_FLOOR_S)
    if record.last_seen is not None and now - record.last_seen <= timedelta(seconds=recent_s):
        return Activity(True, "recent_contact")
    return Activity(False, None)
