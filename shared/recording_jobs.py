"""The steps of a recording job (the original's §8.4), each a function of the job's projected row.

`StepRunner.run()` performs the step that follows the job's last finished step against the
orchestrator host's services and S3, and returns that step's result as a JobStepRecordedV1 for
the jobs worker to publish. It never publishes and never writes the database, so running a step
again after a crash is safe: the step either repeats an idempotent call (wake, probes, stop,
upload to the same key) or first checks what the host already did (a script already submitted
under the job's session id is not submitted twice).

A step that cannot succeed raises JobFailed with the job's `error`; a cancel request seen while
waiting raises JobCancelled. Every timestamp comes from this worker's clock and is stamped into
the step's event, so the projection (and a replay) never reads a clock.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from contracts.events import JobStep, JobStepRecordedV1
from shared.db.models import RecordingJob
from shared.host_services import HostServiceError, HostServices
from shared.s3 import Presigner, S3Location
from shared.settings import Settings

# How many leading characters of the job id name its recording and runner session.
JOB_ID_PREFIX_CHARS = 12
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9._-]")
# The longest artifact hash and location the job's events carry (JobStepRecordedV1's hash,
# WorkloadTimeRecordedV1's uri): a longer one can never be published, so it fails the job.
MAX_ARTIFACT_HASH_CHARS = 256
MAX_ARTIFACT_URI_CHARS = 512


class JobFailed(Exception):
    """The job cannot go on; the message is its `error`."""


class JobCancelled(Exception):
    """An admin asked to cancel the job."""


def utc_now() -> datetime:
    return datetime.now(UTC)


def sanitize(part: str, fallback: str = "x") -> str:
    """One S3 key segment or label: only `[A-Za-z0-9._-]`, never empty, never `.` or `..`."""
    cleaned = _UNSAFE_KEY_CHARS.sub("_", part.strip())
    return fallback if cleaned in ("", ".", "..") else cleaned


def job_tag(job_id: str) -> str:
    return f"job_{sanitize(job_id)[:JOB_ID_PREFIX_CHARS]}"


def runner_session_id(job: RecordingJob) -> str:
    """The runner's session id, fixed by the job's start so a resumed step asks for the same."""
    assert job.started_at is not None
    return f"{job_tag(job.job_id)}_{int(job.started_at.timestamp())}"


def recording_location(settings: Settings, job: RecordingJob, file_name: str) -> S3Location:
    """`<prefix>/<orchestrator>/<job_id>/<file>`, each part sanitized, in the recordings bucket."""
    assert settings.recordings_bucket
    prefix = "/".join(
        sanitize(part) for part in (settings.recordings_prefix or "recordings").split("/") if part
    )
    parts = [
        prefix or "recordings",
        sanitize(job.orchestrator_id),
        sanitize(job.job_id),
        sanitize(file_name.rsplit("/", 1)[-1]),
    ]
    return S3Location(settings.recordings_bucket, "/".join(parts))


def duration_ms(job: RecordingJob, at: datetime) -> int:
    assert job.started_at is not None
    return max(0, int((at - job.started_at).total_seconds() * 1000))


@dataclass
class StepTools:
    settings: Settings
    presigner: Presigner
    # True once an admin asked to cancel the job (read from the projection).
    cancel_requested: Callable[[], Awaitable[bool]]
    now: Callable[[], datetime] = utc_now


class StepRunner:
    def __init__(self, tools: StepTools, host: HostServices, job: RecordingJob) -> None:
        self.tools = tools
        self.settings = tools.settings
        self.host = host
        self.job = job

    async def run(self) -> JobStepRecordedV1:
        """Perform the step after `job.step` and return its result."""
        steps: dict[str, Callable[[], Awaitable[JobStepRecordedV1]]] = {
            "started": self.wake,
            "woken": self.wait_until_ready,
            "ready": self.start_recording,
            "recording_started": self.run_script,
            "script_started": self.await_script,
            "script_finished": self.stop_recording,
            "recording_stopped": self.upload,
        }
        step = steps.get(self.job.step)
        if step is None:
            raise JobFailed(f"no step follows {self.job.step!r}")
        if await self.tools.cancel_requested():
            raise JobCancelled()
        return await step()

    def result(self, step: JobStep, **fields: Any) -> JobStepRecordedV1:
        return JobStepRecordedV1(
            job_id=self.job.job_id,
            orchestrator_id=self.job.orchestrator_id,
            step=step,
            at=self.tools.now(),
            **fields,
        )

    async def _pause(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        if await self.tools.cancel_requested():
            raise JobCancelled()

    # -- the steps --------------------------------------------------------------------------

    async def wake(self) -> JobStepRecordedV1:
        try:
            await self.host.wake(self.job.wake_seconds)
        except HostServiceError as error:
            raise JobFailed(f"wake: {error}") from None
        return self.result("woken")

    async def wait_until_ready(self) -> JobStepRecordedV1:
        """Wait for the runner, then the recorder; like the original, go on without them."""
        runner = await self._wait_for(self.host.runner_ready)
        recorder = await self._wait_for(self.host.recorder_ready)
        return self.result("ready", detail={"runner_ready": runner, "recorder_ready": recorder})

    async def _wait_for(self, probe: Callable[[], Awaitable[bool]]) -> bool:
        for attempt in range(self.settings.job_ready_attempts):
            if await probe():
                return True
            if attempt + 1 < self.settings.job_ready_attempts:
                await self._pause(self.settings.job_ready_interval_seconds)
        return False

    async def start_recording(self) -> JobStepRecordedV1:
        label = sanitize(self.job.recording_label or "", job_tag(self.job.job_id))
        try:
            output = await self.host.start_recording(label, self.job.recording_streamer_id)
        except HostServiceError as error:
            raise JobFailed(f"start recording: {error}") from None
        return self.result("recording_started", recording_file=output[-255:])

    async def run_script(self) -> JobStepRecordedV1:
        session_id = runner_session_id(self.job)
        try:
            # A copy that died after submitting left the script running: do not submit twice.
            if await self.host.script_status(session_id) is None:
                await self.host.execute_script(dict(self.job.script or {}), session_id)
        except HostServiceError as error:
            raise JobFailed(f"run script: {error}") from None
        return self.result("script_started", runner_session_id=session_id)

    async def await_script(self) -> JobStepRecordedV1:
        session_id = self.job.runner_session_id or runner_session_id(self.job)
        assert self.job.script_started_at is not None
        deadline = self.job.script_started_at.timestamp() + self.job.max_wait_seconds
        last = "not reported"
        while True:  # bounded by the deadline
            try:
                status = await self.host.script_status(session_id)
                last = status or "unknown to the runner"
            except HostServiceError as error:
                # A blip while polling is not the script's failure; the deadline bounds it.
                status, last = None, str(error)
            if status == "completed":
                return self.result("script_finished", detail={"status": status})
            if status == "failed":
                raise JobFailed(f"script {session_id} failed on the runner")
            if time.time() >= deadline:
                raise JobFailed(
                    f"script {session_id} did not finish within "
                    f"{self.job.max_wait_seconds} s (last: {last})"
                )
            await self._pause(self.settings.job_poll_interval_seconds)

    async def stop_recording(self) -> JobStepRecordedV1:
        try:
            await self.host.stop_recording()
        except HostServiceError as error:
            raise JobFailed(f"stop recording: {error}") from None
        return self.result("recording_stopped")

    async def upload(self) -> JobStepRecordedV1:
        if not self.settings.recordings_bucket:
            raise JobFailed("PAYMENTS_RECORDINGS_BUCKET is unset: nowhere to upload the recording")
        file_name = self.job.recording_file or ""
        location = recording_location(self.settings, self.job, file_name)
        if len(location.uri) > MAX_ARTIFACT_URI_CHARS:
            raise JobFailed(
                f"recording location is {len(location.uri)} characters, "
                f"longer than {MAX_ARTIFACT_URI_CHARS}: {location.uri[:200]}..."
            )
        try:
            upload_url = await self.tools.presigner.presign(
                "PUT", location, self.settings.recordings_presign_seconds
            )
        except Exception as error:
            raise JobFailed(f"presign upload of {location.uri}: {type(error).__name__}") from None
        digest = await self._upload_with_retries(file_name, upload_url, location)
        if digest is not None and len(digest) > MAX_ARTIFACT_HASH_CHARS:
            raise JobFailed(
                f"recorder reported a sha256 of {len(digest)} characters, "
                f"longer than {MAX_ARTIFACT_HASH_CHARS}: {digest[:64]}..."
            )
        await self._confirm(location)
        at = self.tools.now()
        return JobStepRecordedV1(
            job_id=self.job.job_id,
            orchestrator_id=self.job.orchestrator_id,
            step="uploaded",
            at=at,
            artifact_uri=location.uri,
            artifact_hash=digest,
            duration_ms=duration_ms(self.job, at),
        )

    async def _upload_with_retries(
        self, file_name: str, upload_url: str, location: S3Location
    ) -> str | None:
        attempts = self.settings.job_upload_attempts
        last = ""
        for attempt in range(attempts):
            try:
                return await self.host.upload(file_name, upload_url, self.job.delete_after_upload)
            except HostServiceError as error:
                last = str(error)
            if attempt + 1 < attempts:
                await self._pause(self.settings.job_upload_interval_seconds)
        raise JobFailed(f"upload to {location.uri} failed after {attempts} attempts: {last}")

    async def _confirm(self, location: S3Location) -> None:
        """Credit only a recording that is really in the bucket."""
        try:
            size = await self.tools.presigner.object_size(location)
        except Exception as error:
            raise JobFailed(
                f"upload to {location.uri} not confirmed: S3 unavailable ({type(error).__name__})"
            ) from None
        if size is None:
            raise JobFailed(f"upload to {location.uri} not confirmed: no such object")
