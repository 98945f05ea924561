"""Jobs worker: runs recording jobs (wake the host, record, run the script, upload to S3, credit)
as a chain of events, so a job outlives the copy that started it.

Consumes
  - WORKLOADS `jobs.>` through durable `jobs-projection` (strictly ordered): `jobs.requested`,
    `jobs.steps`, `jobs.cancel` and `jobs.finished` events, applied to the `recording_jobs` table.
  - WORKLOADS `jobs.requested.>` and `jobs.steps.>` through durable `jobs-driver`: each message is
    the job's request or its last finished step, and handling it runs the next step.

Produces
  - WORKLOADS `jobs.steps.<orch>` (one event per finished step: started, woken, ready,
    recording_started, script_started, script_finished, recording_stopped, uploaded) and
    `jobs.finished.<orch>` (completed, failed or cancelled, with the error);
  - WORKLOADS `workloads.time.<orch>`: the job's credit, workload `job:<job_id>`, which the
    ledger worker credits with reason `workload_time` (entry key `workload:job:<job_id>`);
  - SESSIONS lease commands for the activity lease `job:<job_id>` (kind `job`): issued when the
    job starts and again as each step starts, heart-beaten while a step runs, revoked (best
    effort) when the job ends.

Guarantee
  A driver message is acked only after the next step's event is stored, so a copy that dies
  mid-step leaves its message unacked: JetStream hands it to another copy after ack_wait, which
  reads the projection and resumes from the last finished step. A message is driven only while
  it is its job's newest request or step event (`last_step_key`), so a redelivered older step
  changes nothing. Step events, the credit and the end carry stable keys (`job:<id>:step:<step>`,
  `job:<id>:finished`), so a repeated publish is absorbed; the credit is made once by the ledger's
  unique entry key whatever happens, and its body is built only from stored events, so every copy
  publishes the same one. The projection uses only event times, so a replay rebuilds it.

Limits
  A crash between a host call and its step's event repeats that call on resume (wake, probes,
  recorder start/stop, upload to the same key); a script already known to the runner under the
  job's session id is not submitted again. A cancel is honoured at the next check (before each
  step and at every poll); once the recording is uploaded the job is credited and completes.
  A message that still fails after MAX_ATTEMPTS deliveries ends its job `failed` (or completed,
  if its recording is uploaded); if even that fails, the message is kept as a dead letter of
  `jobs-driver` and `payments dlq retry` resumes the job.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import nats.errors
from nats.aio.msg import Msg
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlmodel import col

from contracts import subjects
from contracts.events import (
    EVENT_KEY_HEADER,
    JOB_STEPS,
    MSG_ID_HEADER,
    SCHEMA_HEADER,
    ActivityLeaseCommandV1,
    EventModel,
    JobCancelRequestedV1,
    JobEndState,
    JobFinishedV1,
    JobRequestedV1,
    JobStepRecordedV1,
    LeaseAction,
    WorkloadTimeRecordedV1,
)
from contracts.streams import (
    ACK_WAIT_S,
    JOBS_DRIVER_CONSUMER,
    JOBS_PROJECTION_CONSUMER,
    MAX_ATTEMPTS,
    RETRY_BACKOFF_S,
    SESSIONS,
    WORKLOADS,
    ConsumerSpec,
)
from shared.db.engine import make_engine
from shared.db.models import Orchestrator, RecordingJob
from shared.db.repositories import dead_letters, jobs, workloads
from shared.event_consumer import Decoded, Delivery, EventConsumer, Outcome, dead_letter
from shared.host_services import HostPorts, HostServiceError, HostServices
from shared.observability import handling
from shared.publishing import publish_event
from shared.pull_consumer import PullConsumer, PullError
from shared.recording_jobs import JobCancelled, JobFailed, StepRunner, StepTools, utc_now
from shared.s3 import Presigner
from shared.settings import load_settings
from shared.worker_app import WorkerRuntime

log = logging.getLogger(__name__)

# Jobs one copy drives at once; more wait in the stream for another copy or a free slot.
MAX_JOBS_IN_FLIGHT = 32
# A fetch waits this long for a message before looking at its slots again.
DRIVER_FETCH_TIMEOUT_S = 1.0
# The projection applies a step's event within milliseconds; a driver waits this long for it.
PROJECTION_WAIT_S = 5.0
PROJECTION_POLL_S = 0.05
# Ack-deadline extensions per ack_wait while a step runs (so a live copy keeps its message).
PROGRESS_PER_ACK_WAIT = 3
# Lease heartbeats per lease length while a step runs.
HEARTBEATS_PER_LEASE = 3
MIN_LEASE_S = 30
# The longest duration a time-based workload may carry (contracts.events).
MAX_CREDIT_DURATION_MS = 86_400_000
# Steps after which the recorder is recording: a job ending there stops it, best effort.
RECORDING_STEPS = frozenset({"recording_started", "script_started", "script_finished"})
HOST_MISSING = "orchestrator host missing from registry"
CANCELLED = "cancelled by an admin"
ERROR_MAX_CHARS = 1024

settings = load_settings()
runtime = WorkerRuntime("jobs", settings)
app = runtime.app
presigner = Presigner(
    settings.recordings_region, settings.s3_endpoint_url, settings.s3_addressing_style
)
PORTS = HostPorts(
    power=settings.job_power_port,
    runner=settings.job_runner_port,
    recorder=settings.job_recorder_port,
)

JobEvent = JobRequestedV1 | JobStepRecordedV1 | JobCancelRequestedV1 | JobFinishedV1


def lease_id(job_id: str) -> str:
    return f"job:{job_id}"


def iso(moment: datetime) -> str:
    return moment.isoformat()


# -- the projection -------------------------------------------------------------------------


class JobsProjector:
    """Applies job events in stream order; decisions use only what the events carry."""

    async def apply(self, db: AsyncSession, items: Sequence[Decoded[JobEvent]]) -> list[Outcome]:
        ids = {item.event.job_id for item in items}
        rows = await db.execute(select(RecordingJob).where(col(RecordingJob.job_id).in_(ids)))
        held = {row.job_id: row for row in rows.scalars()}
        outcomes = []
        for item in items:
            event = item.event
            if isinstance(event, JobRequestedV1):
                outcomes.append(await self._requested(db, item.key, event, held))
                continue
            job = held.get(event.job_id)
            if job is None:
                outcomes.append(Outcome.retry("unknown job"))
            elif jobs.is_terminal(job):
                outcomes.append(Outcome.done({"ignored": "job already ended", "state": job.state}))
            elif isinstance(event, JobStepRecordedV1):
                outcomes.append(apply_step(job, item.key, event))
            elif isinstance(event, JobCancelRequestedV1):
                job.cancel_requested_at = job.cancel_requested_at or event.received_at
                touch(job, event.received_at)
                outcomes.append(Outcome.done({"cancel_requested": True}))
            else:
                outcomes.append(apply_end(job, event))
        return outcomes

    async def _requested(
        self, db: AsyncSession, key: str, event: JobRequestedV1, held: dict[str, RecordingJob]
    ) -> Outcome:
        if event.job_id in held:
            return Outcome.done({"duplicate": True})
        busy = (
            any(
                j.orchestrator_id == event.orchestrator_id and not jobs.is_terminal(j)
                for j in held.values()
            )
            or (await jobs.active_for(db, event.orchestrator_id)) is not None
        )
        job = new_job(key, event)
        if busy:
            # Two requests raced past the api's check: the later one in stream order loses.
            job.state, job.ended_at = "failed", event.received_at
            job.error = "Orchestrator already has an active job"
        db.add(job)
        held[job.job_id] = job
        return Outcome.done({"state": job.state})


def new_job(key: str, event: JobRequestedV1) -> RecordingJob:
    return RecordingJob(
        job_id=event.job_id,
        orchestrator_id=event.orchestrator_id,
        state="pending",
        step="requested",
        created_at=event.received_at,
        updated_at=event.received_at,
        plan_id=event.plan_id,
        run_id=event.run_id,
        notes=event.notes,
        recording_label=event.recording_label,
        recording_streamer_id=event.recording_streamer_id,
        wake_seconds=event.wake_seconds,
        max_wait_seconds=event.max_wait_seconds,
        delete_after_upload=event.delete_after_upload,
        script=event.script,
        credit_eth_per_minute=event.credit_eth_per_minute,
        steps=[],
        last_step_key=key,
    )


def touch(job: RecordingJob, at: datetime) -> None:
    if job.updated_at is None or at > job.updated_at:
        job.updated_at = at


def step_index(step: str) -> int:
    return JOB_STEPS.index(step) if step in JOB_STEPS else -1


def apply_step(job: RecordingJob, key: str, event: JobStepRecordedV1) -> Outcome:
    if step_index(event.step) <= step_index(job.step):
        return Outcome.done({"ignored": "step already recorded"})
    job.step = event.step
    job.last_step_key = key
    job.steps = [*(job.steps or []), {"step": event.step, "at": iso(event.at), **event.detail}]
    touch(job, event.at)
    if event.step == "started":
        job.state, job.started_at, job.host = "running", event.at, event.host
    elif event.step == "recording_started":
        job.recording_file = event.recording_file
    elif event.step == "script_started":
        job.runner_session_id, job.script_started_at = event.runner_session_id, event.at
    elif event.step == "uploaded":
        job.artifact_uri, job.artifact_hash = event.artifact_uri, event.artifact_hash
        job.duration_ms = event.duration_ms
    return Outcome.done({"step": event.step})


def apply_end(job: RecordingJob, event: JobFinishedV1) -> Outcome:
    job.state, job.ended_at, job.error = event.state, event.at, event.error
    job.workload_id = event.workload_id
    touch(job, event.at)
    return Outcome.done({"state": event.state})


SCHEMAS: dict[str, type[Any]] = {
    model.SCHEMA: model
    for model in (JobRequestedV1, JobStepRecordedV1, JobCancelRequestedV1, JobFinishedV1)
}
job_events = runtime.event_consumer(
    consumer=JOBS_PROJECTION_CONSUMER.durable, schemas=SCHEMAS, projector=JobsProjector()
)
ROUTES: list[tuple[ConsumerSpec, EventConsumer[Any]]] = [(JOBS_PROJECTION_CONSUMER, job_events)]


@runtime.consume(JOBS_PROJECTION_CONSUMER)
async def on_job_events(messages: list[Msg]) -> None:
    await job_events.handle(messages)


# -- the credit -----------------------------------------------------------------------------


def credit_event(job: RecordingJob) -> WorkloadTimeRecordedV1:
    """The job's workload, built only from stored events: every copy builds the same one."""
    assert job.started_at is not None and job.duration_ms is not None
    fields: dict[str, Any] = {
        "workload_id": f"job:{job.job_id}",
        "orchestrator_id": job.orchestrator_id,
        "duration_ms": min(max(job.duration_ms, 1), MAX_CREDIT_DURATION_MS),
        "credit_eth_per_minute": job.credit_eth_per_minute,
        "plan_id": job.plan_id,
        "run_id": job.run_id,
        "artifact_hash": job.artifact_hash,
        "artifact_uri": job.artifact_uri,
        "notes": job.notes,
        "status": "verified",
        "job_id": job.job_id,
    }
    digest = hashlib.sha256(repr(sorted(fields.items())).encode("utf-8")).hexdigest()
    return WorkloadTimeRecordedV1(
        **fields,
        body_sha256=digest,
        # The upload's end, as the uploaded step recorded it.
        received_at=job.started_at + timedelta(milliseconds=job.duration_ms),
    )


# -- the driver -----------------------------------------------------------------------------


class ProjectionBehind(RuntimeError):
    """The projection has not applied the message's event yet."""


@dataclass
class Delivered:
    """The newest delivery of one stream message (a redelivery replaces it while we drive)."""

    msg: Msg

    @property
    def seq(self) -> int:
        return int(self.msg.metadata.sequence.stream)

    @property
    def attempts(self) -> int:
        return int(self.msg.metadata.num_delivered)


def decode(msg: Msg) -> tuple[JobRequestedV1 | JobStepRecordedV1, str] | None:
    headers = msg.headers or {}
    key = headers.get(EVENT_KEY_HEADER) or headers.get(MSG_ID_HEADER)
    model = {m.SCHEMA: m for m in (JobRequestedV1, JobStepRecordedV1)}.get(
        headers.get(SCHEMA_HEADER, "")
    )
    if not key or model is None:
        return None
    try:
        return model.model_validate_json(msg.data), key
    except ValidationError:
        return None


class JobDriver:
    def __init__(self) -> None:
        self.spec = JOBS_DRIVER_CONSUMER
        self.ack_wait_s = ACK_WAIT_S
        self.http: aiohttp.ClientSession | None = None
        # Reads only: on SQLite the worker's own engine takes the write lock for every
        # transaction, which the driver's frequent polls must not hold.
        self._reader: AsyncEngine | None = None
        self.read: async_sessionmaker[AsyncSession] = async_sessionmaker(expire_on_commit=False)
        self._running = False
        self._loop: asyncio.Task[None] | None = None
        self._driving: dict[int, tuple[Delivered, asyncio.Task[None]]] = {}

    # -- life cycle -------------------------------------------------------------------------

    async def start(self) -> None:
        js = runtime.js
        info = await js.consumer_info(self.spec.stream, self.spec.durable)
        # The provisioned ack_wait decides how often a running step extends its deadline.
        self.ack_wait_s = float(info.config.ack_wait or ACK_WAIT_S)
        self._reader = make_engine(settings.resolved_database_url, writer=False)
        self.read.configure(bind=self._reader)
        self.http = aiohttp.ClientSession()
        await presigner.start()
        consumer = PullConsumer(runtime.nc, self.spec.stream, self.spec.durable)
        await consumer.start()
        self._running = True
        self._loop = asyncio.create_task(self._fetch_loop(consumer), name="jobs:driver")

    async def stop(self) -> None:
        """Stop fetching and hand every job in hand back to the stream (nak) for another copy."""
        self._running = False
        if self._loop is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._loop, DRIVER_FETCH_TIMEOUT_S * 3)
        tasks = [task for _, task in self._driving.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.http is not None:
            await self.http.close()
        await presigner.close()
        if self._reader is not None:
            await self._reader.dispose()

    async def _fetch_loop(self, consumer: PullConsumer) -> None:
        while self._running:  # until stop()
            free = MAX_JOBS_IN_FLIGHT - len(self._driving)
            if free <= 0:
                tasks = [task for _, task in self._driving.values()]
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                continue
            try:
                messages = await consumer.fetch(
                    min(free, self.spec.batch_size), DRIVER_FETCH_TIMEOUT_S
                )
            except (nats.errors.Error, OSError, PullError) as error:
                log.warning("driver fetch failed", extra={"error": type(error).__name__})
                await asyncio.sleep(DRIVER_FETCH_TIMEOUT_S)
                continue
            for msg in messages:
                self._take(msg)
        with contextlib.suppress(Exception):
            await consumer.stop()

    def _take(self, msg: Msg) -> None:
        delivered = Delivered(msg)
        known = self._driving.get(delivered.seq)
        if known is not None:
            known[0].msg = msg  # redelivered while this copy still drives it: keep the newest
            return
        # The task copies the context: every line it logs names the message (event key, seq).
        with handling(self.spec.durable, [msg]):
            task = asyncio.create_task(self._handle(delivered), name=f"jobs:seq:{delivered.seq}")
        self._driving[delivered.seq] = (delivered, task)
        task.add_done_callback(functools.partial(self._forget, delivered.seq))

    def _forget(self, seq: int, _task: asyncio.Task[None]) -> None:
        self._driving.pop(seq, None)

    # -- one message ------------------------------------------------------------------------

    async def _handle(self, delivered: Delivered) -> None:
        keepalive = asyncio.create_task(self._keep_message(delivered))
        try:
            await self._drive(delivered.msg)
            verdict = "ack"
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await delivered.msg.nak()  # stopping: another copy resumes the job at once
            raise
        except Exception as error:
            verdict = await self._after_error(delivered, error)
        finally:
            keepalive.cancel()
        with contextlib.suppress(Exception):
            if verdict == "ack":
                await delivered.msg.ack()
            elif verdict == "term":
                await delivered.msg.term()
            else:
                index = min(max(delivered.attempts - 1, 0), len(RETRY_BACKOFF_S) - 1)
                await delivered.msg.nak(delay=RETRY_BACKOFF_S[index])

    async def _keep_message(self, delivered: Delivered) -> None:
        """Extend the ack deadline while this copy is alive: only a dead copy's message moves."""
        while True:  # cancelled when the message is settled
            await asyncio.sleep(self.ack_wait_s / PROGRESS_PER_ACK_WAIT)
            with contextlib.suppress(Exception):
                await delivered.msg.in_progress()

    async def _after_error(self, delivered: Delivered, error: Exception) -> str:
        """Retry with backoff (NATS, the database or the projection lagging); after
        MAX_ATTEMPTS deliveries end the job so nothing waits on it forever: completed if its
        recording is already uploaded (the credit is idempotent), else `failed`. If even that
        fails, the message becomes a dead letter (`payments dlq retry` resumes the job)."""
        reason = f"{type(error).__name__}: {str(error)[:200]}"
        log.warning(
            "job message failed; will retry",
            extra={"stream_seq": delivered.seq, "attempts": delivered.attempts, "error": reason},
        )
        decoded = decode(delivered.msg)
        if delivered.attempts < MAX_ATTEMPTS or decoded is None:
            return "nak" if decoded is not None else "term"
        error_text = f"the jobs worker gave up after {delivered.attempts} attempts: {reason}"
        try:
            async with self.read() as db:
                job = await jobs.get(db, decoded[0].job_id)
            if job is None:
                # The projection is behind: a later delivery finds the row; the last one the
                # server allows is kept as a dead letter rather than dropped.
                if delivered.attempts < self.spec.max_deliver:
                    return "nak"
                return await self._bury(delivered, f"job row not found: {reason}")
            if jobs.is_terminal(job):
                return "term"
            if job.step == "uploaded":
                await self._complete(job)  # uploaded means credited: never fail it now
            else:
                await self._finish(job, "failed", error_text)
        except Exception as give_up_error:
            log.exception("could not end the job after retries")
            why = f"{error_text}; ending it failed: {type(give_up_error).__name__}"
            return await self._bury(delivered, f"{why}: {str(give_up_error)[:200]}")
        return "term"

    async def _bury(self, delivered: Delivered, reason: str) -> str:
        """Keep the message as a dead letter and terminate it; nak if the write fails."""
        letter = dead_letter(self.spec.durable, Delivery.from_msg(delivered.msg), reason)
        try:
            async with runtime.sessionmaker() as session, session.begin():
                await dead_letters.record(session, [letter])
        except Exception:
            # The server's max_deliver sits above MAX_ATTEMPTS, so a later delivery tries again.
            log.exception("could not write a dead letter", extra={"stream_seq": delivered.seq})
            return "nak"
        log.warning(
            "job message dead-lettered",
            extra={"stream_seq": delivered.seq, "event_key": letter.event_key, "error": reason},
        )
        return "term"

    async def _drive(self, msg: Msg) -> None:
        decoded = decode(msg)
        if decoded is None:
            return  # the projection dead-letters it; nothing to drive
        event, key = decoded
        job = await self._head_of_chain(event.job_id, key)
        if job is None or jobs.is_terminal(job):
            return
        if job.step == "requested":
            await self._start(job)
        elif job.step == "uploaded":
            await self._complete(job)
        else:
            await self._next_step(job)

    async def _head_of_chain(self, job_id: str, key: str) -> RecordingJob | None:
        """The job, once the projection holds this event as its newest; None if it is older."""
        deadline = time.monotonic() + PROJECTION_WAIT_S
        while True:  # bounded by the deadline
            async with self.read() as db:
                # Inbox first: each statement may see a newer commit (READ COMMITTED), and the
                # row read after it is at least as new, so "applied but not the newest" is true.
                applied = await jobs.applied(db, JOBS_PROJECTION_CONSUMER.durable, key)
                job = await jobs.get(db, job_id)
            if job is not None and job.last_step_key == key:
                return job
            if applied:
                return None  # a newer step exists: another delivery drives that one
            if time.monotonic() >= deadline:
                raise ProjectionBehind(f"projection has not applied {key}")
            await asyncio.sleep(PROJECTION_POLL_S)

    # -- the chain --------------------------------------------------------------------------

    async def _start(self, job: RecordingJob) -> None:
        if job.cancel_requested_at is not None:
            await self._finish(job, "cancelled", CANCELLED)
            return
        host = await self._resolve_host(job.orchestrator_id)
        if host is None:
            await self._finish(job, "failed", HOST_MISSING)
            return
        job.host = host
        await self._publish_lease(job, "issue")
        # Stamped after the lease exists: the credited duration starts here, as it did.
        started = JobStepRecordedV1(
            job_id=job.job_id,
            orchestrator_id=job.orchestrator_id,
            step="started",
            at=utc_now(),
            host=host,
        )
        await self._publish_step(started)

    async def _next_step(self, job: RecordingJob) -> None:
        assert self.http is not None and job.host is not None
        host = HostServices(self.http, job.host, PORTS, settings.job_http_timeout_seconds)
        tools = StepTools(
            settings, presigner, functools.partial(self._cancel_requested, job.job_id)
        )
        heartbeats = asyncio.create_task(self._keep_lease(job))
        ending: tuple[JobEndState, str] | None = None
        try:
            result = await StepRunner(tools, host, job).run()
        except JobCancelled:
            ending = ("cancelled", CANCELLED)
        except JobFailed as failure:
            ending = ("failed", str(failure))
        finally:
            heartbeats.cancel()
        if ending is not None:
            await self._finish(job, *ending)
            return
        await self._publish_step(result)

    async def _complete(self, job: RecordingJob) -> None:
        """Credit through the ledger's workload path, then end the job completed."""
        credit = credit_event(job)
        async with self.read() as db:
            existing = await workloads.get(db, credit.workload_id)
        if existing is not None and existing.body_sha256 != credit.body_sha256:
            await self._finish(
                job,
                "failed",
                f"workload {credit.workload_id} already exists; refusing to double-credit",
            )
            return
        await publish_event(
            runtime.js,
            stream=WORKLOADS.name,
            subject=subjects.workload_time(job.orchestrator_id),
            event=credit,
            key=f"workload_time:{credit.workload_id}:{credit.body_sha256[:16]}",
        )
        await self._finish(job, "completed", None, workload_id=credit.workload_id)

    async def _finish(
        self,
        job: RecordingJob,
        state: JobEndState,
        error: str | None,
        workload_id: str | None = None,
    ) -> None:
        if state != "completed" and job.step in RECORDING_STEPS and job.host is not None:
            await self._stop_recorder_quietly(job.host)
        # Revoke even before the first step: an issue may have been sent (a revoke of an
        # unknown lease is a no-op). Best effort: a SESSIONS outage must not keep the job from
        # ending; the lease then expires on its own.
        try:
            await self._publish_lease(job, "revoke")
        except Exception as revoke_error:
            log.warning(
                "lease revoke failed",
                extra={"job_id": job.job_id, "error": f"{revoke_error!r}"[:300]},
            )
        end = JobFinishedV1(
            job_id=job.job_id,
            orchestrator_id=job.orchestrator_id,
            state=state,
            at=utc_now(),
            error=error[:ERROR_MAX_CHARS] if error else None,
            workload_id=workload_id,
        )
        await self._publish(
            WORKLOADS.name,
            subjects.job_finished(job.orchestrator_id),
            end,
            f"job:{job.job_id}:finished",
        )
        log.info("job ended", extra={"job_id": job.job_id, "state": state, "error": error})

    async def _stop_recorder_quietly(self, host: str) -> None:
        assert self.http is not None
        services = HostServices(self.http, host, PORTS, settings.job_http_timeout_seconds)
        try:
            await services.stop_recording()
        except HostServiceError as error:
            log.info("best-effort recorder stop failed", extra={"error": str(error)})

    # -- helpers ----------------------------------------------------------------------------

    async def _cancel_requested(self, job_id: str) -> bool:
        async with self.read() as db:
            job = await jobs.get(db, job_id)
        return job is not None and job.cancel_requested_at is not None

    async def _resolve_host(self, orchestrator_id: str) -> str | None:
        """The registry's `health_url` host, else `host_public_ip`, else `last_seen_ip`."""
        async with self.read() as db:
            row = await db.get(Orchestrator, orchestrator_id)
        if row is None:
            return None
        if row.health_url:
            with contextlib.suppress(ValueError):
                hostname = urlsplit(row.health_url).hostname
                if hostname:
                    return hostname
        return row.host_public_ip or row.last_seen_ip

    async def _keep_lease(self, job: RecordingJob) -> None:
        """Issue the lease again as each step starts (a job resumed after a long wait may have
        lost it), then heartbeat every third of its length while the step runs: steps that
        are each short can still add up to more than one lease length."""
        interval_s = lease_seconds() / HEARTBEATS_PER_LEASE
        action: LeaseAction = "issue"
        while True:  # cancelled when the step ends
            try:
                await self._publish_lease(job, action)
            except Exception as error:
                log.warning(
                    "lease command failed", extra={"action": action, "error": type(error).__name__}
                )
            action = "heartbeat"
            await asyncio.sleep(interval_s)

    async def _publish_lease(self, job: RecordingJob, action: LeaseAction) -> None:
        now = utc_now()
        lease = lease_id(job.job_id)
        command = ActivityLeaseCommandV1(
            action=action,
            lease_id=lease,
            orchestrator_id=job.orchestrator_id,
            upstream_addr=job.host if action == "issue" else None,
            kind="job" if action == "issue" else None,
            lease_seconds=lease_seconds() if action != "revoke" else None,
            metadata={"job_id": job.job_id} if action == "issue" else None,
            received_at=now,
        )
        key = f"lease:{action}:{lease}"
        if action != "revoke":  # each issue and heartbeat is a new command, not a repeat
            key = f"{key}:{iso(now)}"
        await self._publish(SESSIONS.name, subjects.activity_lease_command(lease), command, key)

    async def _publish_step(self, step: JobStepRecordedV1) -> None:
        await self._publish(
            WORKLOADS.name,
            subjects.job_step(step.orchestrator_id),
            step,
            f"job:{step.job_id}:step:{step.step}",
        )
        log.info("job step finished", extra={"job_id": step.job_id, "step": step.step})

    async def _publish(self, stream: str, subject: str, event: EventModel, key: str) -> None:
        await publish_event(runtime.js, stream=stream, subject=subject, event=event, key=key)


def lease_seconds() -> int:
    wanted = max(settings.activity_lease_seconds, MIN_LEASE_S)
    return min(wanted, settings.activity_lease_max_seconds)


driver = JobDriver()
runtime.consumer_specs.append(JOBS_DRIVER_CONSUMER)
runtime.startup_hooks.append(driver.start)
runtime.shutdown_hooks.append(driver.stop)
