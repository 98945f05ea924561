"""Recording jobs and recording URLs.

`POST /api/jobs/record` publishes the job's request to WORKLOADS and answers 202 once stored (200
with the projection when the caller sent `Prefer: wait=N` and it was applied in time); the jobs
worker runs it. `GET /api/jobs/{job_id}` reads the projection and presigns a fresh download URL.
`POST /api/jobs/{job_id}/cancel` asks the jobs worker to end the job. `GET /api/recordings/presign`
presigns objects of the recordings bucket only (the original presigned anything it could read).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from api.context import ApiContext, context
from api.errors import BadRequest, Conflict, NotFound, ServiceUnavailable, Unprocessable
from api.outcomes import preferred_wait_s, wait_applied
from api.parsing import parse_body, path_id
from contracts import subjects
from contracts.events import JobCancelRequestedV1, JobRequestedV1
from contracts.http import JobRecordRequest
from contracts.streams import JOBS_PROJECTION_CONSUMER, WORKLOADS
from shared.db.models import RecordingJob
from shared.db.repositories import jobs
from shared.s3 import BadS3Uri, parse_s3_uri

CONSUMER = JOBS_PROJECTION_CONSUMER.durable
S3_URI_MIN_CHARS = 3
S3_URI_MAX_CHARS = 1024
NOT_CONFIGURED = "Recording jobs are not configured: PAYMENTS_RECORDINGS_BUCKET is unset"


def utc_now() -> datetime:
    return datetime.now(UTC)


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


def job_record(row: RecordingJob, download_url: str | None = None) -> dict[str, Any]:
    """The original's job record, plus the last finished step, its history and cancel state."""
    return {
        "job_id": row.job_id,
        "orchestrator_id": row.orchestrator_id,
        "state": row.state,
        "created_at": _iso(row.created_at),
        "updated_at": _iso(row.updated_at),
        "started_at": _iso(row.started_at),
        "ended_at": _iso(row.ended_at),
        "plan_id": row.plan_id,
        "run_id": row.run_id,
        "notes": row.notes,
        "workload_id": row.workload_id,
        "duration_ms": row.duration_ms,
        "artifact_uri": row.artifact_uri,
        "artifact_hash": row.artifact_hash,
        "artifact_download_url": download_url,
        "error": row.error,
        "step": row.step,
        "steps": row.steps or [],
        "cancel_requested_at": _iso(row.cancel_requested_at),
    }


def pending_record(event: JobRequestedV1) -> dict[str, Any]:
    """The record of a job accepted but not yet applied by the jobs worker."""
    received = event.received_at.isoformat()
    return {
        "job_id": event.job_id,
        "orchestrator_id": event.orchestrator_id,
        "state": "pending",
        "created_at": received,
        "updated_at": received,
        "started_at": None,
        "ended_at": None,
        "plan_id": event.plan_id,
        "run_id": event.run_id,
        "notes": event.notes,
        "workload_id": None,
        "duration_ms": None,
        "artifact_uri": None,
        "artifact_hash": None,
        "artifact_download_url": None,
        "error": None,
        "step": "requested",
        "steps": [],
        "cancel_requested_at": None,
    }


def _require_bucket(ctx: ApiContext) -> str:
    bucket = ctx.settings.recordings_bucket
    if not bucket:
        raise ServiceUnavailable(NOT_CONFIGURED)
    return bucket


async def record_job(request: web.Request) -> web.Response:
    ctx = context(request)
    ctx.auth.require_admin(request)
    body = await parse_body(request, JobRecordRequest)
    _require_bucket(ctx)
    if not await ctx.orchestrator_exists(body.orchestrator_id):
        raise NotFound("Unknown orchestrator")
    job_id = body.job_id or uuid.uuid4().hex
    async with ctx.sessions() as db:
        if await jobs.active_for(db, body.orchestrator_id) is not None:
            raise Conflict("Orchestrator already has an active job")
        if await jobs.get(db, job_id) is not None:
            raise Conflict("Job already exists")
    event = JobRequestedV1(
        **body.model_dump(exclude={"job_id"}),
        job_id=job_id,
        credit_eth_per_minute=str(ctx.settings.workload_time_credit_eth_per_minute),
        received_at=utc_now(),
    )
    key = f"job:{job_id}:requested"
    ack = await ctx.events.publish(
        stream=WORKLOADS.name,
        subject=subjects.job_requested(body.orchestrator_id),
        event=event,
        key=key,
    )
    if ack.duplicate:
        raise Conflict("Job already exists")
    if await wait_applied(ctx, CONSUMER, key, preferred_wait_s(request)) is not None:
        async with ctx.sessions() as db:
            stored = await jobs.get(db, job_id)
        if stored is not None:
            return web.json_response({**job_record(stored), "event_key": key})
    return web.json_response({**pending_record(event), "event_key": key}, status=202)


async def _job_or_404(ctx: ApiContext, job_id: str) -> RecordingJob:
    async with ctx.sessions() as db:
        row = await jobs.get(db, job_id)
    if row is None:
        raise NotFound("Job not found")
    return row


async def get_job(request: web.Request) -> web.Response:
    ctx = context(request)
    ctx.auth.require_viewer(request)
    row = await _job_or_404(ctx, path_id(request, "job_id", "Job not found"))
    url = None
    if (row.artifact_uri or "").startswith("s3://"):
        await ctx.presigner.ensure_started()
        url = await ctx.presigner.presign_get_or_none(
            row.artifact_uri, ctx.settings.recordings_presign_seconds
        )
    return web.json_response(job_record(row, url))


async def cancel_job(request: web.Request) -> web.Response:
    ctx = context(request)
    ctx.auth.require_admin(request)
    row = await _job_or_404(ctx, path_id(request, "job_id", "Job not found"))
    if jobs.is_terminal(row):
        raise Conflict("Job already ended")
    event = JobCancelRequestedV1(
        job_id=row.job_id, orchestrator_id=row.orchestrator_id, received_at=utc_now()
    )
    key = f"job:{row.job_id}:cancel"
    await ctx.events.publish(
        stream=WORKLOADS.name,
        subject=subjects.job_cancel(row.orchestrator_id),
        event=event,
        key=key,
    )
    requested_at = row.cancel_requested_at or event.received_at
    body = {**job_record(row), "cancel_requested_at": _iso(requested_at), "event_key": key}
    return web.json_response(body, status=202)


async def presign_recording(request: web.Request) -> web.Response:
    ctx = context(request)
    ctx.auth.require_viewer(request)
    raw = request.query.get("s3_uri")
    if raw is None:
        raise Unprocessable("s3_uri is required")
    if not S3_URI_MIN_CHARS <= len(raw) <= S3_URI_MAX_CHARS:
        raise Unprocessable(f"s3_uri must be {S3_URI_MIN_CHARS}-{S3_URI_MAX_CHARS} characters")
    bucket = _require_bucket(ctx)
    try:
        location = parse_s3_uri(raw)
    except BadS3Uri as error:
        raise BadRequest(str(error)) from None
    if location.bucket != bucket:
        raise BadRequest("Only objects in the recordings bucket can be presigned")
    expires_s = ctx.settings.recordings_presign_seconds
    await ctx.presigner.ensure_started()
    url = await ctx.presigner.presign_get_or_none(location.uri, expires_s)
    if url is None:
        raise BadRequest("Unable to presign URL")
    return web.json_response({"s3_uri": location.uri, "url": url, "expires_in": expires_s})
