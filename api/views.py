"""Turning projection rows into the original's response shapes."""

from __future__ import annotations

from typing import Any

from contracts.http import WorkloadRecord
from shared.db.models import LedgerEntry, Workload
from shared.money import wei_to_eth


def workload_record(workload: Workload) -> dict[str, Any]:
    return WorkloadRecord(
        workload_id=workload.workload_id,
        orchestrator_id=workload.orchestrator_id,
        plan_id=workload.plan_id,
        run_id=workload.run_id,
        artifact_hash=workload.artifact_hash,
        artifact_uri=workload.artifact_uri,
        payout_amount_eth=wei_to_eth(workload.payout_amount_wei),
        status=workload.status,
        submitted_at=workload.submitted_at,
        notes=workload.notes,
        tx_hash=workload.tx_hash,
        credited=workload.credited,
        credited_at=workload.credited_at,
    ).model_dump(mode="json")


def ledger_event(entry: LedgerEntry) -> dict[str, Any]:
    """The original journal's line shape, plus where the entry came from."""
    amount = wei_to_eth(entry.amount_wei)
    return {
        "id": entry.id,
        "timestamp": entry.occurred_at.isoformat() if entry.occurred_at else None,
        "event": "debit" if entry.reason == "payout" else "credit",
        "orchestrator_id": entry.orchestrator_id,
        "amount": amount,
        "balance": wei_to_eth(entry.balance_after_wei),
        "delta": amount,
        "reason": entry.reason,
        "metadata": entry.entry_metadata or {},
        "entry_key": entry.entry_key,
        "source": {
            "stream": entry.source_stream,
            "seq": entry.source_seq,
            "key": entry.source_key,
        },
        "corrects_entry_id": entry.corrects_entry_id,
    }
