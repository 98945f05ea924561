"""Ledger worker: credits content workloads and applies admin adjustments.

Consumes
  - WORKLOADS `workloads.>` through durable `ledger-workloads`, in batches of up to 1,024:
    `workloads.time.<orch>` (time-based workloads), `workloads.fixed.<orch>` (fixed-price
    workloads), `workloads.updates.<orch>` (PATCH) and `workloads.adjustments.<orch>`.

Produces
  - ledger entries (reasons `workload_time`, `workload`, `adjustment` or the admin's reason),
    each also published to LEDGER `ledger.entries.<orch>` through the outbox.

Guarantee
  One batch is one transaction: workloads, entries, balances, inbox rows and outbox rows commit
  together, then the messages are acked. A workload is credited at most once (entry key
  `workload:<workload_id>`, unique in the database); an adjustment once per event key. A
  workload id seen again with the same body is a duplicate; with a different body it is
  recorded as a conflict and changes nothing. Credits are priced by the rate stamped into the
  event by the ingress, and dated by the ingress's receive time, so a replay credits the same.

Scaling
  Copies share the durable consumer. A batch without updates is worked out from reads outside
  the write transaction and only written under it (`LedgerProjector.prepare`), so on SQLite,
  where one writer holds the database at a time, copies overlap all but their writes. Those
  writes are plain INSERTs: if another copy stored one of the rows meanwhile, a unique key
  fails, the transaction rolls back, and the batch is applied again under the lock
  (tests/test_prepared_batches.py). A batch with updates is always applied under the lock.

Limits
  An event for an orchestrator or workload the projection does not hold yet is retried with
  backoff and dead-lettered after MAX_ATTEMPTS deliveries. An update older than the workload's
  last change does not move its status back.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from nats.aio.msg import Msg
from sqlalchemy.ext.asyncio import AsyncSession

from contracts.events import (
    LedgerAdjustmentV1,
    WorkloadSubmittedV1,
    WorkloadTimeRecordedV1,
    WorkloadUpdatedV1,
)
from contracts.streams import LEDGER_WORKLOADS_CONSUMER, ConsumerSpec
from shared.db.engine import run_insert
from shared.db.repositories import ledger, registry, workloads
from shared.db.repositories.ledger import NewEntry
from shared.db.repositories.workloads import WorkloadRow
from shared.event_consumer import Decoded, EventConsumer, Outcome, PreparedBatch
from shared.money import rate_credit_wei
from shared.settings import load_settings
from shared.worker_app import WorkerRuntime

log = logging.getLogger(__name__)

WorkloadEvent = (
    WorkloadTimeRecordedV1 | WorkloadSubmittedV1 | WorkloadUpdatedV1 | LedgerAdjustmentV1
)

settings = load_settings()
runtime = WorkerRuntime("ledger", settings)
app = runtime.app


class LedgerProjector:
    """Applies a batch in stream order against workloads loaded once for the whole batch."""

    async def apply(
        self, session: AsyncSession, items: Sequence[Decoded[WorkloadEvent]]
    ) -> list[Outcome]:
        held = await workloads.load_rows(session, _workload_ids(items))
        outcomes, entries = self._project(items, await _known(session, items), held)
        await workloads.save_rows(session, held.values())
        await ledger.post_entries(session, entries)
        return outcomes

    async def prepare(
        self, reader: AsyncSession, items: Sequence[Decoded[WorkloadEvent]]
    ) -> PreparedBatch | None:
        """The batch worked out outside the write lock, unless it updates workloads: an update
        changes a row another copy may be changing too, so that batch goes under the lock.
        New workloads, entries and balances are INSERTs (balances are moved under the lock)."""
        if any(isinstance(item.event, WorkloadUpdatedV1) for item in items):
            return None
        held = await workloads.load_rows(reader, _workload_ids(items))
        outcomes, entries = self._project(items, await _known(reader, items), held)
        dialect = reader.get_bind().dialect
        new_workloads = workloads.draft_new(dialect, held.values())
        drafts = ledger.draft_entries(dialect, entries)

        async def write(session: AsyncSession) -> None:
            await run_insert(session, new_workloads)
            await ledger.post_drafts(session, drafts)

        return PreparedBatch(outcomes, write)

    def _project(
        self,
        items: Sequence[Decoded[WorkloadEvent]],
        known_orchestrators: set[str],
        held: dict[str, WorkloadRow],
    ) -> tuple[list[Outcome], list[NewEntry]]:
        """Each event's outcome and the entries due, changing `held` as the events say."""
        entries: list[NewEntry] = []
        outcomes = []
        for item in items:
            if item.event.orchestrator_id not in known_orchestrators:
                outcomes.append(Outcome.retry("unknown orchestrator"))
                continue
            outcomes.append(self._apply_one(item, held, entries))
        return outcomes, entries

    def _apply_one(
        self,
        item: Decoded[WorkloadEvent],
        held: dict[str, WorkloadRow],
        entries: list[NewEntry],
    ) -> Outcome:
        event = item.event
        if isinstance(event, LedgerAdjustmentV1):
            entries.append(adjustment_entry(item, event))
            return Outcome.done({"entry_key": f"adjustment:{item.key}"})
        if isinstance(event, WorkloadUpdatedV1):
            return self._update(item, event, held, entries)
        existing = held.get(event.workload_id)
        if existing is not None:
            same = existing.body_sha256 == event.body_sha256
            if not same:
                log.warning(
                    "workload id reused with a different body",
                    extra={"event_key": item.key, "stream_seq": item.delivery.stream_seq},
                )
            return Outcome.done({"duplicate": same, "conflict": not same})
        workload = new_workload(event)
        held[workload.workload_id] = workload
        self._credit_if_due(item, workload, entries)
        return Outcome.done({"credited": workload.credited})

    def _update(
        self,
        item: Decoded[WorkloadEvent],
        event: WorkloadUpdatedV1,
        held: dict[str, WorkloadRow],
        entries: list[NewEntry],
    ) -> Outcome:
        workload = held.get(event.workload_id)
        if workload is None:
            return Outcome.retry("unknown workload")
        if workload.updated_at is None or event.received_at >= workload.updated_at:
            for name in ("status", "notes", "tx_hash", "artifact_uri", "artifact_hash"):
                value = getattr(event, name)
                if value is not None:
                    setattr(workload, name, value)
            workload.updated_at = event.received_at
            workload.changed = True
        self._credit_if_due(item, workload, entries)
        return Outcome.done({"credited": workload.credited})

    def _credit_if_due(
        self, item: Decoded[WorkloadEvent], workload: WorkloadRow, entries: list[NewEntry]
    ) -> None:
        time_based = workload.kind == "time"
        if not workloads.creditable(workload):
            return
        if not time_based and not workloads.has_artifact(workload):
            return
        workload.credited = True
        workload.credited_at = item.event.received_at
        workload.changed = True
        entries.append(workload_entry(item, workload))


def _workload_ids(items: Sequence[Decoded[WorkloadEvent]]) -> list[str]:
    return [i.event.workload_id for i in items if not isinstance(i.event, LedgerAdjustmentV1)]


async def _known(session: AsyncSession, items: Sequence[Decoded[WorkloadEvent]]) -> set[str]:
    return await registry.known_ids(session, {item.event.orchestrator_id for item in items})


def new_workload(event: WorkloadTimeRecordedV1 | WorkloadSubmittedV1) -> WorkloadRow:
    common: dict[str, Any] = {
        "workload_id": event.workload_id,
        "orchestrator_id": event.orchestrator_id,
        "plan_id": event.plan_id,
        "run_id": event.run_id,
        "artifact_hash": event.artifact_hash,
        "artifact_uri": event.artifact_uri,
        "notes": event.notes,
        "body_sha256": event.body_sha256,
        "submitted_at": event.received_at,
        "updated_at": event.received_at,
    }
    if isinstance(event, WorkloadTimeRecordedV1):
        return WorkloadRow(
            **common,
            is_new=True,
            kind="time",
            status=event.status,
            job_id=event.job_id,
            duration_ms=event.duration_ms,
            credit_eth_per_minute=event.credit_eth_per_minute,
            payout_amount_wei=rate_credit_wei(event.duration_ms, event.credit_eth_per_minute),
        )
    return WorkloadRow(
        **common,
        is_new=True,
        kind="fixed",
        status="pending",
        payout_amount_wei=event.payout_amount_wei,
    )


def workload_entry(item: Decoded[WorkloadEvent], workload: WorkloadRow) -> NewEntry:
    metadata: dict[str, Any] = {
        "workload_id": workload.workload_id,
        "plan_id": workload.plan_id,
        "run_id": workload.run_id,
        "status": workload.status,
        "artifact_uri": workload.artifact_uri,
        "artifact_hash": workload.artifact_hash,
    }
    reason = "workload"
    if workload.kind == "time":
        reason = "workload_time"
        metadata["duration_ms"] = str(workload.duration_ms)
        metadata["credit_eth_per_minute"] = workload.credit_eth_per_minute
        if workload.job_id:
            metadata["job_id"] = workload.job_id
    return NewEntry(
        entry_key=f"workload:{workload.workload_id}",
        orchestrator_id=workload.orchestrator_id,
        amount_wei=workload.payout_amount_wei,
        reason=reason,
        source_stream=item.delivery.stream,
        source_seq=item.delivery.stream_seq,
        source_key=item.key,
        occurred_at=item.event.received_at,
        metadata=metadata,
    )


def adjustment_entry(item: Decoded[WorkloadEvent], event: LedgerAdjustmentV1) -> NewEntry:
    metadata = dict(event.metadata)
    if event.reference_workload_id:
        metadata["reference_workload_id"] = event.reference_workload_id
    if event.notes:
        metadata["notes"] = event.notes
    return NewEntry(
        entry_key=f"adjustment:{item.key}",
        orchestrator_id=event.orchestrator_id,
        amount_wei=event.amount_wei,
        reason=event.reason,
        source_stream=item.delivery.stream,
        source_seq=item.delivery.stream_seq,
        source_key=item.key,
        occurred_at=event.received_at,
        metadata=metadata,
        corrects_entry_id=event.corrects_entry_id,
    )


SCHEMAS: dict[str, type[Any]] = {
    model.SCHEMA: model
    for model in (
        WorkloadTimeRecordedV1,
        WorkloadSubmittedV1,
        WorkloadUpdatedV1,
        LedgerAdjustmentV1,
    )
}
workload_events = runtime.event_consumer(
    consumer=LEDGER_WORKLOADS_CONSUMER.durable, schemas=SCHEMAS, projector=LedgerProjector()
)
ROUTES: list[tuple[ConsumerSpec, EventConsumer[Any]]] = [
    (LEDGER_WORKLOADS_CONSUMER, workload_events)
]


@runtime.consume(LEDGER_WORKLOADS_CONSUMER)
async def on_workload_events(messages: list[Msg]) -> None:
    await workload_events.handle(messages)
