"""Recording jobs end to end, on the real stack (nats-server, SQLite or PostgreSQL, moto S3, the
registry, sessions, ledger and jobs workers, the api) against a fake orchestrator host whose
recorder really uploads through the presigned URL.

One stack per database backend is shared by the module; each test uses its own orchestrator, so
ledger balances and "one active job per orchestrator" do not mix between tests.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from sqlalchemy import select

from shared.db.engine import make_engine, make_sessionmaker
from shared.db.models import RecordingJob
from shared.money import rate_credit_wei
from tests.conftest import database_backends
from tests.e2e import run_cli
from tests.harness import create_database
from tests.jobs_stack import (
    BUCKET,
    PREFIX,
    UNREACHABLE_HOST,
    JobsStack,
    jobs_stack,
    orchestrator,
    recording_bytes,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

ORCH_E2E = "orch-e2e"
ORCH_KILL = "orch-kill"
ORCH_RUNNER = "orch-runner-fails"
ORCH_RECORDER = "orch-recorder-fails"
ORCH_S3 = "orch-s3-down"
ORCH_UNREACHABLE = "orch-unreachable"
ORCH_NO_HOST = "orch-no-host"
ORCH_CANCEL = "orch-cancel"
ORCH_INPUT = "orch-input"
ORCH_DUPLICATE = "orch-duplicate"
ORCH_LONG_HASH = "orch-long-hash"
ORCHESTRATORS = [
    orchestrator(ORCH_E2E),
    orchestrator(ORCH_KILL),
    orchestrator(ORCH_RUNNER),
    orchestrator(ORCH_RECORDER),
    orchestrator(ORCH_S3),
    orchestrator(ORCH_UNREACHABLE, UNREACHABLE_HOST),
    orchestrator(ORCH_NO_HOST, None),
    orchestrator(ORCH_CANCEL),
    orchestrator(ORCH_INPUT),
    orchestrator(ORCH_DUPLICATE),
    orchestrator(ORCH_LONG_HASH),
]
RATE = "0.000005353596"  # PAYMENTS_WORKLOAD_TIME_CREDIT_ETH_PER_MINUTE's default
SCRIPT = {"commands": [{"type": "say", "text": "hello"}, {"type": "wait", "ms": 10}]}
STEPS = [
    "started",
    "woken",
    "ready",
    "recording_started",
    "script_started",
    "script_finished",
    "recording_stopped",
    "uploaded",
]


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=database_backends())
async def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[JobsStack]:
    tmp: Path = tmp_path_factory.mktemp(f"jobs-{request.param}")
    async with jobs_stack(request.param, tmp, ORCHESTRATORS) as running:
        yield running


@pytest.fixture(autouse=True)
def fresh_host(stack: JobsStack) -> None:
    stack.host.reset()


async def start_job(stack: JobsStack, orchestrator_id: str, **extra: Any) -> str:
    body = {"orchestrator_id": orchestrator_id, "script": SCRIPT, "wake_seconds": 600, **extra}
    status, answer = await stack.call("POST", "/api/jobs/record", body)
    assert status == 202, answer
    assert answer["state"] == "pending" and answer["orchestrator_id"] == orchestrator_id
    return str(answer["job_id"])


async def assert_failed_cleanly(stack: JobsStack, job_id: str, orchestrator_id: str) -> str:
    """The job failed with an error, credited nothing, and its lease is released."""
    job = await stack.ended(job_id)
    assert job.state == "failed", (job.state, job.error)
    assert job.error and job.ended_at is not None
    assert job.workload_id is None
    assert await stack.workload(f"job:{job_id}") is None
    assert await stack.ledger(orchestrator_id) == []
    status, view = await stack.call("GET", f"/api/jobs/{job_id}")
    assert status == 200 and view["state"] == "failed" and view["error"] == job.error
    if job.started_at is not None:
        lease = await stack.until(lambda: lease_released(stack, job_id))
        assert lease
    return job.error


async def lease_released(stack: JobsStack, job_id: str) -> bool:
    lease = await stack.lease(job_id)
    return lease is not None and lease.revoked_at is not None


async def active_leases(stack: JobsStack, orchestrator_id: str) -> list[str]:
    status, answer = await stack.call(
        "GET", f"/api/activity/leases?orchestrator_id={orchestrator_id}&active_only=true"
    )
    assert status == 200, answer
    return [lease["lease_id"] for lease in answer["leases"]]


async def test_job_records_uploads_and_credits_once(stack: JobsStack) -> None:
    stack.host.script_release.clear()  # hold the runner step until the lease is seen
    job_id = await start_job(
        stack, ORCH_E2E, recording_label="take one", plan_id="plan-1", run_id="run-1"
    )

    async def lease_held() -> bool:
        return f"job:{job_id}" in await active_leases(stack, ORCH_E2E)

    await stack.until(lease_held)
    stack.host.script_release.set()
    job = await stack.ended(job_id)
    assert job.state == "completed", (job.error, stack.logs())
    assert job.error is None
    assert [step["step"] for step in job.steps or []] == STEPS

    # The host was driven once through every step, with the original's bodies.
    host = stack.host
    assert host.wakes == [{"action": "wake", "reason": "job", "awake_seconds": 600}]
    assert host.starts == [{"label": "take_one"}]
    assert len(host.executes) == 1
    assert host.executes[0]["commands"] == SCRIPT["commands"]
    assert host.executes[0]["session_id"] == job.runner_session_id
    assert job.runner_session_id.startswith(f"job_{job_id[:12]}_")
    assert host.stops == 1 and len(host.uploads) == 1
    assert host.uploads[0]["delete_after"] is True

    # The object is in the bucket, under the prefix, with the reported hash.
    key = f"{PREFIX}/{ORCH_E2E}/{job_id}/take_one.webm"
    assert job.artifact_uri == f"s3://{BUCKET}/{key}"
    stored = stack.moto.client().get_object(Bucket=BUCKET, Key=key)["Body"].read()
    assert stored == recording_bytes("take_one.webm")
    assert job.artifact_hash == hashlib.sha256(stored).hexdigest()

    # The view presigns a fresh download URL that really serves the recording.
    status, view = await stack.call("GET", f"/api/jobs/{job_id}")
    assert status == 200 and view["state"] == "completed"
    assert view["workload_id"] == f"job:{job_id}" and view["duration_ms"] == job.duration_ms
    async with stack.http.get(view["artifact_download_url"]) as download:
        assert download.status == 200 and await download.read() == stored

    # One workload_time credit through the ledger's workload path, for the job's duration.
    async def credited() -> list[Any]:
        return await stack.ledger(ORCH_E2E)

    await stack.until(credited)
    await stack.ledger_drained()
    entries = await stack.ledger(ORCH_E2E)
    assert len(entries) == 1
    entry = entries[0]
    assert entry.reason == "workload_time" and entry.entry_key == f"workload:job:{job_id}"
    assert job.duration_ms and job.duration_ms > 0
    assert entry.amount_wei == rate_credit_wei(job.duration_ms, RATE)
    assert (entry.entry_metadata or {})["job_id"] == job_id
    workload = await stack.workload(f"job:{job_id}")
    assert (
        workload is not None and workload.credited and workload.artifact_hash == job.artifact_hash
    )

    # The lease is gone.
    assert await stack.until(lambda: lease_released(stack, job_id))
    assert f"job:{job_id}" not in await active_leases(stack, ORCH_E2E)


async def test_killed_worker_is_replaced_and_the_job_resumes(stack: JobsStack) -> None:
    stack.host.script_release.clear()  # the script runs until the test lets it finish
    job_id = await start_job(stack, ORCH_KILL)

    async def in_runner_step() -> bool:
        job = await stack.job(job_id)
        return job is not None and job.step == "script_started" and len(stack.host.executes) == 1

    await stack.until(in_runner_step)
    polls = stack.host.status_polls

    async def polling_the_runner() -> bool:
        return stack.host.status_polls > polls

    await stack.until(polling_the_runner)  # the copy about to die is polling the runner
    stack.workers["jobs"].kill()  # SIGKILL: no drain, no nak
    replacement = await stack.start_worker("jobs")
    stack.host.script_release.set()

    job = await stack.ended(job_id, timeout_s=30)
    assert job.state == "completed", (job.error, stack.logs())
    assert job_id in replacement.log_text()  # the new copy finished what the dead one began
    # Resumed from the last finished step: nothing before the runner step ran twice.
    assert len(stack.host.wakes) == 1 and len(stack.host.starts) == 1
    assert len(stack.host.executes) == 1
    assert [step["step"] for step in job.steps or []] == STEPS
    assert await stack.jobs_messages("jobs.steps.>") >= len(STEPS)

    async def credited() -> list[Any]:
        return await stack.ledger(ORCH_KILL)

    await stack.until(credited)
    await stack.ledger_drained()
    entries = await stack.ledger(ORCH_KILL)
    assert [(e.reason, e.entry_key) for e in entries] == [
        ("workload_time", f"workload:job:{job_id}")
    ]
    assert await stack.until(lambda: lease_released(stack, job_id))


async def test_runner_failure_fails_the_job_and_stops_the_recorder(stack: JobsStack) -> None:
    stack.host.script_result = "failed"
    job_id = await start_job(stack, ORCH_RUNNER)
    error = await assert_failed_cleanly(stack, job_id, ORCH_RUNNER)
    assert "failed on the runner" in error
    assert stack.host.stops == 1 and stack.host.uploads == []


async def test_recorder_failure_fails_the_job(stack: JobsStack) -> None:
    stack.host.recorder_start_fails = True
    job_id = await start_job(stack, ORCH_RECORDER)
    error = await assert_failed_cleanly(stack, job_id, ORCH_RECORDER)
    assert error.startswith("start recording: ") and "no capture device" in error
    assert stack.host.executes == []


async def test_s3_unavailable_fails_the_job(stack: JobsStack) -> None:
    stack.moto.process.terminate()
    try:
        job_id = await start_job(stack, ORCH_S3)
        error = await assert_failed_cleanly(stack, job_id, ORCH_S3)
    finally:
        await asyncio.to_thread(stack.moto.start)
        stack.moto.client().create_bucket(Bucket=BUCKET)
    assert error.startswith(f"upload to s3://{BUCKET}/") and "after 3 attempts" in error
    assert "X-Amz-Signature" not in error and "http" not in error
    assert len(stack.host.uploads) == 3


async def test_oversized_recorder_hash_fails_the_job_at_once(stack: JobsStack) -> None:
    stack.host.reported_sha256 = "f" * 300  # longer than the events' artifact_hash
    job_id = await start_job(stack, ORCH_LONG_HASH)
    error = await assert_failed_cleanly(stack, job_id, ORCH_LONG_HASH)
    assert "sha256 of 300 characters" in error and "longer than 256" in error
    assert len(stack.host.uploads) == 1  # a clear failure, not a retried ValidationError


async def test_unreachable_host_fails_the_job(stack: JobsStack) -> None:
    job_id = await start_job(stack, ORCH_UNREACHABLE)
    error = await assert_failed_cleanly(stack, job_id, ORCH_UNREACHABLE)
    assert error.startswith(f"wake: power service at {UNREACHABLE_HOST} unreachable")
    assert stack.host.wakes == []


async def test_orchestrator_without_a_host_fails_before_starting(stack: JobsStack) -> None:
    job_id = await start_job(stack, ORCH_NO_HOST)
    error = await assert_failed_cleanly(stack, job_id, ORCH_NO_HOST)
    assert error == "orchestrator host missing from registry"
    assert await stack.lease(job_id) is None


async def test_active_job_conflicts_and_cancel(stack: JobsStack) -> None:
    stack.host.script_release.clear()
    job_id = await start_job(stack, ORCH_CANCEL, job_id="cancel-me")
    assert job_id == "cancel-me"

    async def running() -> bool:
        job = await stack.job(job_id)
        return job is not None and job.step == "script_started"

    await stack.until(running)
    before = await stack.jobs_messages()
    status, answer = await stack.call(
        "POST", "/api/jobs/record", {"orchestrator_id": ORCH_CANCEL, "script": SCRIPT}
    )
    assert (status, answer) == (409, {"detail": "Orchestrator already has an active job"})
    status, answer = await stack.call(
        "POST",
        "/api/jobs/record",
        {"orchestrator_id": ORCH_DUPLICATE, "job_id": job_id, "script": SCRIPT},
    )
    assert (status, answer) == (409, {"detail": "Job already exists"})
    assert await stack.jobs_messages() == before

    status, answer = await stack.call("POST", f"/api/jobs/{job_id}/cancel")
    assert status == 202, answer
    assert answer["cancel_requested_at"] is not None
    job = await stack.ended(job_id)
    assert job.state == "cancelled" and job.error == "cancelled by an admin"
    assert stack.host.stops == 1 and stack.host.uploads == []
    assert await stack.workload(f"job:{job_id}") is None and await stack.ledger(ORCH_CANCEL) == []
    assert await stack.until(lambda: lease_released(stack, job_id))
    status, answer = await stack.call("POST", f"/api/jobs/{job_id}/cancel")
    assert (status, answer) == (409, {"detail": "Job already ended"})


async def test_bad_input_gets_a_clear_4xx_and_publishes_nothing(stack: JobsStack) -> None:
    before = await stack.jobs_messages()
    cases: list[tuple[Any, int, str]] = [
        ({"orchestrator_id": "nobody", "script": SCRIPT}, 404, "Unknown orchestrator"),
        ({"orchestrator_id": ORCH_INPUT}, 422, "script"),
        ({"orchestrator_id": ORCH_INPUT, "script": {"commands": []}}, 422, "commands"),
        ({"orchestrator_id": ORCH_INPUT, "script": {"x": 1}}, 422, "commands"),
        ({"orchestrator_id": ORCH_INPUT, "script": SCRIPT, "max_wait_seconds": 10}, 422, "max"),
        ({"orchestrator_id": ORCH_INPUT, "script": SCRIPT, "wake_seconds": -1}, 422, "wake"),
        ({"orchestrator_id": ORCH_INPUT, "script": SCRIPT, "job_id": "a/b"}, 422, "job_id"),
        ({"orchestrator_id": ORCH_INPUT, "script": SCRIPT, "job_id": "j" * 157}, 422, "job_id"),
        ("{not json", 400, "Malformed JSON"),
    ]
    for body, want_status, want_detail in cases:
        status, answer = await stack.call("POST", "/api/jobs/record", body)
        assert status == want_status, (body, answer)
        assert want_detail in answer["detail"], (body, answer)
    no_token = {"Content-Type": "application/json"}
    body = {"orchestrator_id": ORCH_INPUT, "script": SCRIPT}
    assert (await stack.call("POST", "/api/jobs/record", body, no_token))[0] == 401
    assert await stack.jobs_messages() == before
    async with stack.sessions() as db:
        rows = (
            await db.execute(select(RecordingJob).where(RecordingJob.orchestrator_id == ORCH_INPUT))
        ).scalars()  # type: ignore[arg-type]
        assert list(rows) == []
    assert (await stack.call("GET", "/api/jobs/no-such-job"))[0] == 404
    assert (await stack.call("POST", "/api/jobs/no-such-job/cancel"))[0] == 404


async def test_presign_is_limited_to_the_recordings_bucket(stack: JobsStack) -> None:
    key = f"{PREFIX}/manual/clip.webm"
    stack.moto.client().put_object(Bucket=BUCKET, Key=key, Body=b"clip")
    status, answer = await stack.call("GET", f"/api/recordings/presign?s3_uri=s3://{BUCKET}/{key}")
    assert status == 200, answer
    assert answer["s3_uri"] == f"s3://{BUCKET}/{key}" and answer["expires_in"] == 3600
    async with stack.http.get(answer["url"]) as download:
        assert download.status == 200 and await download.read() == b"clip"
    refusals = {
        "s3://other-bucket/secret.txt": (400, "Only objects in the recordings bucket"),
        "https://example.com/x": (400, "Expected s3:// URI"),
        "s3": (422, "s3_uri must be"),
    }
    for uri, (want_status, want_detail) in refusals.items():
        status, answer = await stack.call("GET", f"/api/recordings/presign?s3_uri={uri}")
        assert status == want_status and want_detail in answer["detail"], (uri, answer)
    assert (await stack.call("GET", "/api/recordings/presign"))[0] == 422


async def test_replay_rebuilds_the_jobs_projection(stack: JobsStack) -> None:
    """Last: every job above, rebuilt from the streams into an empty database, row for row."""
    live = await job_rows(stack.sessions)
    assert len(live) >= 5 and all(row["state"] != "running" for row in live)
    (stack.tmp / "replay").mkdir(exist_ok=True)
    target = await create_database(stack.database.backend, stack.tmp / "replay")
    try:
        result = await run_cli(stack.env, "replay", "--into", target.url)
        assert result.code == 0, result.stderr
        engine = make_engine(target.url, writer=False)
        try:
            rebuilt = await job_rows(make_sessionmaker(engine))
        finally:
            await engine.dispose()
    finally:
        if target.drop is not None:
            await target.drop()
    assert rebuilt == live


async def job_rows(sessions: Any) -> list[dict[str, Any]]:
    async with sessions() as db:
        rows = (await db.execute(select(RecordingJob).order_by(RecordingJob.job_id))).scalars()  # type: ignore[arg-type]
        return [json.loads(row.model_dump_json()) for row in rows]
