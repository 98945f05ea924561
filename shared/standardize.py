"""Standardize credits of workloads whose artifact_hash is not unique (original §10.2).

The original's "sweep" bug credited several orchestrators for the same artifact. This computes
one correcting adjustment per orchestrator: its credits on duplicated hashes move to a standard
amount (the median over the others, or an override), or to zero for participation-only
orchestrators. Excluded orchestrators are left alone entirely, as the original's help text
promised (its code still adjusted them).

`--apply` publishes the adjustments as ledger adjustment events, each with a key derived from
the computation, so applying the same computation twice adjusts once.
"""

from __future__ import annotations

import hashlib
import json
import statistics
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal

from sqlalchemy import select

from contracts import subjects
from contracts.events import LedgerAdjustmentV1
from contracts.streams import WORKLOADS
from shared.db.engine import make_engine, make_sessionmaker
from shared.db.models import Workload
from shared.money import WEI_PER_ETH, eth_to_wei
from shared.nats_client import connect
from shared.publishing import publish_event
from shared.settings import Settings

QUANTUM_ETH = Decimal("0.00000001")
DEFAULT_REASON = "reconcile_workload_non_unique_standardize"
DRY_RUN_LINES_MAX = 50


@dataclass(frozen=True)
class Adjustment:
    orchestrator_id: str
    current_eth: Decimal
    target_eth: Decimal
    delta_eth: Decimal
    duplicate_workloads: int
    duplicate_hashes: int


@dataclass(frozen=True)
class Plan:
    standard_eth: Decimal
    duplicate_hashes: int
    adjustments: list[Adjustment]


def quantize(value: Decimal) -> Decimal:
    return value.quantize(QUANTUM_ETH, rounding=ROUND_HALF_EVEN)


def compute_plan(
    workloads: list[Workload],
    *,
    standard_override: Decimal | None,
    excluded: set[str],
    participation_only: set[str],
) -> Plan:
    considered = [
        w
        for w in workloads
        if w.status in ("verified", "paid") and w.credited and (w.artifact_hash or "").strip()
    ]
    by_hash: dict[str, list[Workload]] = defaultdict(list)
    for w in considered:
        by_hash[(w.artifact_hash or "").strip().lower()].append(w)
    duplicated = {h: items for h, items in by_hash.items() if len(items) > 1}
    current: dict[str, Decimal] = defaultdict(Decimal)
    counts: dict[str, int] = defaultdict(int)
    hashes: dict[str, set[str]] = defaultdict(set)
    for digest, items in duplicated.items():
        for w in items:
            current[w.orchestrator_id] += Decimal(w.payout_amount_wei) / WEI_PER_ETH
            counts[w.orchestrator_id] += 1
            hashes[w.orchestrator_id].add(digest)
    if standard_override is not None:
        standard = quantize(standard_override)
    else:
        pool = [
            v for oid, v in current.items() if v > 0 and oid not in excluded | participation_only
        ]
        standard = quantize(Decimal(statistics.median(pool))) if pool else Decimal(0)
    adjustments = []
    for oid in sorted(current):
        if oid in excluded:
            continue
        target = Decimal(0) if oid in participation_only else standard
        delta = quantize(target - current[oid])
        if delta != 0:
            adjustments.append(
                Adjustment(oid, current[oid], target, delta, counts[oid], len(hashes[oid]))
            )
    return Plan(standard, len(duplicated), adjustments)


async def load_workloads(settings: Settings) -> list[Workload]:
    engine = make_engine(settings.resolved_database_url, writer=False)
    try:
        async with make_sessionmaker(engine)() as session:
            return list((await session.execute(select(Workload))).scalars())
    finally:
        await engine.dispose()


def adjustment_key(item: Adjustment, plan: Plan, reason: str) -> str:
    content = json.dumps(
        [
            item.orchestrator_id,
            str(item.current_eth),
            str(item.target_eth),
            str(plan.standard_eth),
            reason,
        ]
    )
    return f"standardize:{item.orchestrator_id}:{hashlib.sha256(content.encode()).hexdigest()[:32]}"


async def apply_plan(settings: Settings, plan: Plan, reason: str, note: str | None) -> list[str]:
    nc = await connect(settings, "ops", "payments-standardize")
    lines = []
    computed_at = datetime.now(UTC)
    try:
        for item in plan.adjustments:
            event = LedgerAdjustmentV1(
                orchestrator_id=item.orchestrator_id,
                amount_wei=eth_to_wei(item.delta_eth),
                reason=reason,
                notes=note,
                metadata={
                    "reconcile_kind": "standardize_non_unique_workloads",
                    "computed_at": computed_at.isoformat(),
                    "standard_non_unique_eth": str(plan.standard_eth),
                    "target_non_unique_eth": str(item.target_eth),
                    "current_non_unique_eth": str(item.current_eth),
                    "duplicate_workloads": item.duplicate_workloads,
                    "duplicate_hashes": item.duplicate_hashes,
                    "note": note,
                },
                received_at=computed_at,
            )
            key = adjustment_key(item, plan, reason)
            ack = await publish_event(
                nc.jetstream(),
                stream=WORKLOADS.name,
                subject=subjects.ledger_adjustment(item.orchestrator_id),
                event=event,
                key=key,
            )
            lines.append(
                f"{item.orchestrator_id}\t{item.delta_eth}\tpublished as WORKLOADS#{ack.seq}"
            )
    finally:
        await nc.close()
    return lines


def describe(plan: Plan) -> list[str]:
    lines = [
        f"duplicated artifact hashes: {plan.duplicate_hashes}",
        f"standard non-unique credit: {plan.standard_eth} ETH",
        f"adjustments: {len(plan.adjustments)}",
    ]
    if plan.standard_eth <= 0:
        lines.append("standard is not positive: nothing to do")
    for item in plan.adjustments[:DRY_RUN_LINES_MAX]:
        lines.append(
            f"  {item.orchestrator_id}: current {item.current_eth} -> target {item.target_eth} "
            f"(delta {item.delta_eth}; {item.duplicate_workloads} workloads, "
            f"{item.duplicate_hashes} hashes)"
        )
    return lines
