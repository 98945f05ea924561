"""Orchestrator stats: totals and a dense daily series from ledger entries.

As the original, but time-based workload credits (`workload_time`) count as workload; the
original left them out of `workload_eth` (its §12 item 2).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

from shared.db.models import LedgerEntry
from shared.money import wei_to_eth

SESSION_REASONS = frozenset({"session_time"})
WORKLOAD_REASONS = frozenset({"workload", "workload_time"})
ADJUSTMENT_REASONS = frozenset({"adjustment"})
PAYOUT_REASON = "payout"


@dataclass
class Totals:
    credits: int = 0
    payouts: int = 0
    session: int = 0
    workload: int = 0
    adjustments: int = 0
    net: int = 0

    def add(self, entry: LedgerEntry) -> None:
        delta = entry.amount_wei
        self.net += delta
        if entry.reason == PAYOUT_REASON and delta < 0:
            self.payouts += -delta
            return
        if entry.reason in ADJUSTMENT_REASONS:
            self.adjustments += delta
        if delta <= 0:
            return
        self.credits += delta
        if entry.reason in SESSION_REASONS:
            self.session += delta
        elif entry.reason in WORKLOAD_REASONS:
            self.workload += delta

    def as_eth(self, prefix: str = "", suffix: str = "_eth") -> dict[str, str]:
        names = {
            "credits": self.credits,
            "payouts": self.payouts,
            "session": self.session,
            "workload": self.workload,
            "adjustments": self.adjustments,
            "net_delta": self.net,
        }
        return {f"{prefix}{name}{suffix}": wei_to_eth(value) for name, value in names.items()}


@dataclass
class Stats:
    days: int
    first_day: date
    total: Totals = field(default_factory=Totals)
    daily: dict[date, Totals] = field(default_factory=dict)


def window_start(today: date, days: int) -> datetime:
    first = today - timedelta(days=days - 1)
    return datetime(first.year, first.month, first.day, tzinfo=UTC)


def compute(entries: Sequence[LedgerEntry], today: date, days: int) -> Stats:
    stats = Stats(days=days, first_day=today - timedelta(days=days - 1))
    for offset in range(days):
        stats.daily[stats.first_day + timedelta(days=offset)] = Totals()
    for entry in entries:
        assert entry.occurred_at is not None
        day = entry.occurred_at.date()
        if day not in stats.daily:
            continue
        stats.total.add(entry)
        stats.daily[day].add(entry)
    return stats


def daily_series(stats: Stats) -> list[dict[str, str]]:
    return [
        {"date": day.isoformat(), **totals.as_eth()} for day, totals in sorted(stats.daily.items())
    ]
