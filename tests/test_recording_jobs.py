"""Recording-job rules that need no stack: S3 keys, runner session ids, scrubbed host errors,
and the credit every worker copy must build identically."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from shared.db.models import RecordingJob
from shared.host_services import describe, host_literal, scrub
from shared.recording_jobs import recording_location, runner_session_id, sanitize
from shared.settings import build_settings
from workers.jobs import credit_event

STARTED = datetime(2026, 11, 25, 8, 0, 0, tzinfo=UTC)


def job(**fields: object) -> RecordingJob:
    values: dict[str, object] = {
        "job_id": "a1b2c3d4e5f6a7b8",
        "orchestrator_id": "orch-1",
        "state": "running",
        "step": "uploaded",
        "max_wait_seconds": 900,
        "credit_eth_per_minute": "0.000005353596",
        "last_step_key": "k",
        "started_at": STARTED,
        "duration_ms": 180_000,
        "artifact_uri": "s3://b/recordings/orch-1/a1b2c3d4e5f6a7b8/x.webm",
        "artifact_hash": "ab" * 32,
        **fields,
    }
    return RecordingJob(**values)  # type: ignore[arg-type]


def test_key_parts_keep_only_safe_characters() -> None:
    assert sanitize("take one/../x") == "take_one_.._x"
    assert sanitize("..") == "x" and sanitize("  ") == "x" and sanitize("", "dflt") == "dflt"
    settings = build_settings(recordings_bucket="rec", recordings_prefix="a b/c")
    location = recording_location(
        settings, job(orchestrator_id="orch 1", job_id="j:1"), "/tmp/out put.webm"
    )
    assert (location.bucket, location.key) == ("rec", "a_b/c/orch_1/j_1/out_put.webm")


def test_runner_session_id_is_fixed_by_the_start() -> None:
    assert runner_session_id(job()) == f"job_a1b2c3d4e5f6_{int(STARTED.timestamp())}"


def test_host_errors_never_quote_presigned_urls() -> None:
    answer = {"detail": "PUT https://s3/x?X-Amz-Signature=deadbeef&X-Amz-Credential=AKIA1 failed"}
    text = describe(answer)
    assert "deadbeef" not in text and "AKIA1" not in text and "https://" not in text
    assert scrub("a X-Amz-Signature=abc b") == "a X-Amz-…=<redacted> b"
    assert host_literal("::1") == "[::1]" and host_literal("10.0.0.1") == "10.0.0.1"


def test_credit_is_the_same_for_every_copy_and_ends_at_the_upload() -> None:
    first, second = credit_event(job()), credit_event(job())
    assert first == second
    assert first.workload_id == "job:a1b2c3d4e5f6a7b8" and first.job_id == "a1b2c3d4e5f6a7b8"
    assert first.received_at == STARTED + timedelta(milliseconds=180_000)
    assert first.status == "verified" and first.duration_ms == 180_000
    assert credit_event(job(artifact_hash="cd" * 32)).body_sha256 != first.body_sha256
    assert credit_event(job(duration_ms=0)).duration_ms == 1
