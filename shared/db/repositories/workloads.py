"""Workloads projection: lookups for the ledger worker and filtered reads for the api."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from shared.db.models import Workload

VIDEO_EXTENSIONS = (".webm", ".mkv", ".mp4", ".mov")
CREDITABLE_STATUSES = frozenset({"verified", "paid"})
IN_CHUNK = 500


def has_artifact(workload: Workload) -> bool:
    uri = (workload.artifact_uri or "").lower()
    return uri.endswith(VIDEO_EXTENSIONS) or bool((workload.artifact_hash or "").strip())


def creditable(workload: Workload) -> bool:
    return (
        not workload.credited
        and workload.status in CREDITABLE_STATUSES
        and workload.payout_amount_wei > 0
    )


async def get_many(session: AsyncSession, ids: Iterable[str]) -> dict[str, Workload]:
    wanted = list(dict.fromkeys(ids))
    found: dict[str, Workload] = {}
    for start in range(0, len(wanted), IN_CHUNK):
        rows = await session.execute(
            select(Workload).where(col(Workload.workload_id).in_(wanted[start : start + IN_CHUNK]))
        )
        found.update({row.workload_id: row for row in rows.scalars()})
    return found


async def get(session: AsyncSession, workload_id: str) -> Workload | None:
    return await session.get(Workload, workload_id)


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
