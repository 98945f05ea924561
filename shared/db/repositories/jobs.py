"""Recording jobs projection: lookups for the jobs worker and reads for the api."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from shared.db.models import ProcessedEvent, RecordingJob

ACTIVE_STATES = ("pending", "running")
TERMINAL_STATES = frozenset({"completed", "failed", "cancelled"})


def is_terminal(job: RecordingJob) -> bool:
    return job.state in TERMINAL_STATES


async def get(session: AsyncSession, job_id: str) -> RecordingJob | None:
    return await session.get(RecordingJob, job_id)


async def active_for(session: AsyncSession, orchestrator_id: str) -> RecordingJob | None:
    """The orchestrator's pending or running job, if any."""
    query = (
        select(RecordingJob)
        .where(
            col(RecordingJob.orchestrator_id) == orchestrator_id,
            col(RecordingJob.state).in_(ACTIVE_STATES),
        )
        .limit(1)
    )
    return (await session.execute(query)).scalars().first()


async def applied(session: AsyncSession, consumer: str, event_key: str) -> bool:
    """Whether `consumer` has applied the event `event_key` (its inbox holds the key)."""
    query = select(col(ProcessedEvent.id)).where(
        col(ProcessedEvent.consumer) == consumer, col(ProcessedEvent.event_key) == event_key
    )
    return (await session.execute(query)).first() is not None
