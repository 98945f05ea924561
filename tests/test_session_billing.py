"""The session state machine and its billing (shared.session_billing), as pure functions.

Every expected amount here is worked out by hand from the rules (original-behaviour §7.3 and
the fixes of issue 4): at 0.06 ETH per minute one millisecond is worth exactly 10**12 wei.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta, timezone

import pytest

from shared.db.models import Session
from shared.session_billing import (
    ClosedSegment,
    apply_event,
    apply_tick,
    end_run,
    iso_z,
    open_run,
    proof_hash,
)

T0 = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
RATE = "0.06"
WEI_PER_MS_AT_RATE = 10**12  # 0.06 ETH/min = 0.001 ETH/s = 10**15 wei/s
ONE_HUNDREDTH_ETH = 10**16


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def new_session(
    *,
    orchestrator_id: str | None = "orch-1",
    rate: str = RATE,
    segment_seconds: int = 2400,
    idle_timeout_seconds: float = 120.0,
    started: datetime = T0,
) -> Session:
    """A session as the worker creates it on its first event: one open run from `started`."""
    session = Session(
        session_id="sess-1",
        partition=0,
        orchestrator_id=orchestrator_id,
        upstream_addr="198.51.100.7",
        upstream_port=8443,
        edge_id="edge-1",
        last_event="start",
        updated_at=started,
        credit_eth_per_minute=rate,
        segment_seconds=segment_seconds,
        idle_timeout_seconds=idle_timeout_seconds,
    )
    open_run(session, started)
    return session


def expected_proof(
    session_id: str,
    orchestrator_id: str | None,
    edge_id: str | None,
    segment_index: int,
    start_text: str,
    end_text: str,
    duration_ms: int,
) -> str:
    """The original's recipe, written out independently of the product code."""
    document = {
        "session_id": session_id,
        "orchestrator_id": orchestrator_id,
        "edge_id": edge_id,
        "segment_index": segment_index,
        "segment_start": start_text,
        "segment_end": end_text,
        "duration_ms": duration_ms,
    }
    text = json.dumps(document, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def spans(closed: list[ClosedSegment]) -> list[tuple[int, datetime, datetime, int, str]]:
    return [(c.segment_index, c.start, c.end, c.duration_ms, c.trigger) for c in closed]


# -- the original's example ------------------------------------------------------------------


def test_original_example_bills_one_ten_second_end_segment_worth_one_hundredth_eth() -> None:
    session = new_session()
    assert apply_event(session, "heartbeat", at(10)) == []
    closed = apply_event(session, "end", at(10))

    assert spans(closed) == [(0, T0, at(10), 10_000, "end")]
    [segment] = closed
    assert segment.credit_wei == ONE_HUNDREDTH_ETH
    assert segment.run == 0
    assert segment.orchestrator_id == "orch-1"
    assert session.ended_at == at(10)
    assert session.end_trigger == "end"
    assert session.billed_ms == 10_000
    assert session.billed_wei == ONE_HUNDREDTH_ETH
    assert session.last_credited_wei == ONE_HUNDREDTH_ETH
    assert session.metered_ms == 10_000
    assert session.segment_index == 1
    assert session.heartbeat_count == 1
    proof = expected_proof(
        "sess-1", "orch-1", "edge-1", 0, "2024-05-06T07:08:09Z", "2024-05-06T07:08:19Z", 10_000
    )
    assert segment.proof_hash == proof
    assert session.last_credit_proof == proof
    assert session.segments == [
        {
            "segment_index": 0,
            "start_at": "2024-05-06T07:08:09Z",
            "end_at": "2024-05-06T07:08:19Z",
            "duration_ms": 10_000,
            "credited_wei": str(ONE_HUNDREDTH_ETH),
            "proof_hash": proof,
            "trigger": "end",
        }
    ]


def test_partial_segment_is_billed_only_at_end() -> None:
    session = new_session(segment_seconds=60)
    for second in (10, 20, 30, 40, 50):
        assert apply_event(session, "heartbeat", at(second)) == []
    assert session.billed_ms == 0 and session.segment_index == 0
    assert session.heartbeat_count == 5


# -- segments --------------------------------------------------------------------------------


def test_segments_roll_over_at_segment_seconds_and_the_remainder_closes_at_end() -> None:
    session = new_session(segment_seconds=60)
    assert apply_event(session, "heartbeat", at(59.999)) == []
    first = apply_event(session, "heartbeat", at(60))
    assert spans(first) == [(0, T0, at(60), 60_000, "segment")]
    # One event can close several segments: the cursor advances a whole segment at a time.
    assert apply_event(session, "heartbeat", at(100)) == []
    both = apply_event(session, "heartbeat", at(185))
    assert spans(both) == [
        (1, at(60), at(120), 60_000, "segment"),
        (2, at(120), at(180), 60_000, "segment"),
    ]
    last = apply_event(session, "end", at(200.5))
    assert spans(last) == [(3, at(180), at(200.5), 20_500, "end")]

    every = first + both + last
    assert [c.credit_wei for c in every] == [60_000 * WEI_PER_MS_AT_RATE] * 3 + [
        20_500 * WEI_PER_MS_AT_RATE
    ]
    assert session.billed_ms == 200_500
    assert session.billed_wei == 200_500 * WEI_PER_MS_AT_RATE
    assert session.segment_index == 4
    assert [s["segment_index"] for s in session.segments or []] == [0, 1, 2, 3]
    assert session.last_billed_at == at(200.5)
    # Each segment's proof is the recipe over that segment.
    assert every[1].proof_hash == expected_proof(
        "sess-1", "orch-1", "edge-1", 1, "2024-05-06T07:09:09Z", "2024-05-06T07:10:09Z", 60_000
    )


def test_end_exactly_on_a_segment_boundary_leaves_no_empty_segment() -> None:
    session = new_session(segment_seconds=60)
    closed = apply_event(session, "end", at(120))
    assert spans(closed) == [
        (0, T0, at(60), 60_000, "segment"),
        (1, at(60), at(120), 60_000, "segment"),
    ]
    assert session.last_credited_wei == 60_000 * WEI_PER_MS_AT_RATE


def test_durations_are_whole_milliseconds_rounded_down() -> None:
    session = new_session()
    [segment] = apply_event(session, "end", T0 + timedelta(seconds=10, microseconds=999))
    assert segment.duration_ms == 10_000
    assert segment.credit_wei == 10_000 * WEI_PER_MS_AT_RATE


# -- idle gaps -------------------------------------------------------------------------------


def test_gap_longer_than_idle_timeout_ends_the_run_at_the_last_event_unbilled_gap() -> None:
    session = new_session(idle_timeout_seconds=120)
    assert apply_event(session, "heartbeat", at(30)) == []
    closed = apply_event(session, "heartbeat", at(400))

    assert spans(closed) == [(0, T0, at(30), 30_000, "idle")]
    assert closed[0].run == 0
    assert closed[0].credit_wei == 30_000 * WEI_PER_MS_AT_RATE
    # The heartbeat after the gap opened a new run from its own time.
    assert session.run == 1
    assert session.started_at == at(400)
    assert session.ended_at is None and session.end_trigger is None
    assert session.segment_index == 0 and session.billed_ms == 0

    tail = apply_event(session, "end", at(410))
    assert spans(tail) == [(0, at(400), at(410), 10_000, "end")]
    assert tail[0].run == 1
    billed = sum(c.duration_ms for c in closed + tail)
    assert billed == 40_000  # not the 410 s between the first and the last event


def test_end_after_a_long_gap_ends_at_the_last_event_not_at_the_end() -> None:
    session = new_session(idle_timeout_seconds=120)
    apply_event(session, "heartbeat", at(30))
    closed = apply_event(session, "end", at(400))
    assert spans(closed) == [(0, T0, at(30), 30_000, "idle")]
    assert session.ended_at == at(30)
    assert session.end_trigger == "idle"
    assert session.run == 0
    assert session.billed_ms == 30_000


def test_a_gap_of_exactly_the_idle_timeout_is_still_connected_time() -> None:
    session = new_session(idle_timeout_seconds=120)
    assert apply_event(session, "heartbeat", at(120)) == []
    closed = apply_event(session, "end", at(240))
    assert spans(closed) == [(0, T0, at(240), 240_000, "end")]


def test_tick_closes_an_idle_run_at_its_last_event() -> None:
    session = new_session(idle_timeout_seconds=2)
    apply_event(session, "heartbeat", at(1.5))
    assert apply_tick(session, at(3.5)) == []  # exactly the timeout: not idle yet
    assert session.ended_at is None
    closed = apply_tick(session, at(3.501))
    assert spans(closed) == [(0, T0, at(1.5), 1_500, "idle")]
    assert session.ended_at == at(1.5)
    assert session.end_trigger == "idle"
    assert apply_tick(session, at(60)) == []  # an ended session is left alone
    assert session.ended_at == at(1.5)


# -- after the end ---------------------------------------------------------------------------


def test_heartbeat_after_end_opens_a_new_run_without_billing_the_gap() -> None:
    session = new_session()
    first = apply_event(session, "end", at(10))
    assert spans(first) == [(0, T0, at(10), 10_000, "end")]

    assert apply_event(session, "heartbeat", at(100)) == []
    assert session.run == 1
    assert session.started_at == at(100)
    assert session.last_billed_at == at(100)
    assert session.ended_at is None
    assert session.billed_ms == 0 and session.billed_wei == 0 and session.segments == []

    second = apply_event(session, "end", at(105))
    assert spans(second) == [(0, at(100), at(105), 5_000, "end")]
    assert second[0].run == 1
    assert (first[0].run, first[0].segment_index) != (second[0].run, second[0].segment_index)


def test_start_after_end_opens_a_new_run_too() -> None:
    session = new_session()
    apply_event(session, "end", at(10))
    assert apply_event(session, "start", at(50)) == []
    assert (session.run, session.started_at, session.ended_at) == (1, at(50), None)


def test_start_on_a_live_session_is_a_heartbeat_without_the_count() -> None:
    session = new_session()
    assert apply_event(session, "start", at(5)) == []
    assert (session.run, session.started_at, session.heartbeat_count) == (0, T0, 0)
    assert session.last_seen_at == at(5)


def test_repeated_end_changes_nothing() -> None:
    session = new_session()
    apply_event(session, "end", at(10))
    before = (
        session.ended_at,
        session.end_trigger,
        session.billed_ms,
        session.billed_wei,
        session.segment_index,
        session.metered_ms,
        session.run,
        session.last_credit_proof,
        list(session.segments or []),
    )
    for second in (10, 11, 500):
        assert apply_event(session, "end", at(second)) == []
    after = (
        session.ended_at,
        session.end_trigger,
        session.billed_ms,
        session.billed_wei,
        session.segment_index,
        session.metered_ms,
        session.run,
        session.last_credit_proof,
        list(session.segments or []),
    )
    assert after == before
    assert session.last_credited_wei == 0  # the original's "last_credited_eth" of a duplicate


def test_end_as_a_first_event_bills_nothing() -> None:
    session = new_session()
    assert end_run(session, T0, "end") == []
    assert session.ended_at == T0 and session.billed_ms == 0


# -- time only moves forward -----------------------------------------------------------------


def test_an_event_stamped_before_the_last_one_counts_at_the_last_ones_time() -> None:
    session = new_session()
    apply_event(session, "heartbeat", at(20))
    assert apply_event(session, "heartbeat", at(5)) == []
    assert session.last_seen_at == at(20)
    closed = apply_event(session, "end", at(15))
    assert spans(closed) == [(0, T0, at(20), 20_000, "end")]
    assert session.ended_at == at(20)


def test_an_early_stamped_event_cannot_make_a_gap_look_idle_or_shrink_it() -> None:
    session = new_session(idle_timeout_seconds=10)
    apply_event(session, "heartbeat", at(8))
    apply_event(session, "heartbeat", at(1))  # late delivery: counts at 8
    closed = apply_event(session, "end", at(17))  # 9 s after the last event: still live
    assert spans(closed) == [(0, T0, at(17), 17_000, "end")]


# -- who gets credited -----------------------------------------------------------------------


def test_unattributed_session_is_metered_but_not_credited() -> None:
    session = new_session(orchestrator_id=None)
    [segment] = apply_event(session, "end", at(10))
    assert segment.credit_wei == 0 and segment.duration_ms == 10_000
    assert session.metered_ms == 10_000
    assert session.billed_ms == 0 and session.billed_wei == 0
    assert session.segments == [] and session.last_credit_proof is None


def test_rate_zero_credits_nothing() -> None:
    session = new_session(rate="0")
    [segment] = apply_event(session, "end", at(10))
    assert segment.credit_wei == 0 and session.billed_wei == 0 and session.segments == []


def test_credit_is_truncated_to_whole_wei() -> None:
    session = new_session(rate="0.0000000000000001")  # 100 wei per minute
    [segment] = apply_event(session, "end", at(1))
    assert segment.credit_wei == 1  # 100 * 1000 / 60000 = 1.67 wei


# -- proof_hash ------------------------------------------------------------------------------

VECTOR_PROOF = "sha256:d60e2c868fa09cfc9174ea88444c7e84dec5f93354c267906371fb6f7423276c"


def test_proof_hash_test_vector() -> None:
    start = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    end = datetime(2024, 1, 2, 3, 44, 5, 250_000, tzinfo=UTC)
    canonical = (
        '{"duration_ms":2400250,"edge_id":"edge-7","orchestrator_id":"orch-1",'
        '"segment_end":"2024-01-02T03:44:05.250000Z","segment_index":3,'
        '"segment_start":"2024-01-02T03:04:05Z","session_id":"sess-vector"}'
    )
    independent = "sha256:" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    assert independent == expected_proof(
        "sess-vector",
        "orch-1",
        "edge-7",
        3,
        "2024-01-02T03:04:05Z",
        "2024-01-02T03:44:05.250000Z",
        2_400_250,
    )
    computed = proof_hash(
        session_id="sess-vector",
        orchestrator_id="orch-1",
        edge_id="edge-7",
        segment_index=3,
        segment_start=start,
        segment_end=end,
        duration_ms=2_400_250,
    )
    assert computed == independent
    assert computed == VECTOR_PROOF


def test_proof_hash_with_null_orchestrator_and_edge() -> None:
    computed = proof_hash(
        session_id="s",
        orchestrator_id=None,
        edge_id=None,
        segment_index=0,
        segment_start=datetime(2024, 1, 1, tzinfo=UTC),
        segment_end=datetime(2024, 1, 1, 0, 0, 1, tzinfo=UTC),
        duration_ms=1000,
    )
    canonical = (
        '{"duration_ms":1000,"edge_id":null,"orchestrator_id":null,'
        '"segment_end":"2024-01-01T00:00:01Z","segment_index":0,'
        '"segment_start":"2024-01-01T00:00:00Z","session_id":"s"}'
    )
    assert computed == "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


@pytest.mark.parametrize(
    ("moment", "text"),
    [
        (datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC), "2024-01-02T03:04:05Z"),
        (datetime(2024, 1, 2, 3, 4, 5, 7, tzinfo=UTC), "2024-01-02T03:04:05.000007Z"),
        (datetime(2024, 1, 2, 3, 4, 5, 120_000, tzinfo=UTC), "2024-01-02T03:04:05.120000Z"),
        # Another zone is converted to UTC first.
        (
            datetime(2024, 1, 2, 7, 4, 5, tzinfo=timezone(timedelta(hours=2))),
            "2024-01-02T05:04:05Z",
        ),
    ],
)
def test_iso_z_formats_utc_with_z_and_microseconds_only_when_nonzero(
    moment: datetime, text: str
) -> None:
    assert iso_z(moment) == text
