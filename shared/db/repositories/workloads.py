"""Workloads projection: lookups for the ledger worker and filtered reads for the api."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, select, update
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from shared.db.engine import PreparedInsert, insert_rows, prepare_insert
from shared.db.lookups import KeyLookups
from shared.db.models import Workload

VIDEO_EXTENSIONS = (".webm", ".mkv", ".mp4", ".mov")
CREDITABLE_STATUSES = frozenset({"verified", "paid"})
IN_CHUNK = 500


def has_artifact(workload: Workload | WorkloadRow) -> bool:
    uri = (workload.artifact_uri or "").lower()
    return uri.endswith(VIDEO_EXTENSIONS) or bool((workload.artifact_hash or "").strip())


def creditable(workload: Workload | WorkloadRow) -> bool:
    return (
        not workload.credited
        and workload.status in CREDITABLE_STATUSES
        and workload.payout_amount_wei > 0
    )


async def get(session: AsyncSession, workload_id: str) -> Workload | None:
    return await session.get(Workload, workload_id)


async def body_digest(lookups: KeyLookups, workload_id: str) -> str | None:
    """The stored body digest of `workload_id`, or None when no such workload is held."""
    rows = await lookups.select_in(_TABLE, ("body_sha256",), "workload_id", [workload_id])
    return str(rows[0][0]) if rows else None


async def search(
    session: AsyncSession,
    *,
    orchestrator_id: str | None = None,
    status: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int | None = None,
) -> list[Workload]:
    query = select(Workload).order_by(col(Workload.submitted_at).desc())
    if orchestrator_id is not None:
        query = query.where(col(Workload.orchestrator_id) == orchestrator_id)
    if status is not None:
        query = query.where(col(Workload.status) == status)
    if since is not None:
        query = query.where(col(Workload.submitted_at) >= since)
    if until is not None:
        query = query.where(col(Workload.submitted_at) <= until)
    if limit is not None:
        query = query.limit(limit)
    return list((await session.execute(query)).scalars())


_TABLE = Workload.__table__  # type: ignore[attr-defined]
_COLUMNS = tuple(column.key for column in _TABLE.columns)


@dataclass
class WorkloadRow:
    """A workloads row as plain data: the ledger worker's hot path writes these with Core
    statements in bulk (building ORM objects cost more than the rest of a batch together)."""

    workload_id: str
    orchestrator_id: str
    kind: str
    status: str
    payout_amount_wei: int
    body_sha256: str
    submitted_at: datetime
    updated_at: datetime
    plan_id: str | None = None
    run_id: str | None = None
    artifact_hash: str | None = None
    artifact_uri: str | None = None
    notes: str | None = None
    tx_hash: str | None = None
    job_id: str | None = None
    duration_ms: int | None = None
    credit_eth_per_minute: str | None = None
    credited: bool = False
    credited_at: datetime | None = None
    is_new: bool = field(default=False, compare=False)
    changed: bool = field(default=False, compare=False)

    def values(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _COLUMNS}


async def load_rows(session: AsyncSession, ids: Iterable[str]) -> dict[str, WorkloadRow]:
    wanted = list(dict.fromkeys(ids))
    found: dict[str, WorkloadRow] = {}
    for start in range(0, len(wanted), IN_CHUNK):
        rows = await session.execute(
            select(*_TABLE.columns).where(
                _TABLE.c.workload_id.in_(wanted[start : start + IN_CHUNK])
            )
        )
        for row in rows.mappings():
            found[row["workload_id"]] = WorkloadRow(**dict(row))
    return found


def draft_new(dialect: Dialect, rows: Iterable[WorkloadRow]) -> PreparedInsert:
    """The INSERT of the new rows, built before the write lock; run in a transaction, the
    primary key rejects a workload that another copy has stored since."""
    # The rows' own attribute dicts: the INSERT picks its columns from them, nothing is copied.
    return prepare_insert(dialect, _TABLE, [vars(row) for row in rows if row.is_new], _COLUMNS)


async def save_rows(session: AsyncSession, rows: Iterable[WorkloadRow]) -> None:
    """Insert the new rows and update the changed ones, one statement each."""
    rows = list(rows)
    new = [row.values() for row in rows if row.is_new]
    changed = [row for row in rows if row.changed and not row.is_new]
    if new:
        await insert_rows(session, _TABLE, new)
    if changed:
        mutable = (
            "status",
            "notes",
            "tx_hash",
            "artifact_uri",
            "artifact_hash",
            "credited",
            "credited_at",
            "updated_at",
        )
        await session.execute(
            update(_TABLE)
            .where(_TABLE.c.workload_id == bindparam("key_workload_id"))
            .values({name: bindparam(name) for name in mutable}),
            [
                {"key_workload_id": row.workload_id, **{n: getattr(row, n) for n in mutable}}
                for row in changed
            ],
        )
