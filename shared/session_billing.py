"""The session state machine and its billing, as pure functions over a `Session` row.

Rules (original-behaviour §7.3, with its gaps fixed):
- a session bills connected time in segments of `segment_seconds`, cut from its start; a
  partial segment is billed when the session ends;
- a gap longer than `idle_timeout_seconds` between events is not connected time: the run ends at
  its last event (trigger `idle`), whether a tick or the next event notices it first;
- an event after the end (`end`, or idle) does not bill the gap: `start` or `heartbeat` opens a
  new run from its own time, and a repeated `end` changes nothing;
- time only moves forward: an event stamped before the last one counts at the last one's time.

Every closed segment yields a `ClosedSegment`; the caller credits those with a positive amount.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from shared.money import rate_credit_wei


class Session(Protocol):
    """What billing reads and writes of a session: a sessions row (the ORM model, or the
    worker's plain `SessionRow`)."""

    session_id: str
    orchestrator_id: str | None
    edge_id: str | None
    run: int
    started_at: datetime | None
    last_seen_at: datetime | None
    ended_at: datetime | None
    end_trigger: str | None
    last_billed_at: datetime | None
    billed_ms: int
    billed_wei: int
    last_credited_wei: int
    metered_ms: int
    segment_index: int
    heartbeat_count: int
    segments: list[dict[str, Any]] | None
    last_credit_proof: str | None
    credit_eth_per_minute: str
    segment_seconds: int
    idle_timeout_seconds: float


@dataclass(frozen=True)
class ClosedSegment:
    session_id: str
    orchestrator_id: str | None
    edge_id: str | None
    run: int
    segment_index: int
    start: datetime
    end: datetime
    duration_ms: int
    credit_wei: int
    trigger: str
    proof_hash: str


def iso_z(moment: datetime) -> str:
    """ISO 8601 in UTC with a `Z`, microseconds only when non-zero (the original's format)."""
    moment = moment.astimezone(UTC)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if moment.microsecond:
        text += f".{moment.microsecond:06d}"
    return text + "Z"


def proof_hash(
    *,
    session_id: str,
    orchestrator_id: str | None,
    edge_id: str | None,
    segment_index: int,
    segment_start: datetime,
    segment_end: datetime,
    duration_ms: int,
) -> str:
    document = {
        "session_id": session_id,
        "orchestrator_id": orchestrator_id,
        "edge_id": edge_id,
        "segment_index": segment_index,
        "segment_start": iso_z(segment_start),
        "segment_end": iso_z(segment_end),
        "duration_ms": duration_ms,
    }
    encoded = json.dumps(document, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return "sha256:" + hashlib.sha256(encoded).hexdigest()


def _ms(delta: timedelta) -> int:
    return delta // timedelta(milliseconds=1)


def _close_segment(session: Session, end: datetime, trigger: str) -> ClosedSegment:
    assert session.last_billed_at is not None
    start = session.last_billed_at
    duration_ms = _ms(end - start)
    index = session.segment_index
    credit = 0
    if session.orchestrator_id is not None:
        credit = rate_credit_wei(duration_ms, session.credit_eth_per_minute)
    proof = proof_hash(
        session_id=session.session_id,
        orchestrator_id=session.orchestrator_id,
        edge_id=session.edge_id,
        segment_index=index,
        segment_start=start,
        segment_end=end,
        duration_ms=duration_ms,
    )
    session.segment_index += 1
    session.metered_ms += duration_ms
    session.last_billed_at = end
    if credit > 0:
        session.billed_ms += duration_ms
        session.billed_wei += credit
        session.last_credited_wei = credit
        session.last_credit_proof = proof
        session.segments = [
            *(session.segments or []),
            {
                "segment_index": index,
                "start_at": iso_z(start),
                "end_at": iso_z(end),
                "duration_ms": duration_ms,
                "credited_wei": str(credit),
                "proof_hash": proof,
                "trigger": trigger,
            },
        ]
    return ClosedSegment(
        session.session_id,
        session.orchestrator_id,
        session.edge_id,
        session.run,
        index,
        start,
        end,
        duration_ms,
        credit,
        trigger,
        proof,
    )


def advance(session: Session, until: datetime) -> list[ClosedSegment]:
    """Close every full segment that ends at or before `until`."""
    assert session.last_billed_at is not None
    length = timedelta(seconds=session.segment_seconds)
    closed = []
    while until - session.last_billed_at >= length:
        closed.append(_close_segment(session, session.last_billed_at + length, "segment"))
    return closed


def end_run(session: Session, at: datetime, trigger: str) -> list[ClosedSegment]:
    """End the current run at `at`: full segments, then the remainder."""
    closed = advance(session, at)
    assert session.last_billed_at is not None
    if at > session.last_billed_at:
        closed.append(_close_segment(session, at, trigger))
    session.last_credited_wei = closed[-1].credit_wei if closed else 0
    session.ended_at = at
    session.end_trigger = trigger
    return closed


def is_idle(session: Session, at: datetime) -> bool:
    assert session.last_seen_at is not None
    return at - session.last_seen_at > timedelta(seconds=session.idle_timeout_seconds)


def open_run(session: Session, at: datetime) -> None:
    """Start a new billing window (the session's first, or one after an end)."""
    if session.started_at is not None:
        session.run += 1
    session.started_at = at
    session.last_seen_at = at
    session.last_billed_at = at
    session.ended_at = None
    session.end_trigger = None
    session.billed_ms = 0
    session.billed_wei = 0
    session.last_credited_wei = 0
    session.metered_ms = 0
    session.segment_index = 0
    session.heartbeat_count = 0
    session.segments = []
    session.last_credit_proof = None


def apply_event(session: Session, event: str, at: datetime) -> list[ClosedSegment]:
    """Apply start/heartbeat/end at `at` to a session that already has a run."""
    assert session.last_seen_at is not None
    at = max(at, session.last_seen_at)
    closed: list[ClosedSegment] = []
    if session.ended_at is None and is_idle(session, at):
        closed += end_run(session, session.last_seen_at, "idle")
    if session.ended_at is not None:
        if event == "end":
            session.last_credited_wei = 0
            return closed
        open_run(session, at)
    if event == "end":
        closed += end_run(session, at, "end")
    else:
        closed += advance(session, at)
        if event == "heartbeat":
            session.heartbeat_count += 1
    session.last_seen_at = at
    return closed


def apply_tick(session: Session, at: datetime) -> list[ClosedSegment]:
    """A tick at `at` ends a run whose last event is more than the idle timeout ago."""
    if session.ended_at is not None or not is_idle(session, at):
        return []
    assert session.last_seen_at is not None
    return end_run(session, session.last_seen_at, "idle")
